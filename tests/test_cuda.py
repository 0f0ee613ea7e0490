"""samhq on a CUDA GPU gives the CPU's masks (random, perturbed weights); every test skips without CUDA.

- the torch engine's predictor, the automatic mask generator, one training step and the SAM 2 predictor
  on the GPU against the same model on the CPU, with torch's default CUDA settings (cuDNN convolutions may
  use TF32): logits within 2% of the largest |logit| at worst and 0.2% on average, every thresholded mask
  at IoU >= 0.98, predicted IoUs within 0.01;
- the encoder in bfloat16 on the GPU (what `dtype="auto"` picks there) against fp32 on the GPU: every mask
  at IoU >= 0.97, as `tests/test_fast.py` states for the CPU;
- the fast paths against the plain forms on the GPU with TF32 off: equal up to fp32 rounding (max |diff|
  within 1e-4 of the largest value; the CPU's test asks 1e-5, GPU kernels sum in other orders).

To check the bodies on a machine without a GPU, set DEVICE = "cpu" locally (then the CPU is compared
with itself, which proves the tests run, not that CUDA works).
"""
import copy

import numpy as np
import pytest
import torch

from samhq import SamHQConfig, SamHQModel
from samhq.automatic import SamHQAutomaticMaskGenerator
from samhq.data.synthetic import SyntheticShapes
from samhq.fast import bf16_supported
from samhq.pipelines import load_for_inference, resolve_dtype
from samhq.predictor import SamHQPredictor
from samhq.train import TrainConfig, Trainer

from conftest import random_model
from official_ref import perturb_

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
NO_GRAD = True  # conftest runs this module's tests without autograd

IMAGE = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)
_g = torch.Generator().manual_seed(1)
POINTS = torch.rand(16, 1, 2, generator=_g) * torch.tensor([256.0, 192.0])  # the image resized for a 256-pixel model
LABELS = torch.ones(16, 1, dtype=torch.int)
BOXES = torch.tensor([[12.0, 15.0, 100.0, 125.0], [0.0, 0.0, 250.0, 175.0], [150, 25, 225, 75], [2, 125, 50, 185]])


def on_device(model):
    return copy.deepcopy(model).to(DEVICE).eval()


def ious(a, b):
    a, b = a.flatten(-2), b.flatten(-2)
    return (a & b).sum(-1) / (a | b).sum(-1).clamp_min(1)


def assert_agree(got_logits, want_logits, got_scores=None, want_scores=None, max_rel=2e-2, mean_rel=2e-3, min_iou=0.98):
    """Logits (..., H, W) of another device within the stated tolerance of the reference, thresholded masks too."""
    got, want = torch.as_tensor(got_logits).float().cpu(), torch.as_tensor(want_logits).float().cpu()
    assert got.shape == want.shape
    scale = want.abs().max()
    assert (got - want).abs().max() <= max_rel * scale
    assert (got - want).abs().mean() <= mean_rel * scale
    assert ious(got > 0, want > 0).min() >= min_iou
    if want_scores is not None:
        torch.testing.assert_close(torch.as_tensor(got_scores).float().cpu(), torch.as_tensor(want_scores).float().cpu(),
                                   atol=1e-2, rtol=0)


def predictor_outputs(model, tensors_on=None):
    """32 logits sets: 16 points and 4 boxes (HQ only) through predict_torch, one point and box through predict."""
    p = SamHQPredictor(model)
    p.set_image(IMAGE)
    dev = tensors_on or "cpu"
    a = p.predict_torch(POINTS.to(dev), LABELS.to(dev), return_logits=True)
    b = p.predict_torch(None, None, BOXES.to(dev), return_logits=True, hq_token_only=True)
    one = p.predict(point_coords=np.array([[120, 90]]), point_labels=np.array([1]), box=np.array([40, 30, 300, 250]),
                    return_logits=True)
    return [torch.cat([x.cpu(), y.cpu()]) for x, y in zip(a, b)], one


@pytest.fixture(scope="module")
def model():
    return random_model(seed=21, image_size=256)


def test_predictor_matches_the_cpu(model):
    (masks, scores, low), one = predictor_outputs(model)
    gpu = on_device(model)
    assert SamHQPredictor(gpu).device.type == DEVICE
    (masks_g, scores_g, low_g), one_g = predictor_outputs(gpu, tensors_on=DEVICE)  # prompts given on the GPU
    assert masks_g.dtype == torch.float32
    assert_agree(masks_g, masks, scores_g, scores)
    assert_agree(low_g, low)
    assert all(isinstance(x, np.ndarray) for x in one_g)  # predict returns numpy arrays whatever the device
    assert_agree(one_g[0], one[0], one_g[1], one[1])


def test_embedding_moves_between_devices(model, tmp_path):
    cpu = SamHQPredictor(model)
    cpu.set_image(IMAGE)
    path = cpu.save_image_embedding(tmp_path / "e.safetensors")
    gpu = SamHQPredictor(on_device(model))
    gpu.load_image_embedding(path)
    box = np.array([40, 30, 300, 250])
    assert_agree(gpu.predict(box=box, return_logits=True)[0], cpu.predict(box=box, return_logits=True)[0])


def test_generator_matches_the_cpu():
    model = random_model(seed=22, image_size=256, window_size=8)
    # random weights: no filter, no suppression, so both devices keep every point's mask and they can be paired
    kw = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
              output_mode="binary_mask")
    cpu = SamHQAutomaticMaskGenerator(SamHQPredictor(model), **kw).generate(IMAGE)
    gpu = SamHQAutomaticMaskGenerator(SamHQPredictor(on_device(model)), **kw).generate(IMAGE)
    assert len(gpu) == len(cpu) == 36
    by_point = {tuple(r["point_coords"][0]): r for r in cpu}
    for r in gpu:
        ref = by_point[tuple(r["point_coords"][0])]
        seg, ref_seg = torch.as_tensor(r["segmentation"]), torch.as_tensor(ref["segmentation"])
        assert ious(seg[None], ref_seg[None]).item() >= 0.98
        assert r["predicted_iou"] == pytest.approx(ref["predicted_iou"], abs=1e-2)
        assert r["stability_score"] == pytest.approx(ref["stability_score"], abs=2e-2)


def test_bf16_encoder_masks_agree_with_fp32(model):
    fast = bf16_supported() if DEVICE == "cpu" else torch.cuda.is_bf16_supported()
    assert resolve_dtype("auto", DEVICE) == (torch.bfloat16 if fast else torch.float32)
    fp32 = on_device(model)
    bf16 = load_for_inference(fp32, device=DEVICE, dtype="bfloat16")
    assert bf16.encoder_dtype == torch.bfloat16 and bf16.dtype == torch.float32 and fp32.encoder_dtype == torch.float32
    (masks, scores, _), _ = predictor_outputs(fp32)
    (masks_b, scores_b, _), _ = predictor_outputs(bf16)
    assert masks_b.dtype == torch.float32
    assert ious(masks_b > 0, masks > 0).min() >= 0.97
    assert (scores_b - scores).abs().max() <= 0.03


def test_bf16_tiny_vit_encoder_runs():
    """TinyViT (Light HQ-SAM) in bf16: its attention bias and folded batch norms take the activations' dtype."""
    cfg = SamHQConfig.from_variant("vit_tiny")
    cfg.vision_config.image_size = cfg.prompt_encoder_config.image_size = 256
    cfg = SamHQConfig(vision_config=cfg.vision_config, prompt_encoder_config=cfg.prompt_encoder_config,
                      mask_decoder_config=cfg.mask_decoder_config)
    m = perturb_(SamHQModel(cfg), seed=5).eval().to(DEVICE)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    emb, _ = m.get_image_embeddings(x)
    m.vision_encoder.to(torch.bfloat16)
    emb_b, _ = m.get_image_embeddings(x)
    assert emb_b.dtype == torch.float32 and torch.isfinite(emb_b).all()
    cos = torch.nn.functional.cosine_similarity(emb_b.flatten(), emb.flatten(), dim=0)
    assert cos >= 0.99


@pytest.fixture
def no_tf32():
    if DEVICE != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def both(model, fn):
    """fn() with the fast path on, then off (the model's switch restored)."""
    model.set_fast_path(True)
    fast = fn()
    model.set_fast_path(False)
    try:
        return fast, fn()
    finally:
        model.set_fast_path(True)


def close(got, want, rel=1e-4):
    got, want = torch.as_tensor(got).float().cpu(), torch.as_tensor(want).float().cpu()
    assert got.shape == want.shape
    assert (got - want).abs().max() <= rel * want.abs().max()


@pytest.mark.parametrize("p", [3, 11])  # 11 prompts: more than one of the fast decoder's chunks
def test_fast_paths_equal_the_plain_forms(no_tf32, p):
    m = on_device(random_model(seed=23))  # 1024 px: the ViT's global attention runs in blocks of query rows
    g = torch.Generator().manual_seed(p)
    pixels = torch.randn(1, 3, 1024, 1024, generator=g).to(DEVICE)
    (emb, inter), (emb0, inter0) = both(m, lambda: m.get_image_embeddings(pixels))
    close(emb, emb0)
    close(inter[0], inter0[0])
    hq = m.compute_hq_features(emb, inter)
    points = (torch.rand(1, p, 2, 2, generator=g) * 1024).to(DEVICE)
    labels = torch.randint(0, 2, (1, p, 2), generator=g).to(DEVICE)
    boxes = torch.sort(torch.rand(1, p, 2, 2, generator=g) * 1024, dim=2).values.reshape(1, p, 4).to(DEVICE)
    for prompts in (dict(input_points=points, input_labels=labels), dict(input_boxes=boxes),
                    dict(input_boxes=boxes, input_masks=torch.randn(1, p, 256, 256, generator=g).to(DEVICE))):
        (masks, iou), (masks0, iou0) = both(m, lambda kw=prompts: m.predict_all(emb, hq, **kw, context=m.decoder_context(emb)))
        close(masks, masks0)
        close(iou, iou0)
    fast, plain = both(m, lambda: m(pixel_values=pixels, input_boxes=boxes))
    close(fast.pred_masks, plain.pred_masks)


def test_fast_path_predictor_masks(no_tf32, model):
    gpu = on_device(model)

    def run():
        p = SamHQPredictor(gpu)
        p.set_image(IMAGE)
        return p.predict(point_coords=np.array([[100, 80], [250, 200]]), point_labels=np.array([1, 0]),
                         box=np.array([50, 40, 350, 260]), return_logits=True)

    fast, plain = both(gpu, run)
    for a, b in zip(fast, plain):
        close(a, b)


def tiny_trainer(tmp_path, device, bf16=False):
    from test_train import tiny_model  # a 128-pixel model: a training step in well under a second

    cfg = TrainConfig(recipe="hq", steps=2, batch_size=2, masks_per_image=2, warmup_steps=1, progress=False,
                      save_every=100, bf16=bf16)
    return Trainer(tiny_model(), SyntheticShapes(2, 64, seed=5), cfg, tmp_path / f"{device}-{bf16}", device=device)


def test_training_step_matches_the_cpu(tmp_path):
    with torch.enable_grad():
        cpu, gpu = tiny_trainer(tmp_path, "cpu"), tiny_trainer(tmp_path, DEVICE)
        assert next(gpu.model.parameters()).device.type == DEVICE
        out, out_g = cpu.train_step(), gpu.train_step()
        # the loss at every pixel (point_loss off) is deterministic: the same on both devices
        assert out_g["loss"] == pytest.approx(out["loss"], rel=1e-3)
        after, after_g = dict(cpu.model.named_parameters()), dict(gpu.model.named_parameters())
        lr = cpu.optimizer.param_groups[0]["lr"]
        for name in cpu.trainable:
            grad, grad_g = after[name].grad, after_g[name].grad.cpu()
            assert (grad_g - grad).abs().max() <= 1e-2 * grad.abs().max() + 1e-8, name
            # AdamW's first step moves each weight by about lr * sign(grad): where a gradient is ~0, the two devices
            # may round it to opposite signs, so single weights may differ by up to 2 lr, and few may
            diff = (after_g[name].detach().cpu() - after[name].detach()).abs()
            assert diff.max() <= 2.5 * lr and (diff > 1e-4).float().mean() <= 0.01, name
        bf16 = tiny_trainer(tmp_path, DEVICE, bf16=True).train_step()  # autocast to bfloat16 on the device
    assert np.isfinite(bf16["loss"]) and bf16["loss"] == pytest.approx(out["loss"], rel=0.05)


def test_sam2_predictor_matches_the_cpu():
    from sam2_ref import small_model

    model = small_model(seed=24)
    box, point = np.array([30, 40, 200, 220]), np.array([[120, 100]])

    def run(m):
        p = SamHQPredictor(m)
        p.set_image(IMAGE)
        return p.predict(point_coords=point, point_labels=np.array([1]), box=box, return_logits=True)

    masks, scores, low = run(model)
    masks_g, scores_g, low_g = run(on_device(model))
    assert_agree(masks_g, masks, scores_g, scores)
    assert_agree(low_g, low)
