import numpy as np
import pytest

from samhq.data.synthetic import KINDS, SyntheticShapes, coarsen, render_object
from samhq.eval.metrics import boundary_iou, mask_iou


def test_same_seed_and_index_give_the_same_item():
    a, b = SyntheticShapes(5, 96, seed=3), SyntheticShapes(5, 96, seed=3)
    for i in (0, 4, 2):  # any order: items depend only on (seed, index)
        x, y = a[i], b[i]
        np.testing.assert_array_equal(x["image"], y["image"])
        assert len(x["masks"]) == len(y["masks"]) and x["kinds"] == y["kinds"]
        for m, n in zip(x["masks"], y["masks"]):
            np.testing.assert_array_equal(m, n)
    np.testing.assert_array_equal(a[-1]["image"], a[4]["image"])


def test_different_seed_or_index_differs():
    a, b = SyntheticShapes(3, 96, seed=0), SyntheticShapes(3, 96, seed=1)
    assert not np.array_equal(a[0]["image"], b[0]["image"])
    assert not np.array_equal(a[0]["image"], a[1]["image"])


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_renders(kind):
    m = render_object(kind, 128, 128, np.random.default_rng(0))
    assert m.dtype == bool and m.shape == (128, 128) and m.any()
    ds = SyntheticShapes(2, (80, 120), seed=5, kinds=(kind,))
    for item in ds:
        assert item["image"].shape == (80, 120, 3) and item["image"].dtype == np.uint8
        assert item["masks"] and set(item["kinds"]) == {kind}
        for m in item["masks"]:
            assert m.shape == (80, 120) and m.dtype == bool and m.sum() >= 16


def test_masks_nonempty_and_do_not_overlap():
    ds = SyntheticShapes(12, 128, seed=7)
    for i in range(len(ds)):
        masks = ds[i]["masks"]
        assert 1 <= len(masks) <= 4
        assert all(m.any() for m in masks)
        assert (np.sum(masks, axis=0) <= 1).all()  # later objects occlude earlier ones


def test_thin_kinds_are_thin():
    # A wire is 1-3 px wide: eroding by 2 px leaves (almost) nothing.
    from samhq.masks import erode

    m = render_object("wire", 256, 256, np.random.default_rng(1))
    assert erode(m, 2).sum() <= 0.05 * m.sum()


def test_coarsen_removes_thin_parts_and_keeps_bodies():
    m = np.zeros((128, 128), bool)
    m[32:88, 32:88] = True  # aligned with coarsen's 4x4 cells, so only the wire changes
    m[60, 88:125] = True  # a 1 px wire sticking out
    c = coarsen(m)
    assert not c[60, 100:125].any()
    assert c[40:80, 40:80].all()
    assert mask_iou(m, c) > 0.95
    assert boundary_iou(m, c) < mask_iou(m, c)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown kinds"):
        SyntheticShapes(1, kinds=("blob",))
    with pytest.raises(ValueError, match="objects_per_image"):
        SyntheticShapes(1, objects_per_image=(3, 1))
    with pytest.raises(IndexError):
        SyntheticShapes(2)[2]
