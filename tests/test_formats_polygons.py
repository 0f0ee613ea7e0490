"""Masks -> polygons -> masks: exact on pixel edges, read correctly by pycocotools, and where
simplification (tolerance) and min_area lose what."""
import warnings

import numpy as np
import pytest

pytest.importorskip("rasterio")
pytest.importorskip("shapely")

from samhq.formats import mask_to_polygons, polygons_to_mask  # noqa: E402


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def shoelace(ring):
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def polygon_area(poly):
    return shoelace(poly[0]) + sum(shoelace(h) for h in poly[1:])  # holes run the other way: negative


def disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r


def blobs(seed, h=64, w=80, cell=4, p=0.45):
    """Blocky random regions: holes, several regions, diagonal touches, one-cell-wide parts."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // cell, w // cell)) < p
    return np.kron(coarse, np.ones((cell, cell), dtype=bool))


CASES = {
    "square": np.pad(np.ones((20, 20), bool), 5),
    "square with hole": np.pad(np.pad(np.zeros((6, 8), bool), 7, constant_values=True), 3),
    "touching diagonals": np.kron(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], bool), np.ones((9, 9), bool)),
    "thin lines": np.isin(np.arange(40) % 7, [0])[None, :].repeat(30, 0) | (np.arange(30) == 12)[:, None],
    "disc": disc(70, 90, 35.2, 40.7, 27.3),
    "ring of pixels": disc(50, 50, 25, 25, 20) & ~disc(50, 50, 25, 25, 19),
    "border": np.ones((13, 17), bool),
}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_exact(name):
    mask = CASES[name]
    polys = mask_to_polygons(mask)
    back = polygons_to_mask(polys, *mask.shape)
    assert back.dtype == bool and back.shape == mask.shape
    assert np.array_equal(back, mask), f"{name}: IoU {iou(back, mask):.4f}"
    # pixel-edge tracing: the polygons' area is the pixel count
    assert sum(polygon_area(p) for p in polys) == pytest.approx(mask.sum())


@pytest.mark.parametrize("seed", range(6))
def test_random_masks_round_trip_exactly(seed):
    # cell 1 makes pure noise: every kind of diagonal touch, one-pixel holes, holes touching their shell
    mask = blobs(seed, cell=1 if seed % 2 else 4)
    polys = mask_to_polygons(mask)
    assert np.array_equal(polygons_to_mask(polys, *mask.shape), mask)
    for poly in polys:
        assert all(r.dtype == np.float64 and r.ndim == 2 and r.shape[1] == 2 for r in poly)
        assert not np.array_equal(poly[0][0], poly[0][-1]), "the closing vertex is not repeated"
        assert shoelace(poly[0]) > 0 and all(shoelace(h) < 0 for h in poly[1:])  # orient(sign=1)
        assert (poly[0] == np.round(poly[0])).all()  # corners of pixels


def test_structure_holes_regions_diagonals():
    polys = mask_to_polygons(CASES["square with hole"])
    assert len(polys) == 1 and len(polys[0]) == 2
    np.testing.assert_array_equal(polys[0][0], [[3, 3], [25, 3], [25, 23], [3, 23]])  # 22 wide, 20 tall, on edges
    assert abs(polygon_area(polys[0])) == 22 * 20 - 8 * 6
    # diagonal neighbours are separate regions (4-connectivity), ordered by their first pixel
    polys = mask_to_polygons(CASES["touching diagonals"])
    assert [p[0].min(0).tolist() for p in polys] == [[0, 0], [9, 9], [18, 18]]
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []


def test_pycocotools_reads_edge_polygons_and_not_centre_contours():
    """COCO polygons are in edge coordinates: ours read back exactly; OpenCV's centre contours lose a row and a column."""
    mask_utils = pytest.importorskip("pycocotools.mask")
    cv2 = pytest.importorskip("cv2")
    mask = CASES["square"]
    h, w = mask.shape

    def coco_decode(rings):
        with warnings.catch_warnings():  # pycocotools' NumPy-2 copy-keyword notice
            warnings.simplefilter("ignore", DeprecationWarning)
            rles = mask_utils.frPyObjects([r.ravel().tolist() for r in rings], h, w)
            return mask_utils.decode(mask_utils.merge(rles)).astype(bool)

    ours = coco_decode([p[0] for p in mask_to_polygons(mask)])
    assert np.array_equal(ours, mask)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    theirs = coco_decode([c.reshape(-1, 2).astype(float) for c in contours])
    assert iou(theirs, mask) == pytest.approx(19 * 19 / 400)  # the 0.90 the issue quotes
    disc_mask = CASES["disc"]
    h, w = disc_mask.shape
    assert iou(coco_decode([p[0] for p in mask_to_polygons(disc_mask)]), disc_mask) >= 0.99


# ---------------------------------------------------------------------------------------------
# What simplification and min_area lose


def test_simplification_keeps_smooth_shapes():
    mask = CASES["disc"]
    exact = mask_to_polygons(mask)
    # measured on this disc (r = 27 px, 126 corners): 0.5 -> 96 vertices, IoU 1.0; 1 -> 16, 0.986; 2 -> 13, 0.972
    for tol, max_vertices, min_iou in [(0.5, 100, 1.0), (1.0, 20, 0.985), (2.0, 16, 0.97)]:
        simple = mask_to_polygons(mask, tolerance=tol)
        assert len(simple[0][0]) <= max_vertices < len(exact[0][0])
        assert iou(polygons_to_mask(simple, *mask.shape), mask) >= min_iou


def test_simplification_loses_details_of_about_the_tolerance():
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    mask[9, 20] = True  # a one-pixel bump on the top edge
    mask[20, 30] = True  # and one on the right edge
    # (tolerance, pixels lost, pixels added): at 0.9 each bump becomes a triangle covering 2 more pixel
    # centres; at 1 the bumps are cut off
    for tol, lost, added in [(0.0, 0, 0), (0.5, 0, 0), (0.9, 0, 4), (1.0, 2, 0)]:
        back = polygons_to_mask(mask_to_polygons(mask, tolerance=tol), 40, 40)
        assert ((mask & ~back).sum(), (back & ~mask).sum()) == (lost, added), tol
    # a one-pixel-wide line: kept at 0.5, a triangle losing half its pixels from 1 on
    line = np.zeros((10, 50), bool)
    line[5, 3:47] = True
    assert np.array_equal(polygons_to_mask(mask_to_polygons(line, tolerance=0.5), 10, 50), line)
    for tol in (1.0, 5.0):
        back = polygons_to_mask(mask_to_polygons(line, tolerance=tol), 10, 50)
        assert not (back & ~line).any() and back.sum() == 22
    # a two-pixel-wide diagonal staircase (one 4-connected region) at tolerance 2 loses about half
    stairs = np.eye(20, dtype=bool) | np.eye(20, k=1, dtype=bool)
    assert len(mask_to_polygons(stairs)) == 1
    back = polygons_to_mask(mask_to_polygons(stairs, tolerance=2.0), 20, 20)
    assert not (back & ~stairs).any() and back.sum() == 20 and stairs.sum() == 39


def test_min_area_drops_small_regions_and_fills_small_holes():
    mask = np.zeros((60, 60), bool)
    mask[5:45, 5:45] = True
    mask[10:12, 10:12] = False  # hole of 4 px^2
    mask[20:30, 20:30] = False  # hole of 100 px^2
    mask[50:53, 50:53] = True  # island of 9 px^2
    polys = mask_to_polygons(mask, min_area=10)
    assert len(polys) == 1 and len(polys[0]) == 2  # island gone, small hole filled, big hole kept
    back = polygons_to_mask(polys, 60, 60)
    expect = mask.copy()
    expect[10:12, 10:12] = True
    expect[50:53, 50:53] = False
    assert np.array_equal(back, expect)
    assert len(mask_to_polygons(mask, min_area=2000)) == 0  # 1600 - 104 = 1496 px^2 < 2000


def test_polygons_to_mask_clips_and_unions():
    a = [np.array([[-5.0, -5.0], [10.0, -5.0], [10.0, 10.0], [-5.0, 10.0]])]  # partly outside the image
    b = [np.array([[5.0, 5.0], [15.0, 5.0], [15.0, 15.0], [5.0, 15.0]])]
    out = polygons_to_mask([a, b], 20, 20)
    expect = np.zeros((20, 20), bool)
    expect[:10, :10] = True
    expect[5:15, 5:15] = True
    assert np.array_equal(out, expect)
    assert not polygons_to_mask([], 4, 6).any() and polygons_to_mask([], 4, 6).shape == (4, 6)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_polygons(np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError, match="tolerance"):
        mask_to_polygons(np.ones((3, 3), bool), tolerance=-1)
    with pytest.raises(ValueError, match=r"\(K, 2\)"):
        polygons_to_mask([[np.zeros((4, 3))]], 5, 5)
    with pytest.raises(ValueError, match="at least 1x1"):
        polygons_to_mask([], 0, 5)
    # numbers are thresholded at > 0
    assert np.array_equal(polygons_to_mask(mask_to_polygons(np.array([[0, 2], [0.5, 0]])), 2, 2), [[0, 1], [1, 0]])
