import numpy as np
import pytest

from samhq.eval.metrics import boundary_iou, boundary_width, mask_boundary, mask_iou
from samhq.masks import dilate, erode


def _square(size, top, left, side_h, side_w=None):
    m = np.zeros((size, size), bool)
    m[top:top + side_h, left:left + (side_w or side_h)] = True
    return m


def test_mask_iou_hand_computed():
    gt = _square(10, 2, 2, 4)  # 16 pixels
    pred = _square(10, 2, 3, 4)  # shifted one column: 12 shared, 20 in the union
    assert mask_iou(gt, pred) == pytest.approx(12 / 20)
    assert mask_iou(gt, gt) == 1.0
    assert mask_iou(gt, np.zeros_like(gt)) == 0.0
    assert mask_iou(np.zeros_like(gt), np.zeros_like(gt)) == 1.0  # nothing to find, nothing found


def test_boundary_width_is_two_percent_of_the_diagonal():
    assert boundary_width(10, 10) == 1  # 0.28 px rounds to 0: at least 1
    assert boundary_width(100, 100) == 3  # 2.83
    assert boundary_width(75, 75) == 2  # 2.12
    assert boundary_width(480, 640) == 16  # diagonal 800
    assert boundary_width(100, 100, dilation_ratio=0.05) == 7  # 7.07


def test_boundary_band_hand_computed():
    # 100x100 image: d = 3. A 20x20 square's band is the square minus its 14x14 core.
    gt = _square(100, 10, 10, 20)
    band = mask_boundary(gt)
    assert band.sum() == 20 * 20 - 14 * 14
    assert band[10:13, 10:30].all() and not band[13:27, 13:27].any()
    # Shift by 2 columns: bands share the 20x18 overlap minus the union of the two 14x14 cores (14x16).
    pred = _square(100, 10, 12, 20)
    inter = 20 * 18 - 14 * 16
    assert boundary_iou(gt, pred) == pytest.approx(inter / (2 * 204 - inter))  # = 0.5


def test_boundary_iou_one_pixel_band():
    # 50x50: d = 1, so each band is the square's outer ring of 76 pixels; shifted by 2 they share 2 x 18.
    gt, pred = _square(50, 10, 10, 20), _square(50, 10, 12, 20)
    assert mask_boundary(gt).sum() == 76
    assert boundary_iou(gt, pred) == pytest.approx(36 / (76 + 76 - 36))


def test_image_border_counts_as_boundary():
    full = np.ones((10, 10), bool)
    assert mask_boundary(full).sum() == 36  # outer ring, as SAM-HQ's zero padding before erosion
    corner = np.zeros((100, 100), bool)
    corner[:10, :10] = True
    assert mask_boundary(corner).sum() == 100 - 4 * 4  # core eroded by 3 from every side, image edges included


def test_thin_structure_is_all_boundary():
    wire = np.zeros((100, 100), bool)
    wire[50, 10:90] = True
    assert (mask_boundary(wire) == wire).all()
    blob = dilate(wire, 5)  # a coarse mask that covers the wire
    assert mask_iou(wire, blob) == pytest.approx(80 / (90 * 11))
    # The blob's band (3 px inside its edge) misses the wire, which runs along the blob's core.
    assert boundary_iou(wire, blob) == 0.0
    assert boundary_iou(wire, wire | np.roll(wire, 1, axis=0)) == pytest.approx(0.5)


def test_morphology_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    square = np.ones((3, 3), bool)
    for _ in range(5):
        m = rng.random((37, 53)) < 0.6
        for r in (1, 2, 4):
            np.testing.assert_array_equal(erode(m, r), ndimage.binary_erosion(m, square, iterations=r, border_value=0))
            np.testing.assert_array_equal(dilate(m, r), ndimage.binary_dilation(m, square, iterations=r))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="shapes differ"):
        boundary_iou(np.zeros((4, 4)), np.zeros((5, 4)))
