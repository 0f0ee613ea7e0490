"""samhq.masks against the official `segment_anything_hq.utils.amg` functions and hand-made cases."""
import numpy as np
import pytest
import torch

from samhq import masks as M

from official_ref import _batched_nms, load_official

sah = load_official()
needs_official = pytest.mark.skipif(sah is None, reason="segment-anything-hq is not installed")
amg = sah.utils.amg if sah is not None else None


def _blobs(n, h, w, seed=0):
    """Random bool masks with several blobs, holes and specks: (n, h, w)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 1, h // 8 + 1, w // 8 + 1, generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    specks = torch.rand(n, h, w, generator=g) < 0.01
    return (smooth > 0.3) ^ specks


@needs_official
@pytest.mark.parametrize("n, layers, scale", [(8, 0, 1), (32, 2, 2), (5, 1, 1), (16, 3, 2)])
def test_point_grids_match_official(n, layers, scale):
    ours = M.build_point_grids(n, layers, scale)
    ref = amg.build_all_layer_point_grids(n, layers, scale)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


@needs_official
@pytest.mark.parametrize("size", [(480, 640), (1000, 333), (37, 1500), (1024, 1024)])
@pytest.mark.parametrize("layers", [0, 1, 2])
@pytest.mark.parametrize("overlap", [512 / 1500, 0.0, 0.5])
def test_crop_boxes_match_official(size, layers, overlap):
    assert M.generate_crop_boxes(size, layers, overlap) == amg.generate_crop_boxes(size, layers, overlap)


@needs_official
def test_stability_score_matches_official():
    logits = torch.randn(6, 70, 90, generator=torch.Generator().manual_seed(1)) * 3
    for offset in (1.0, 0.5):
        torch.testing.assert_close(M.stability_score(logits, 0.0, offset), amg.calculate_stability_score(logits, 0.0, offset))


def test_stability_score_by_hand():
    logits = torch.tensor([[[2.0, 0.5], [-0.5, -2.0]]])  # > 1: 1 pixel; > -1: 3 pixels
    assert M.stability_score(logits, 0.0, 1.0).item() == pytest.approx(1 / 3)


@needs_official
def test_masks_to_boxes_matches_official():
    masks = _blobs(5, 40, 50)
    masks[1] = False  # empty
    masks[2] = False
    masks[2, 7, 9] = True  # a single pixel
    torch.testing.assert_close(M.masks_to_boxes(masks), amg.batched_mask_to_box(masks))
    four_d = masks.reshape(5, 1, 40, 50).expand(5, 2, 40, 50)
    torch.testing.assert_close(M.masks_to_boxes(four_d), amg.batched_mask_to_box(four_d))
    assert M.masks_to_boxes(masks[2]).tolist() == [9, 7, 9, 7]


def test_box_nms_by_hand():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=torch.float32)
    scores = torch.tensor([0.5, 0.9, 0.3, 0.5])
    # box 1 (0.9) suppresses 0 and 3 (IoU 0.81); box 2 is apart
    assert M.box_nms(boxes, scores, 0.7).tolist() == [1, 2]
    # at a higher threshold the tie between 0 and 3 is broken by input order, then 3 falls to 0
    assert M.box_nms(boxes, scores, 0.85).tolist() == [1, 0, 2]
    assert M.box_nms(boxes[:0], scores[:0], 0.5).tolist() == []


def test_box_nms_matches_a_plain_loop():
    g = torch.Generator().manual_seed(5)
    xy = torch.randint(0, 80, (300, 2), generator=g)
    wh = torch.randint(1, 40, (300, 2), generator=g)
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.randint(0, 4, (300,), generator=g).float()  # many ties
    for t in (0.3, 0.7):
        ref = _batched_nms(boxes.float(), scores, torch.zeros(300), t)
        assert M.box_nms(boxes, scores, t).tolist() == ref.tolist()


@needs_official
def test_box_edge_filter_and_uncrop_match_official():
    g = torch.Generator().manual_seed(2)
    boxes = torch.randint(0, 300, (200, 4), generator=g)
    boxes[:, 2:] += boxes[:, :2]
    for crop in ([0, 0, 600, 500], [100, 50, 400, 420]):
        ours = M.is_box_near_crop_edge(boxes, crop, [0, 0, 600, 500])
        assert ours.tolist() == amg.is_box_near_crop_edge(boxes, crop, [0, 0, 600, 500]).tolist()
    masks = _blobs(3, 30, 40)
    for crop in ([0, 0, 40, 30], [5, 7, 45, 37]):
        assert torch.equal(M.uncrop_masks(masks, crop, 50, 60), amg.uncrop_masks(masks, crop, 50, 60))


@needs_official
def test_rle_matches_official_and_round_trips():
    masks = _blobs(6, 33, 47, seed=3)
    masks[0] = True
    masks[1] = False
    masks[2, 0, 0] = True  # starts with a one: RLE starts with a zero-length run
    ours = M.mask_to_rle(masks)
    assert ours == amg.mask_to_rle_pytorch(masks)
    for rle, mask in zip(ours, masks.numpy()):
        assert M.area_from_rle(rle) == mask.sum()
        np.testing.assert_array_equal(M.rle_to_mask(rle), mask)
        np.testing.assert_array_equal(M.rle_to_mask(rle), amg.rle_to_mask(rle))
        coco = M.rle_to_coco(rle)
        assert coco == amg.coco_encode_rle(rle)
        assert isinstance(coco["counts"], str)
        assert M.mask_to_coco(mask) == coco  # straight from the mask, the same encoding
        np.testing.assert_array_equal(M.coco_to_mask(coco), mask)


def test_coco_rle_without_pycocotools_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pycocotools", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'samhq\[amg\]'"):
        M.mask_to_coco(np.ones((2, 2), bool))


def test_rle_of_no_masks_and_bad_rle():
    assert M.mask_to_rle(torch.zeros(0, 4, 5, dtype=torch.bool)) == []
    with pytest.raises(ValueError, match="sum to"):
        M.rle_to_mask({"size": [2, 2], "counts": [1, 2]})


def test_remove_small_regions_by_hand():
    mask = np.zeros((10, 10), bool)
    mask[1:8, 1:8] = True
    mask[4, 4] = False  # a one-pixel hole
    mask[9, 9] = True  # a one-pixel island (8-connected to nothing)
    filled, changed = M.remove_small_regions(mask, 2, "holes")
    assert changed and filled[4, 4] and filled[9, 9]
    cleaned, changed = M.remove_small_regions(filled, 2, "islands")
    assert changed and not cleaned[9, 9] and cleaned[1:8, 1:8].all()
    same, changed = M.remove_small_regions(cleaned, 2, "islands")
    assert not changed and same is cleaned
    only_small, _ = M.remove_small_regions(mask, 1000, "islands")  # every island small: keep the largest
    assert only_small.sum() == 48 and not only_small[9, 9]


@needs_official
@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("area", [3, 40, 5000])
def test_remove_small_regions_matches_official(mode, area):
    pytest.importorskip("cv2")
    for mask in _blobs(4, 60, 70, seed=7).numpy():
        ours, changed = M.remove_small_regions(mask, area, mode)
        ref, ref_changed = amg.remove_small_regions(mask, area, mode)
        assert changed == ref_changed
        np.testing.assert_array_equal(ours, ref)


def test_best_mask_one_per_prompt():
    """Three candidates: the best scored one; HQ-SAM 2's single HQ mask with three scores: that mask, top score."""
    from samhq.masks import best_mask

    m = np.zeros((3, 2, 2), bool)
    m[1, 0, 0] = True
    s = np.array([0.1, 0.9, 0.3], np.float32)
    mask, score = best_mask(m, s)
    assert mask.tolist() == [[True, False], [False, False]] and score == np.float32(0.9)
    mask, score = best_mask(m[:1], s)
    assert not mask.any() and score == np.float32(0.9)
    masks, scores = best_mask(np.stack([m, m[[2, 0, 1]]]), np.stack([s, s]))  # a batch of two prompts
    assert masks[0, 0, 0] and not masks[1].any() and scores.tolist() == [np.float32(0.9)] * 2
