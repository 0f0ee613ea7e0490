"""Fast modes give the fp32 eager masks within stated tolerances (random, perturbed weights).

Through the predictor, 32 point prompts and 4 boxes on a 600x800 image with a 256-pixel model, compared with fp32:
- bf16 (`from_pretrained(..., dtype=torch.bfloat16)` / `optimize(model, "bf16")`): thresholded mask
  IoU >= 0.97 per mask; logits max |diff| <= 5% and mean |diff| <= 1% of max |fp32 logit|;
  scores within 0.03; the predictor's outputs are float32 (post-processing in fp32).
- int8 dynamic quantization of the encoder's linear layers: IoU >= 0.93 per mask and >= 0.96 on
  average; logits mean |diff| <= 2% of max |fp32 logit|; scores within 0.05.
- torch.compile: embeddings within 1e-4 relative (marked slow: compiling takes a while).
"""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from samhq import SamHQModel
from samhq.fast import bf16_supported, compile_encoder, optimize, quantize_int8
from samhq.predictor import SamHQPredictor

from conftest import random_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

NO_GRAD = True  # conftest runs this module's tests without autograd

IMAGE = (np.random.default_rng(0).random((600, 800, 3)) * 255).astype(np.uint8)
_g = torch.Generator().manual_seed(1)
POINTS = torch.rand(32, 1, 2, generator=_g) * 256
LABELS = torch.ones(32, 1, dtype=torch.int)
BOXES = torch.tensor([[12.0, 15.0, 100.0, 125.0], [0.0, 0.0, 250.0, 175.0], [150, 25, 225, 75], [2, 125, 50, 185]])


def outputs(model):
    p = SamHQPredictor(model)
    p.set_image(IMAGE)
    a = p.predict_torch(POINTS, LABELS, return_logits=True)
    b = p.predict_torch(None, None, BOXES, return_logits=True, hq_token_only=True)
    return [torch.cat([x, y]) for x, y in zip(a, b)]


def ious(a, b):
    a, b = a.flatten(-2), b.flatten(-2)
    return (a & b).sum(-1) / (a | b).sum(-1).clamp_min(1)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    model = random_model(image_size=256)  # bf16 is slow on CPUs without BF16 units: keep inputs small
    path = tmp_path_factory.mktemp("fast") / "model"
    model.save_pretrained(path)
    return model, path, outputs(model)


def test_bf16_from_pretrained_matches_fp32(fp32):
    _, path, (masks, scores, low) = fp32
    model = SamHQModel.from_pretrained(path, dtype=torch.bfloat16)
    assert model.encoder_dtype == torch.bfloat16 and model.dtype == torch.float32  # the small decoder stays fp32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, s, lo = outputs(model)
    assert m.dtype == s.dtype == lo.dtype == torch.float32
    scale = masks.abs().max()
    assert (m - masks).abs().max() <= 0.05 * scale and (m - masks).abs().mean() <= 0.01 * scale
    assert (s - scores).abs().max() <= 0.03
    assert ious(m > 0, masks > 0).min() >= 0.97


def test_bf16_mode_equals_from_pretrained(fp32):
    model, path, _ = fp32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = optimize(copy.deepcopy(model), "bf16")
    b = SamHQModel.from_pretrained(path, dtype=torch.bfloat16)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    if not bf16_supported():
        with pytest.warns(UserWarning, match="bfloat16"):
            optimize(copy.deepcopy(model), "bf16")


def test_low_precision_convolutions_compute_in_float32_on_the_cpu():
    from torch.nn import functional as F

    from samhq.modeling.common import conv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(conv2d(conv, x), conv(x))  # float32: the module itself
    half = copy.deepcopy(conv).bfloat16()
    got = conv2d(half, x.bfloat16())
    want = F.conv2d(x.bfloat16().float(), half.weight.float(), half.bias.float(), stride=4).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)  # the bf16 operands, summed in float32, rounded once


def test_int8_matches_fp32_within_its_cost(fp32):
    model, _, (masks, scores, low) = fp32
    q = quantize_int8(model)
    assert any(isinstance(m, QLinear) for m in q.vision_encoder.modules())
    assert not any(type(m) is nn.Linear for m in q.vision_encoder.modules())
    assert not any(isinstance(m, QLinear) for m in q.mask_decoder.modules())
    assert not any(isinstance(m, QLinear) for m in model.modules())  # the original is untouched
    m, s, lo = outputs(q)
    assert (m - masks).abs().mean() <= 0.02 * masks.abs().max()
    assert (s - scores).abs().max() <= 0.05
    iou = ious(m > 0, masks > 0)
    assert iou.min() >= 0.93 and iou.mean() >= 0.96
    both = quantize_int8(model, decoder=True)
    assert any(isinstance(x, QLinear) for x in both.mask_decoder.modules())


def test_int8_embeddings_are_saved_and_checked(fp32, tmp_path):
    """The int8 model's encoder fingerprint (its quantized layers' state holds weight pairs and dtypes) guards its
    embedding files: another int8 copy of the same weights takes them, the fp32 model refuses them."""
    model, _, _ = fp32
    p = SamHQPredictor(quantize_int8(model))
    p.set_image(IMAGE)
    path = p.save_image_embedding(tmp_path / "int8.safetensors")
    SamHQPredictor(quantize_int8(model)).load_image_embedding(path)
    with pytest.raises(ValueError, match="another model"):
        SamHQPredictor(model).load_image_embedding(path)


def test_bad_modes(fp32):
    model, path, _ = fp32
    with pytest.raises(ValueError, match="unknown fast mode"):
        optimize(model, "fp8")
    with pytest.raises(ValueError, match="fp32 model"):
        quantize_int8(SamHQModel.from_pretrained(path, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="at least one"):
        quantize_int8(model, encoder=False)


@pytest.mark.slow
def test_compile_matches_eager(fp32):
    model, _, _ = fp32
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    ref, ref_inter = model.get_image_embeddings(x)
    compiled = compile_encoder(copy.deepcopy(model))
    emb, inter = compiled.get_image_embeddings(x)
    assert ((emb - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    assert ((inter[0] - ref_inter[0]).abs().max() / ref_inter[0].abs().max()).item() <= 1e-4


def test_demo_model_agreement_on_held_out_images(tmp_path):
    """benchmarks/agreement.py on a few held-out images of the demo model: the onnxruntime engine gives
    the fp32 masks (IoU >= 0.98 per mask; in fact identical), bf16 within its stated cost (mean IoU >= 0.99)."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("agreement", Path(__file__).parent.parent / "benchmarks" / "agreement.py")
    agreement = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agreement)
    out = tmp_path / "agreement.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert agreement.main(["--num-images", "4", "--modes", "onnxruntime,bf16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())["modes"]
    assert report["onnxruntime"]["masks"] >= 16 and report["onnxruntime"]["min_iou"] >= 0.98
    assert report["bf16"]["mean_iou"] >= 0.99 and report["bf16"]["min_iou"] >= 0.9
