"""SamHQAutomaticMaskGenerator against the official SamAutomaticMaskGenerator (same random weights).

The model is a narrow ViT at image_size 256 so that hundreds of prompts decode in seconds. With
random weights every mask spreads over the whole image, so box NMS at its default threshold keeps
one mask; the tests that compare many masks raise the NMS thresholds to keep them all, and one
case keeps the defaults to exercise the suppression itself.
"""
import functools

import numpy as np
import pytest
import torch

from samhq import SamHQModel
from samhq import masks as M
from samhq.automatic import SamHQAutomaticMaskGenerator

from conftest import gap_threshold, random_model
from official_ref import load_official, official_like

sah = load_official()
needs_official = pytest.mark.skipif(sah is None, reason="segment-anything-hq is not installed")
NO_GRAD = True  # conftest runs this module's tests without autograd


def tiny_256_model() -> SamHQModel:
    return random_model(image_size=256, window_size=8)


@pytest.fixture(scope="module")
def model():
    return tiny_256_model()


@pytest.fixture(scope="module")
def image():
    g = np.random.default_rng(0)
    return np.kron(g.integers(0, 255, (6, 8, 3)), np.ones((40, 40, 1))).astype(np.uint8)  # 240 x 320


def assert_same_records(ours, ref):
    assert len(ours) == len(ref) > 0
    for a, b in zip(ours, ref):
        area = max(b["area"], 1)
        assert (a["segmentation"] != b["segmentation"]).sum() <= 1e-4 * area  # fp32 rounding flips boundary pixels
        assert abs(a["area"] - b["area"]) <= 1e-4 * area  # ... and the area follows them
        assert a["bbox"] == b["bbox"]
        assert a["crop_box"] == b["crop_box"]
        assert a["point_coords"][0] == pytest.approx(b["point_coords"][0])
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-4)
        assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-4)


@needs_official
@pytest.mark.parametrize(
    "kw",
    [
        dict(points_per_side=8, pred_iou_thresh=0.1, stability_score_thresh=0.3, box_nms_thresh=1.0),
        dict(points_per_side=4, pred_iou_thresh=0.1, stability_score_thresh=0.3, box_nms_thresh=1.0, crop_nms_thresh=1.0,
             crop_n_layers=1, min_mask_region_area=500),
        dict(points_per_side=4, pred_iou_thresh=0.1, stability_score_thresh=0.3, crop_n_layers=1, min_mask_region_area=500,
             points_per_batch=5),
    ],
    ids=["grid", "crops_small_regions", "crops_default_nms"],
)
def test_same_masks_as_official(model, image, kw):
    if kw.get("min_mask_region_area"):
        pytest.importorskip("cv2")  # the official small-region removal uses OpenCV
    ours = SamHQAutomaticMaskGenerator(model, **kw).generate(image)
    ref = sah.SamAutomaticMaskGenerator(official_like(model), **kw).generate(image)
    assert_same_records(ours, ref)
    if kw.get("min_mask_region_area"):
        # the small-region step really changed masks: none keeps a hole or island below the limit
        for r in ours:
            assert not M.remove_small_regions(r["segmentation"], 500, "islands")[1]


@needs_official
def test_points_failing_the_iou_filter_get_no_masks(model, image, monkeypatch):
    """A point whose predicted IoU fails pred_iou_thresh is not upscaled nor sent through the HQ branch (the
    official generator computes its mask, then drops it): same records as the official generator, fewer masks."""
    from samhq.modeling import fast_paths
    from samhq.predictor import SamHQPredictor

    p = SamHQPredictor(model)
    p.set_image(image)
    grid = M.build_point_grids(8, 0, 1)[0] * [image.shape[1], image.shape[0]]
    coords = torch.as_tensor(p.transform.apply_coords(grid, image.shape[:2]), dtype=torch.float)[:, None]
    iou = p.decode(coords, torch.ones(len(grid), 1, dtype=torch.int))[1][:, 0]
    t = gap_threshold(iou)
    calls = []
    prompt_masks = fast_paths._prompt_bands
    monkeypatch.setattr(fast_paths, "_prompt_bands", lambda *a: calls.append(1) or prompt_masks(*a))
    kw = dict(points_per_side=8, pred_iou_thresh=t, stability_score_thresh=0.0, box_nms_thresh=1.0)
    ours = SamHQAutomaticMaskGenerator(model, **kw).generate(image)
    assert sum(calls) == int((iou > t).sum()) < len(grid)
    assert_same_records(ours, sah.SamAutomaticMaskGenerator(official_like(model), **kw).generate(image))
    calls.clear()  # m2m needs every point's mask: nothing is skipped
    SamHQAutomaticMaskGenerator(model, **kw, use_m2m=True).generate(image)
    assert sum(calls) == 2 * len(grid)


@needs_official
@pytest.mark.parametrize("multimask, hq_only", [(False, False), (True, True)])
def test_mask_selection_options_match_official_predictor(model, image, multimask, hq_only):
    kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    ours = SamHQAutomaticMaskGenerator(model, **kw).generate(image, multimask_output=multimask, hq_token_only=hq_only)
    official = sah.SamAutomaticMaskGenerator(official_like(model), **kw)
    official.predictor.predict_torch = functools.partial(official.predictor.predict_torch, hq_token_only=hq_only)
    assert_same_records(ours, official.generate(image, multimask_output=multimask))


@pytest.fixture(scope="module")
def records(model, image):
    gen = SamHQAutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0.1, stability_score_thresh=0.3,
                                      box_nms_thresh=1.0)
    return gen.generate(image)


@pytest.mark.parametrize("mode", ["uncompressed_rle", "coco_rle"])
def test_output_modes_round_trip(model, image, records, mode):
    gen = SamHQAutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0.1, stability_score_thresh=0.3,
                                      box_nms_thresh=1.0, output_mode=mode)
    out = gen.generate(image)
    assert len(out) == len(records) > 0
    decode = M.rle_to_mask if mode == "uncompressed_rle" else M.coco_to_mask
    for a, b in zip(out, records):
        mask = decode(a["segmentation"])
        np.testing.assert_array_equal(mask, b["segmentation"])
        assert a["area"] == mask.sum() == b["area"]
        assert {k: v for k, v in a.items() if k != "segmentation"} == {k: v for k, v in b.items() if k != "segmentation"}


def test_records_are_consistent(image, records):
    for r in records:
        seg = r["segmentation"]
        assert seg.shape == image.shape[:2] and seg.dtype == bool
        assert r["area"] == seg.sum()
        ys, xs = np.nonzero(seg)
        assert r["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert r["crop_box"] == [0, 0, 320, 240]
        assert r["predicted_iou"] > 0.1 and r["stability_score"] >= 0.3
    ious = [r["predicted_iou"] for r in records]
    assert ious == sorted(ious, reverse=True)  # NMS returns the best first


def test_image_types_and_bad_arguments(model, image, records):
    from PIL import Image

    gen = SamHQAutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0.1, stability_score_thresh=0.3,
                                      box_nms_thresh=1.0)
    again = gen.generate(Image.fromarray(image))
    assert [r["bbox"] for r in again] == [r["bbox"] for r in records]
    with pytest.raises(ValueError, match="output_mode"):
        SamHQAutomaticMaskGenerator(model, output_mode="polygons")
    with pytest.raises(ValueError, match="exactly one"):
        SamHQAutomaticMaskGenerator(model, points_per_side=None)
    with pytest.raises(ValueError, match="no points"):
        SamHQAutomaticMaskGenerator(model, points_per_side=3, crop_n_layers=2, crop_n_points_downscale_factor=2)
    with pytest.raises(ValueError, match="point_grids"):
        SamHQAutomaticMaskGenerator(model, points_per_side=None, point_grids=[np.zeros((0, 2))])
    with pytest.raises(ValueError):
        gen.generate(np.zeros((1, 1, 3), np.uint8))
