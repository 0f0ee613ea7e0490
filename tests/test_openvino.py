"""The OpenVINO engine: the files `samhq export onnx` writes, run with OpenVINO through the one front end, against
the torch predictor on the same small random-weight models (SAM-HQ v1 and HQ-SAM 2 / SAM 2), as test_onnx.py and
test_sam2_onnx.py do for onnxruntime.

Tolerances (test_onnx.py's): image embeddings and HQ features max relative error (max |diff| / max |ref|) <= 1e-4;
mask logits at the original size and low-res logits <= 1e-4 relative; scores <= 1e-4 absolute; thresholded masks
IoU >= 0.999 per mask. The bf16 hint is checked against f32 by mask IoU (loose: bf16 rounds the encoder's inputs
to 8 mantissa bits), and OpenVINO's reported precision against its own list of the CPU's capabilities.
"""
import sys

import numpy as np
import pytest
import torch

from sam2_ref import random_image
from sam2_ref import small_model as sam2_small_model

pytest.importorskip("onnx")
ov = pytest.importorskip("openvino")

from samhq.engines import OpenVinoEngine  # noqa: E402
from samhq.export.onnx import export_onnx  # noqa: E402
from samhq.predictor import SamHQPredictor  # noqa: E402

NO_GRAD = True  # conftest runs this module's tests without autograd
PTS = np.array([[120.0, 200.0], [500.0, 380.0], [700.0, 90.0]])
LAB = np.array([1, 0, 1])
BOX = np.array([60.0, 80.0, 520.0, 430.0])
IMAGE = (np.random.default_rng(0).random((600, 800, 3)) * 255).astype(np.uint8)


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def mask_ious(a, b):
    """IoU of each pair of masks (..., H, W) bool; 1 where both are empty."""
    a, b = torch.as_tensor(a).flatten(-2), torch.as_tensor(b).flatten(-2)
    union = (a | b).sum(-1)
    return torch.where(union > 0, (a & b).sum(-1) / union.clamp_min(1), torch.ones(()))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from conftest import random_model

    model = random_model()
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(model, out)
    ref = SamHQPredictor(model)
    ref.set_image(IMAGE)
    eng = SamHQPredictor.from_openvino(out, threads=1)
    eng.set_image(IMAGE)
    return model, out, ref, eng


def test_encoder_matches_torch(exported):
    _, _, ref, eng = exported
    assert eng.engine.name == "openvino" and eng.engine.precision == "f32" and eng.engine.inference_precision == "f32"
    assert rel(eng.features, ref.features) <= 1e-4
    assert rel(eng.hq_features, ref.hq_features) <= 1e-4
    assert eng.original_size == ref.original_size and eng.input_size == ref.input_size


def _prompt(name, ref):
    kw = {"one_point": dict(point_coords=PTS[:1], point_labels=LAB[:1]), "points": dict(point_coords=PTS, point_labels=LAB),
          "box": dict(box=BOX), "box_and_point": dict(point_coords=PTS[:1], point_labels=LAB[:1], box=BOX)}.get(name, {})
    if name.startswith("mask"):
        _, _, low = ref.predict(point_coords=PTS[1:2], point_labels=LAB[:1])
        kw["mask_input"] = low * 2.0
        if name == "mask_and_point":
            kw.update(point_coords=PTS[:1], point_labels=LAB[:1])
    return kw


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("hq_only", [False, True])
@pytest.mark.parametrize("prompt", ["one_point", "points", "box", "box_and_point", "mask_and_point", "mask_only"])
def test_decoder_matches_torch(exported, prompt, multimask, hq_only):
    _, _, ref, eng = exported
    kw = _prompt(prompt, ref)
    a = ref.predict(multimask_output=multimask, hq_token_only=hq_only, return_logits=True, **kw)
    b = eng.predict(multimask_output=multimask, hq_token_only=hq_only, return_logits=True, **kw)
    assert [x.shape for x in a] == [x.shape for x in b] == [(1, 600, 800), (1,), (1, 256, 256)]
    assert rel(b[0], a[0]) <= 1e-4 and rel(b[2], a[2]) <= 1e-4
    assert np.abs(b[1] - a[1]).max() <= 1e-4
    assert mask_ious(a[0] > 0, b[0] > 0).min() >= 0.999


def test_many_boxes_and_points_at_once(exported):
    """Dynamic prompt and point counts: 5 boxes, then 4 prompts of 6 points, then 1 box again (a reused request)."""
    _, _, ref, eng = exported
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(5, 2, 2, generator=g) * 500
    boxes = torch.cat([xy.min(1).values, xy.max(1).values + 20], dim=1)
    pts = torch.rand(4, 6, 2, generator=g) * torch.tensor([800.0, 600.0])
    lab = (torch.rand(4, 6, generator=g) > 0.3).int()
    for args in ((None, None, boxes), (pts, lab, None), (None, None, boxes[:1])):
        a, b = ref.predict_torch(*args, return_logits=True), eng.predict_torch(*args, return_logits=True)
        assert a[0].shape == b[0].shape == (len(args[0] if args[0] is not None else args[2]), 1, 600, 800)
        assert rel(b[0], a[0]) <= 1e-4 and rel(b[2], a[2]) <= 1e-4 and (b[1] - a[1]).abs().max() <= 1e-4


def test_bf16_hint(exported):
    """precision="bf16": OpenVINO runs bf16 exactly where it lists BF16 among the CPU's capabilities (else it keeps
    f32, and says so); either way the masks agree with f32's."""
    _, out, ref, eng = exported
    bf16 = SamHQPredictor.from_openvino(out, threads=1, precision="bf16")
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert bf16.engine.precision == "bf16"
    assert bf16.engine.inference_precision == ("bf16" if has_bf16 else "f32")
    bf16.set_image(IMAGE)
    g = torch.Generator().manual_seed(2)
    xy = torch.rand(16, 2, 2, generator=g) * torch.tensor([800.0, 600.0])
    boxes = torch.cat([xy.min(1).values, xy.max(1).values + 40], dim=1).numpy()
    a = eng.predict(box=boxes, multimask_output=False)[0]
    b = bf16.predict(box=boxes, multimask_output=False)[0]
    iou = mask_ious(a, b)
    assert iou.mean() >= 0.9 and (iou >= 0.8).float().mean() >= 0.8, iou
    if not has_bf16:  # the hint was not taken: the same f32 computation
        assert iou.min() >= 0.999


def test_front_end_options_and_errors(exported, tmp_path, monkeypatch):
    model, out, ref, _ = exported
    p = SamHQPredictor(model, engine="openvino")
    assert p.engine.name == "openvino" and p.model is model and p.engine.inference_precision == "f32"
    p.set_image(IMAGE)
    a, b = ref.predict(box=BOX, return_logits=True), p.predict(box=BOX, return_logits=True)
    assert rel(b[0], a[0]) <= 1e-4
    with pytest.raises(ValueError, match="'f32' or 'bf16'"):
        OpenVinoEngine(out, precision="fp16")
    with pytest.raises(ValueError, match="samhq export onnx"):
        SamHQPredictor.from_openvino(tmp_path)
    with pytest.raises(ValueError, match="'torch', 'onnxruntime' or 'openvino'"):
        SamHQPredictor(model, engine="tensorrt")
    with pytest.raises(ValueError, match="torch engine"):  # the exported decoder has the official selection only
        p.decode(boxes=torch.tensor([[10.0, 10.0, 200.0, 200.0]]), sam_token_only=True)
    feeds = {"image_embeddings": ref.features.numpy()}  # OpenVINO itself would run with stale buffers
    with pytest.raises(RuntimeError, match="no value for the model inputs"):
        p.engine._run(p.engine.decoder, feeds, ["iou_predictions"])
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'samhq\[openvino\]'"):
        SamHQPredictor.from_openvino(out)
    with pytest.raises(ImportError, match=r"pip install 'samhq\[openvino\]'"):
        SamHQPredictor(model, engine="openvino")


def test_embedding_files_move_between_onnx_engines(exported, tmp_path):
    """The two ONNX-file engines read the same export, so an embedding file from one is used by the other."""
    ort = pytest.importorskip("onnxruntime")
    assert ort
    _, out, ref, eng = exported
    from samhq.predictor import OnnxPredictor

    eng.save_image_embedding(tmp_path / "ov.safetensors")
    o = OnnxPredictor(out, threads=1)
    o.load_image_embedding(tmp_path / "ov.safetensors")
    want = ref.predict(point_coords=PTS, point_labels=LAB, return_logits=True)
    assert rel(o.predict(point_coords=PTS, point_labels=LAB, return_logits=True)[0], want[0]) <= 1e-4
    o.save_image_embedding(tmp_path / "ort.safetensors")
    back = SamHQPredictor.from_openvino(out, threads=1)
    back.load_image_embedding(tmp_path / "ort.safetensors")
    assert rel(back.predict(point_coords=PTS, point_labels=LAB, return_logits=True)[0], want[0]) <= 1e-4
    ref.save_image_embedding(tmp_path / "torch.safetensors")  # SAM-HQ's torch engine keeps other features
    with pytest.raises(ValueError, match="another model"):
        back.load_image_embedding(tmp_path / "torch.safetensors")


S2_PTS = np.array([[40.0, 60.0], [150.0, 100.0], [220.0, 30.0]])
S2_BOX = np.array([20.0, 15.0, 190.0, 140.0])


@pytest.mark.parametrize("hq", [True, False])
def test_sam2_models(tmp_path, hq):
    """HQ-SAM 2 and plain SAM 2 exports: features, prompts of each kind and batched boxes equal the torch predictor's;
    SAM 2 embedding files move between the torch and OpenVINO engines."""
    model = sam2_small_model(hq=hq)
    export_onnx(model, tmp_path / "onnx")
    image = random_image(160, 240, 0)
    ref, eng = SamHQPredictor(model), SamHQPredictor.from_openvino(tmp_path / "onnx", threads=1)
    ref.set_image(image)
    eng.set_image(image)
    assert eng.engine.family == "sam2" and eng.selection == "token_order" and eng.engine.hq_enabled is hq
    for key in ("features", "high_res_s0", "high_res_s1"):
        assert rel(eng._features[key], ref._features[key]) <= 1e-4, key
    _, _, low = ref.predict(point_coords=S2_PTS[1:2], point_labels=[1], multimask_output=False)
    prompts = [dict(point_coords=S2_PTS[:1], point_labels=[1]), dict(point_coords=S2_PTS, point_labels=[1, 0, 1]),
               dict(box=S2_BOX), dict(point_coords=S2_PTS[1:2], point_labels=[0], box=S2_BOX),
               dict(point_coords=S2_PTS[:1], point_labels=[1], mask_input=low * 2.0),
               dict(box=np.stack([S2_BOX, S2_BOX / 2 + 10]))]
    for kw in prompts:
        for multimask in (True, False):
            for hq_only in ((False, True) if hq else (False,)):
                a = ref.predict(multimask_output=multimask, hq_token_only=hq_only, return_logits=True, **kw)
                b = eng.predict(multimask_output=multimask, hq_token_only=hq_only, return_logits=True, **kw)
                assert [x.shape for x in a] == [x.shape for x in b]
                assert rel(b[0], a[0]) <= 1e-4 and rel(b[2], a[2]) <= 1e-4 and np.abs(b[1] - a[1]).max() <= 1e-4
    if not hq:
        with pytest.raises(ValueError, match="HQ"):
            eng.predict(box=S2_BOX, hq_token_only=True)
    ref.save_image_embedding(tmp_path / "torch.safetensors")
    back = SamHQPredictor.from_openvino(tmp_path / "onnx", threads=1)
    back.load_image_embedding(tmp_path / "torch.safetensors")
    assert rel(back.predict(box=S2_BOX, return_logits=True)[0], ref.predict(box=S2_BOX, return_logits=True)[0]) <= 1e-4
