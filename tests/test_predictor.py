"""`SamHQPredictor`: parity with the official `SamPredictor` (same random, perturbed weights) on whole
images at full resolution, plus embedding files, batching invariants and bad inputs."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from samhq import SamHQConfig, SamHQModel
from samhq.predictor import SamHQPredictor, model_fingerprint

from conftest import random_model
from official_ref import load_official, official_from_ours, perturb_

sah = load_official()
needs_official = pytest.mark.skipif(sah is None, reason="segment-anything-hq is not installed")
NO_GRAD = True  # conftest runs this module's tests without autograd

TOL = 1e-4


def small_256(seed=3) -> SamHQModel:
    """A narrow ViT with a 256-pixel input (16x16 embedding grid, 64x64 mask inputs)."""
    return random_model(seed, image_size=256)


def build(variant) -> SamHQModel:
    if variant == "small":
        return small_256()
    torch.manual_seed(0)
    return perturb_(SamHQModel(SamHQConfig.from_variant(variant)), seed=1).eval()


@pytest.fixture(scope="module")
def predictors():
    cache = {}

    def get(variant):
        if variant not in cache:
            ours = build(variant)
            cache[variant] = (SamHQPredictor(ours), sah.SamPredictor(official_from_ours(ours)))
        return cache[variant]

    return get


def make_image(h, w, seed=0):
    """Smooth blobs plus noise, so masks have structure at every scale."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c) * np.cos(5 * yy - c) for c in (0.0, 1.0, 2.0)], -1)
    return np.clip(127 + 100 * base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


IMAGES = {"landscape": (240, 320), "portrait": (300, 190), "very_small": (20, 300), "odd": (333, 251)}


def prompts(h, w):
    """Prompts in original-image pixels; every kind the predictor takes."""
    p = lambda fx, fy: [fx * w, fy * h]  # noqa: E731
    return {
        "point": dict(point_coords=np.array([p(0.4, 0.5)]), point_labels=np.array([1])),
        "points_neg": dict(point_coords=np.array([p(0.3, 0.3), p(0.7, 0.6), p(0.5, 0.9)]), point_labels=np.array([1, 0, 1])),
        "box": dict(box=np.array([*p(0.1, 0.2), *p(0.8, 0.9)])),
        "box_point": dict(box=np.array([*p(0.2, 0.1), *p(0.9, 0.7)]), point_coords=np.array([p(0.5, 0.4)]),
                          point_labels=np.array([1])),
    }


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def assert_same(ours, ref, what):
    (m, s, low), (rm, rs, rlow) = ours, ref
    assert m.shape == rm.shape and s.shape == rs.shape and low.shape == rlow.shape, what
    assert rel_err(low, rlow) < TOL, what
    assert np.abs(s - rs).max() < TOL, what
    assert rel_err(m, rm) < TOL, what
    # Binary masks: only pixels within float noise of the threshold may differ, at most 1 in 10,000.
    differ = (m > 0) != (rm > 0)
    assert differ.sum() <= max(1, differ.size // 10_000), what
    assert (np.abs(rm[differ]) < 1e-4 * np.abs(rm).max()).all(), what


# Every image on the small model; one on vit_tiny and one on vit_b keep the suite's CPU time low.
CASES = [("small", name) for name in IMAGES] + [("vit_tiny", "very_small")]
CASES.append(pytest.param("vit_b", "landscape", marks=pytest.mark.slow))


@needs_official
@pytest.mark.parametrize("variant,image_name", CASES)
def test_predict_matches_official_at_full_resolution(predictors, variant, image_name):
    ours, ref = predictors(variant)
    h, w = IMAGES[image_name]
    image = make_image(h, w, seed=len(image_name))
    ours.set_image(image)
    ref.set_image(image)
    assert ours.original_size == ref.original_size and ours.input_size == ref.input_size
    assert rel_err(ours.features, ref.features) < TOL
    for name, kw in prompts(h, w).items():
        for multimask in (True, False):
            for hq_only in (False, True):
                flags = dict(multimask_output=multimask, hq_token_only=hq_only, return_logits=True)
                assert_same(ours.predict(**kw, **flags), ref.predict(**kw, **flags), (name, multimask, hq_only))
    # A mask fed back from a previous prediction, with a new point.
    _, _, low = ref.predict(**prompts(h, w)["point"])
    kw = dict(point_coords=np.array([[0.6 * w, 0.3 * h]]), point_labels=np.array([1]), mask_input=low)
    for hq_only in (False, True):
        flags = dict(multimask_output=False, hq_token_only=hq_only, return_logits=True)
        assert_same(ours.predict(**kw, **flags), ref.predict(**kw, **flags), ("mask_input", hq_only))
    # Binary output is the thresholded logits.
    masks, _, _ = ours.predict(**prompts(h, w)["box"])
    logits, _, _ = ours.predict(**prompts(h, w)["box"], return_logits=True)
    assert masks.dtype == bool and (masks == (logits > 0)).all()


@needs_official
@pytest.mark.parametrize("variant", ["small"])
def test_predict_torch_many_prompts_matches_official(predictors, variant):
    ours, ref = predictors(variant)
    image = make_image(200, 300, seed=5)
    ours.set_image(image)
    ref.set_image(image)
    boxes = torch.tensor([[10.0, 20.0, 150.0, 180.0], [100.0, 5.0, 290.0, 120.0], [0.0, 0.0, 300.0, 200.0]])
    assert torch.equal(ours.transform.apply_boxes_torch(boxes, (200, 300)), ref.transform.apply_boxes_torch(boxes, (200, 300)))
    boxes = ref.transform.apply_boxes_torch(boxes, ref.original_size)
    points = ref.transform.apply_coords_torch(torch.tensor([[[50.0, 60.0], [200.0, 100.0]]] * 3), ref.original_size)
    labels = torch.tensor([[1, 0], [1, 1], [0, 1]])
    for kw in (dict(boxes=boxes), dict(point_coords=points, point_labels=labels),
               dict(point_coords=points, point_labels=labels, boxes=boxes)):
        for multimask in (True, False):
            a = ours.predict_torch(kw.get("point_coords"), kw.get("point_labels"), kw.get("boxes"),
                                   multimask_output=multimask, return_logits=True)
            b = ref.predict_torch(kw.get("point_coords"), kw.get("point_labels"), kw.get("boxes"),
                                  multimask_output=multimask, return_logits=True)
            assert_same([t.numpy() for t in a], [t.numpy() for t in b], (list(kw), multimask))


@needs_official
def test_transform_matches_official(predictors):
    ours, ref = predictors("small")
    for size in [(20, 300), (333, 251), (256, 256), (1000, 7)]:
        image = make_image(*size)
        assert (ours.transform.apply_image(image) == ref.transform.apply_image(image)).all()
        coords = np.array([[3.5, 7.25], [size[1], size[0]]])
        np.testing.assert_array_equal(ours.transform.apply_coords(coords, size), ref.transform.apply_coords(coords, size))
        box = np.array([[1.0, 2.0, 10.0, 12.0]])
        np.testing.assert_array_equal(ours.transform.apply_boxes(box, size), ref.transform.apply_boxes(box, size))


# ---- behaviour on the small model (no reference needed) ----------------------------------------


@pytest.fixture(scope="module")
def small():
    predictor = SamHQPredictor(small_256())
    image = make_image(90, 140, seed=7)
    predictor.set_image(image)
    return predictor, image


def test_prompts_reuse_the_image_work(small, monkeypatch):
    predictor, _ = small
    model = predictor.model
    assert predictor.hq_features.shape == (1, 32, 64, 64) and predictor.features.shape == (1, 256, 16, 16)
    calls = []
    monkeypatch.setattr(model, "get_image_embeddings", lambda *a, **k: calls.append("encoder"))
    monkeypatch.setattr(model, "compute_hq_features", lambda *a, **k: calls.append("hq"))
    monkeypatch.setattr(model.mask_decoder, "hq_features", lambda *a, **k: calls.append("hq"))
    predictor.predict(point_coords=np.array([[30, 40]]), point_labels=np.array([1]))
    predictor.predict(box=np.array([10, 10, 80, 60]), hq_token_only=True)
    assert calls == []


def test_predict_torch_batch_equals_single_calls(small):
    predictor, _ = small
    boxes = np.array([[5, 5, 60, 70], [40, 20, 130, 85], [0, 0, 139, 89]], dtype=float)
    tb = torch.as_tensor(predictor.transform.apply_boxes(boxes, predictor.original_size), dtype=torch.float)
    masks, scores, low = predictor.predict_torch(None, None, tb, return_logits=True)
    assert masks.shape == (3, 1, 90, 140) and scores.shape == (3, 1) and low.shape == (3, 1, 64, 64)
    for i, box in enumerate(boxes):
        m, s, lo = predictor.predict(box=box, return_logits=True)
        np.testing.assert_allclose(m, masks[i].numpy(), rtol=0, atol=1e-4 * np.abs(m).max())
        np.testing.assert_allclose(s, scores[i].numpy(), atol=1e-5)
    # masks alone, several at once, equal one at a time
    masks2, _, _ = predictor.predict_torch(None, None, mask_input=low, return_logits=True)
    m, _, _ = predictor.predict(mask_input=low[1].numpy(), return_logits=True)
    np.testing.assert_allclose(m, masks2[1].numpy(), rtol=0, atol=1e-4 * np.abs(m).max())


def test_upscale_masks_maps_low_res_logits_to_the_image(small):
    predictor, _ = small
    _, _, low = predictor.predict(point_coords=np.array([[70, 45]]), point_labels=np.array([1]))
    full = predictor.upscale_masks(torch.as_tensor(low))
    logits, _, _ = predictor.predict(point_coords=np.array([[70, 45]]), point_labels=np.array([1]), return_logits=True)
    assert full.shape == (1, 90, 140)
    np.testing.assert_allclose(full.numpy(), logits, atol=1e-5)
    # a constant low-res mask stays constant at full resolution
    assert torch.allclose(predictor.upscale_masks(torch.full((2, 3, 64, 64), 2.5)), torch.tensor(2.5))


def test_image_kinds_and_bgr_give_the_same_embedding(small, tmp_path):
    predictor, image = small
    ref = predictor.features.clone()
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    other = SamHQPredictor(predictor.model)
    for source, fmt in [(Image.fromarray(image), "RGB"), (str(path), "RGB"), (image[..., ::-1].copy(), "BGR"),
                        (torch.as_tensor(image).permute(2, 0, 1), "RGB")]:
        other.set_image(source, image_format=fmt)
        assert torch.equal(other.features, ref)


def test_embedding_file_round_trip(small, tmp_path):
    predictor, image = small
    path = predictor.save_image_embedding(tmp_path / "emb.safetensors")
    with pytest.raises(FileExistsError, match="already exists"):
        predictor.save_image_embedding(path)
    fresh = SamHQPredictor(predictor.model)
    fresh.load_image_embedding(path, original_size=image.shape[:2])
    assert fresh.is_image_set and fresh.original_size == (90, 140) and fresh.input_size == predictor.input_size
    kw = dict(point_coords=np.array([[30, 40], [100, 70]]), point_labels=np.array([1, 0]), return_logits=True)
    assert torch.equal(fresh.features, predictor.features) and torch.equal(fresh.hq_features, predictor.hq_features)
    for a, b in zip(fresh.predict(**kw), predictor.predict(**kw)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_embedding_refused_for_another_model_or_image(small, tmp_path):
    predictor, _ = small
    path = predictor.save_image_embedding(tmp_path / "emb.safetensors")
    other = SamHQPredictor(small_256(seed=11))
    with pytest.raises(ValueError, match="another model"):
        other.load_image_embedding(path)
    with pytest.raises(ValueError, match=r"made for a 90x140 \(HxW\) image, not 100x140"):
        SamHQPredictor(predictor.model).load_image_embedding(path, original_size=(100, 140))
    # A decoder fine-tuned on the frozen encoder (as SAM-HQ is trained) shares the embeddings.
    tuned = small_256()
    perturb_(tuned.mask_decoder, seed=12)
    assert model_fingerprint(tuned) == model_fingerprint(predictor.model)
    SamHQPredictor(tuned).load_image_embedding(path)
    bad = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="not a samhq image embedding"):
        other.load_image_embedding(bad)
    with pytest.raises(ValueError, match="not found"):
        other.load_image_embedding(tmp_path / "missing.safetensors")


PT = np.array([[30.0, 40.0]])
BAD = [
    (dict(point_coords=PT, point_labels=np.array([1, 0])), "1 points but 2 labels"),
    (dict(point_coords=PT), "point_labels are required"),
    (dict(point_coords=np.array([[np.nan, 3.0]]), point_labels=np.array([1])), "NaN or infinite"),
    (dict(point_coords=np.array([[np.inf, 3.0]]), point_labels=np.array([1])), "NaN or infinite"),
    (dict(box=np.array([50, 10, 20, 60])), "x1 >= x0 and y1 >= y0"),
    (dict(box=np.array([10, 60, 20, 50])), "x1 >= x0 and y1 >= y0"),
    (dict(box=np.array([10, 6, 20])), "4 numbers"),
    (dict(mask_input=np.zeros((1, 256, 256))), r"mask_input must be \(1, 64, 64\)"),
    (dict(), "give a prompt"),
    (dict(point_coords=PT, point_labels=np.array([5])), "point labels must be"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_prompts_are_one_line_errors(small, kwargs, message):
    predictor, _ = small
    with pytest.raises(ValueError, match=message) as e:
        predictor.predict(**kwargs)
    assert "\n" not in str(e.value)


def test_bad_torch_prompts(small):
    predictor, _ = small
    with pytest.raises(ValueError, match="must be \\(B, N\\)"):
        predictor.predict_torch(torch.zeros(2, 3, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="batch sizes disagree"):
        predictor.predict_torch(torch.zeros(2, 1, 2), torch.ones(2, 1), boxes=torch.tensor([[0.0, 0, 5, 5]]))
    with pytest.raises(ValueError, match="x1 >= x0"):
        predictor.predict_torch(None, None, boxes=torch.tensor([[9.0, 0, 5, 5]]))


def test_points_outside_the_image_warn_but_work(small):
    predictor, _ = small
    with pytest.warns(UserWarning, match=r"point \(-5, 40\) lies outside the 140x90 image"):
        masks, _, _ = predictor.predict(point_coords=np.array([[-5, 40]]), point_labels=np.array([1]))
    assert masks.shape == (1, 90, 140)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor.predict(point_coords=np.array([[140, 90]]), point_labels=np.array([1]))  # the far corner is inside


def test_bad_images_and_missing_image(tmp_path):
    predictor = SamHQPredictor(small_256())
    with pytest.raises(RuntimeError, match="call predictor.set_image"):
        predictor.predict(point_coords=PT, point_labels=np.array([1]))
    with pytest.raises(RuntimeError, match="no image is set"):
        predictor.get_image_embedding()
    for image, message in [(np.zeros((0, 5, 3), np.uint8), "empty"), (np.zeros((1, 1, 3), np.uint8), "single pixel"),
                           (np.zeros((1, 900, 3), np.uint8), "too thin"), (tmp_path / "nope.png", "not found")]:
        with pytest.raises(ValueError, match=message):
            predictor.set_image(image)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read .* as an image"):
        predictor.set_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="image_format"):
        predictor.set_image(np.zeros((4, 4, 3), np.uint8), image_format="HSV")
    predictor.set_image(make_image(30, 40))
    assert predictor.is_image_set
    predictor.reset_image()
    assert not predictor.is_image_set and predictor.features is None


def test_plain_sam_model(tmp_path):
    model = small_256()
    model.hq_enabled = False
    predictor = SamHQPredictor(model)
    predictor.set_image(make_image(40, 60))
    assert predictor.hq_features is None
    masks, scores, _ = predictor.predict(point_coords=np.array([[20, 20]]), point_labels=np.array([1]))
    assert masks.shape == (3, 40, 60) and scores.shape == (3,)  # SAM's three masks, as segment_anything
    with pytest.raises(ValueError, match="HQ"):
        predictor.predict(point_coords=np.array([[20, 20]]), point_labels=np.array([1]), hq_token_only=True)


def test_from_pretrained(tmp_path):
    model = small_256()
    model.save_pretrained(tmp_path / "m")
    predictor = SamHQPredictor.from_pretrained(tmp_path / "m")
    assert predictor.image_size == 256 and predictor.mask_size == 64
    assert model_fingerprint(predictor.model) == model_fingerprint(model)
