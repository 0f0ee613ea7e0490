"""The one automatic mask generator with SAM 2 models: the records of Meta's `SAM2AutomaticMaskGenerator`
(PyPI sam2) on the same perturbed weights, for plain SAM 2 and for HQ-SAM 2 (SysCV's generator is Meta's
unchanged over the HQ decoder: `sam2_ref.hq_decoder_stand_in`), with `use_m2m`, single-mask output, crops
and `min_mask_region_area` (which for SAM 2 fills holes and removes sprinkles on the low-res logits; Meta's
CUDA connected components are replaced by scipy in the test). The SAM-HQ (v1) records against the
official generator stay in test_automatic.py. Random weights spread masks over the image, so most cases
lower the thresholds to keep many masks; one keeps Meta's defaults except the two score thresholds.
"""
import numpy as np
import pytest
import torch

import samhq
from samhq.automatic import FAMILY_DEFAULTS, SamHQAutomaticMaskGenerator
from samhq.predictor import SamHQPredictor

from conftest import gap_threshold
from sam2_ref import connected_components, load_sam2, meta_pair, small_model

sam2 = load_sam2()
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
needs_sam2 = pytest.mark.skipif(sam2 is None, reason="sam2 (and hydra-core) are not installed")
NO_GRAD = True
LOW = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


@pytest.fixture(scope="module")
def image():
    g = np.random.default_rng(0)
    return np.kron(g.integers(0, 255, (6, 8, 3)), np.ones((30, 30, 1))).astype(np.uint8)  # 180 x 240


@pytest.fixture(scope="module", params=["plain", "hq"])
def pair(request, tmp_path_factory):
    if sam2 is None:
        pytest.skip("sam2 (and hydra-core) are not installed")
    ref, ours, _ = meta_pair(tmp_path_factory.mktemp(request.param), hq=request.param == "hq")
    assert ours.hq_enabled is (request.param == "hq")
    return ref, ours


def meta_records(ref, image, **kw):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    gen = SAM2AutomaticMaskGenerator(ref, **kw)
    s = ref.image_size
    gen.predictor._bb_feat_sizes = [(s // 4,) * 2, (s // 8,) * 2, (s // 16,) * 2]
    return gen.generate(image)


def assert_same_records(ours, ref):
    assert len(ours) == len(ref) > 0
    for a, b in zip(ours, ref):
        assert (a["segmentation"] != b["segmentation"]).sum() <= 1e-3 * max(b["area"], 1)  # logits ~0 may flip
        assert abs(a["area"] - b["area"]) <= 1e-3 * max(b["area"], 1)
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1)
        assert a["crop_box"] == b["crop_box"]
        np.testing.assert_allclose(a["point_coords"], b["point_coords"], atol=1e-4)
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-4)
        assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-3)


@needs_sam2
@pytest.mark.parametrize("kw", [
    dict(points_per_side=4, **LOW),
    dict(points_per_side=4, use_m2m=True, **LOW),
    dict(points_per_side=4, multimask_output=False, **LOW),
    dict(points_per_side=3, crop_n_layers=1, crop_nms_thresh=1.0, min_mask_region_area=30, **LOW),
    dict(points_per_side=4, pred_iou_thresh=0.5, stability_score_thresh=0.3, points_per_batch=5),  # Meta's NMS defaults
], ids=["grid", "m2m", "single_mask", "crops_small_regions", "default_nms"])
def test_same_records_as_meta(pair, image, kw, monkeypatch):
    import sam2.utils.misc

    if kw.get("min_mask_region_area"):
        pytest.importorskip("cv2")  # Meta's small-region removal uses OpenCV
        monkeypatch.setattr(sam2.utils.misc, "get_connected_components", connected_components)
    ref, ours = pair
    mine = SamHQAutomaticMaskGenerator(ours, **kw).generate(image)
    assert_same_records(mine, meta_records(ref, image, **kw))
    if kw.get("pred_iou_thresh") == 0.5:  # Meta's box NMS at 0.7 dropped duplicates
        assert len(mine) < 3 * 16


@pytest.mark.parametrize("hq", [True, False])
def test_decoder_skips_the_masks_not_needed(hq):
    """`needed` rejects prompts by their IoU: their masks are NaN, every IoU and the kept prompts' masks are the full
    decode's, and only the kept prompts are upscaled (two images: each kept prompt adds its own image's features)."""
    model = small_model(hq=hq, seed=3)
    g = torch.Generator().manual_seed(0)
    emb, high_res = model.get_image_embeddings(torch.randn(2, 3, 256, 256, generator=g))
    points = torch.rand(2, 6, 1, 2, generator=g) * 256
    full, iou_full, obj = model.predict_all(emb, high_res, points)
    best = iou_full[..., 1:].amax(-1)
    t = gap_threshold(best)
    seen = []
    model.mask_decoder.upscale_conv1.register_forward_hook(lambda m, i, o: seen.append(len(o)))
    masks, iou, obj2 = model.predict_all(emb, high_res, points, needed=lambda x: x[..., 1:].amax(-1) > t)
    want = best > t
    assert seen == [int(want.sum())] and 0 < want.sum() < want.numel()
    assert torch.equal(iou, iou_full) and torch.equal(obj, obj2)
    assert masks[~want].isnan().all()
    torch.testing.assert_close(masks[want], full[want], rtol=0, atol=1e-5)


@needs_sam2
def test_points_failing_the_iou_filter_get_no_masks(pair, image):
    """A point none of whose three masks passes pred_iou_thresh is not upscaled: Meta's records, fewer masks made."""
    ref, ours = pair
    p = SamHQPredictor(ours)
    p.set_image(image)
    grid = samhq.masks.build_point_grids(4, 0, 1)[0] * [image.shape[1], image.shape[0]]
    coords = torch.as_tensor(p.transform.apply_coords(grid, image.shape[:2]), dtype=torch.float)[:, None]
    best = p.decode(coords, torch.ones(len(grid), 1, dtype=torch.int))[1].amax(1)  # three masks per point
    t = gap_threshold(best)
    seen = []
    hook = ours.mask_decoder.upscale_conv1.register_forward_hook(lambda m, i, o: seen.append(len(o)))
    try:
        kw = dict(points_per_side=4, pred_iou_thresh=t, stability_score_thresh=0.0, box_nms_thresh=1.0)
        mine = SamHQAutomaticMaskGenerator(ours, **kw).generate(image)
    finally:
        hook.remove()
    assert sum(seen) == int((best > t).sum()) < len(grid)
    assert_same_records(mine, meta_records(ref, image, **kw))


@needs_sam2
def test_min_region_area_cleans_the_low_res_logits(pair, image, monkeypatch):
    """For SAM 2 models `min_mask_region_area` is the predictor's max_hole_area / max_sprinkle_area (Meta's generator,
    which never calls its full-size step); without the low-res step the records differ from Meta's."""
    import sam2.utils.misc

    pytest.importorskip("cv2")
    monkeypatch.setattr(sam2.utils.misc, "get_connected_components", connected_components)
    ref, ours = pair
    kw = dict(points_per_side=4, min_mask_region_area=60, **LOW)
    gen = SamHQAutomaticMaskGenerator(ours, **kw)
    assert gen.predictor.max_hole_area == gen.predictor.max_sprinkle_area == 60
    theirs = meta_records(ref, image, **kw)
    assert_same_records(gen.generate(image), theirs)
    gen.predictor.max_hole_area = gen.predictor.max_sprinkle_area = 0
    without = gen.generate(image)
    assert [r["area"] for r in without] != [r["area"] for r in theirs]


def test_family_defaults_and_pipeline(tmp_path, image):
    """pred_iou_thresh follows the model family (0.88 SAM-HQ, 0.8 SAM 2); `samhq.pipeline` runs a SAM 2 checkpoint
    through the same generator, and a predictor over the onnxruntime engine gives the torch engine's records."""
    model = small_model(hq=True)
    assert SamHQAutomaticMaskGenerator(model).pred_iou_thresh == FAMILY_DEFAULTS["sam2"]["pred_iou_thresh"] == 0.8
    from conftest import random_model

    assert SamHQAutomaticMaskGenerator(random_model(image_size=256, window_size=8)).pred_iou_thresh == 0.88
    model.save_pretrained(tmp_path / "m")
    records = SamHQAutomaticMaskGenerator(model, points_per_side=3, output_mode="uncompressed_rle", **LOW).generate(image)
    out = samhq.pipeline("mask-generation", model=str(tmp_path / "m"))(image, points_per_side=3, use_m2m=False, **LOW)
    assert len(out["masks"]) == len(records) > 0
    for m, r in zip(out["masks"], records):
        np.testing.assert_array_equal(m, samhq.masks.rle_to_mask(r["segmentation"]))
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    onnx = SamHQAutomaticMaskGenerator(SamHQPredictor(model, engine="onnxruntime"), points_per_side=3,
                                       output_mode="uncompressed_rle", **LOW).generate(image)
    assert len(onnx) == len(records)
    for a, b in zip(onnx, records):
        assert abs(a["area"] - b["area"]) <= 1e-3 * b["area"]
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-4)


def test_m2m_refines_with_each_masks_own_logits():
    """use_m2m by hand: each first-pass mask, clamped to +-32, goes back in with its point, one mask out."""
    model = small_model(hq=False, seed=6)
    image = np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    gen = SamHQAutomaticMaskGenerator(model, points_per_side=None, point_grids=[np.array([[0.3, 0.4], [0.7, 0.6]])], use_m2m=True,
                                      **LOW)
    records = gen.generate(image)
    p = SamHQPredictor(model)
    p.set_image(image)
    want = []
    for x, y in ((0.3 * 80, 0.4 * 64), (0.7 * 80, 0.6 * 64)):
        _, _, lows = p.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]), multimask_output=True)
        for low in lows:
            assert np.abs(low).max() <= 32.0
            m, s, _ = p.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]), mask_input=low[None],
                                multimask_output=False)
            want.append((float(s[0]), int(m[0].sum())))
    got = sorted((r["predicted_iou"], r["area"]) for r in records)
    assert len(got) == len(want) == 6
    for (a_iou, a_area), (b_iou, b_area) in zip(got, sorted(want)):
        assert a_iou == pytest.approx(b_iou, abs=1e-5) and a_area == b_area
    assert torch.is_tensor(p.features)


@needs_sam2
@pytest.mark.parametrize("variant", ["hiera_s", "hiera_b+", "hiera_l"])
def test_same_records_as_meta_for_every_hiera_size(variant, image, tmp_path):
    """The records for the other sizes' structures (Hiera-T is above), plain SAM 2, a 3x3 grid, multimask."""
    ref, ours, _ = meta_pair(tmp_path, variant=variant)
    kw = dict(points_per_side=3, **LOW)
    assert_same_records(SamHQAutomaticMaskGenerator(ours, **kw).generate(image), meta_records(ref, image, **kw))
