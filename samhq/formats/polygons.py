"""Masks to polygons and back, on pixel edges.

Coordinate frame: pixel (row i, column j) is the unit square x in [j, j+1], y in [i, i+1]; x runs
right and y down. A polygon traced in this frame follows the pixels' outer EDGES, so its area is the
mask's pixel count and rasterizing it by the pixel-centre rule gives the mask back exactly. (Contours
through pixel CENTRES, OpenCV's `findContours`, enclose half a pixel less on every side: read back
by pycocotools a 20x20 square loses its bottom row and right column, IoU 0.90.)

Tracing uses rasterio.features.shapes (GDAL's polygonizer, which walks pixel edges) and
rasterio.features.rasterize (GDAL's pixel-centre fill); simplification and areas use shapely. Both
are the `formats` extra: pip install 'samhq[formats]'.

A polygon is a list of rings: the outer ring first, then its holes. A ring is a float64 (K, 2)
array of (x, y) vertices without the closing vertex repeated; outer rings run counter-clockwise and
holes clockwise by the sign of their area in the (x, y) frame (shapely's `orient(sign=1.0)`), which
on screen, with y pointing down, looks clockwise for outer rings.
"""
from __future__ import annotations

import numpy as np

EXTRA_HINT = "pip install 'samhq[formats]' (rasterio and shapely)"


def _libs():
    """(rasterio.features, shapely) or an ImportError naming the extra."""
    try:
        import rasterio.features
        import shapely
    except ImportError as e:
        raise ImportError(f"mask polygons need rasterio and shapely ({e.name} is missing): {EXTRA_HINT}") from None
    return rasterio.features, shapely


def _check_mask(mask) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype != bool:
        if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
            raise ValueError(f"a mask must be bool or numeric, got dtype {mask.dtype}")
        mask = mask > 0
    return mask


def _to_shapely(polygon):
    from shapely.geometry import Polygon

    rings = [np.asarray(r, dtype=np.float64) for r in polygon]
    for r in rings:
        if r.ndim != 2 or r.shape[1] != 2:
            raise ValueError(f"a polygon ring must be a (K, 2) array of x, y; got shape {r.shape}")
    return Polygon(rings[0], rings[1:])


def _rings(poly) -> list[np.ndarray]:
    """shapely Polygon -> [outer, *holes] as (K, 2) float64 arrays without the closing vertex."""
    return [np.asarray(poly.exterior.coords, dtype=np.float64)[:-1]] + [
        np.asarray(h.coords, dtype=np.float64)[:-1] for h in poly.interiors
    ]


def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.0, min_area: float = 0.0) -> list[list[np.ndarray]]:
    """Trace a binary mask's regions as polygons along pixel edges.

    mask: (H, W) bool (numbers are read as `mask > 0`).
    tolerance: Douglas-Peucker simplification tolerance in pixels (shapely's `simplify` with
        `preserve_topology=True`); 0 keeps every corner, so the polygons are exact.
    min_area: regions, and holes, whose polygon area in square pixels is below this are dropped
        (a dropped hole is filled). Applied after simplification.
    Returns one entry per 4-connected region, ordered by the region's top-left-most pixel: a list of
    rings, the outer ring first and then its holes, each a float64 (K, 2) array of (x, y) in
    pixel-edge coordinates (see the module docstring), the closing vertex not repeated. Diagonal
    neighbours are separate regions (GDAL's 4-connectivity), so every polygon is valid (OGC).

    What simplification loses: vertices closer than `tolerance` to the simplified outline go, so
    boundary details of about the tolerance or smaller change (measured in the tests): at 1 px a
    one-pixel bump is cut off, a one-pixel-wide line becomes a triangle and loses half its pixels,
    and a two-pixel-wide diagonal staircase at 2 px loses half; just below 1 px a bump becomes a
    triangle that covers 2 more pixel centres; 0.5 px changes no pixel of a smooth shape. Regions and
    holes that simplify to nothing are dropped. tolerance = 0 loses nothing.
    Raises ValueError for a mask that is not 2-D, ImportError without rasterio/shapely.
    """
    features, _ = _libs()
    mask = _check_mask(mask)
    if tolerance < 0 or min_area < 0 or not np.isfinite(tolerance) or not np.isfinite(min_area):
        raise ValueError(f"tolerance and min_area must be finite and >= 0, got {tolerance}, {min_area}")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return []
    # Trace only the mask's bounding box (much faster for small objects in big images), then shift.
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.ascontiguousarray(mask[y0:y1, x0:x1], dtype=np.uint8)
    from rasterio.transform import Affine
    from shapely.geometry import Polygon, shape
    from shapely.geometry.polygon import orient

    out = []
    shift = Affine.translation(float(x0), float(y0))
    for geometry, _ in features.shapes(crop, mask=crop.astype(bool), connectivity=4, transform=shift):
        poly = shape(geometry)
        if tolerance > 0:
            poly = poly.simplify(tolerance, preserve_topology=True)
        if min_area > 0 and not poly.is_empty:
            poly = Polygon(poly.exterior, [h for h in poly.interiors if Polygon(h).area >= min_area])
        if poly.is_empty or poly.area <= 0 or poly.area < min_area:
            continue
        out.append(_rings(orient(poly, sign=1.0)))
    # GDAL yields regions in scan order of their first pixel already; sort to make that a contract.
    out.sort(key=lambda rings: (rings[0][:, 1].min(), rings[0][rings[0][:, 1] == rings[0][:, 1].min(), 0].min()))
    return out


def polygons_to_mask(polygons, height: int, width: int) -> np.ndarray:
    """Rasterize polygons (as `mask_to_polygons` returns them) into an (height, width) bool mask.

    A pixel is set when its centre (j + 0.5, i + 0.5) lies inside a polygon (GDAL's rasterizer, via
    rasterio.features.rasterize), holes excluded; overlapping polygons are a union. For unsimplified
    polygons from `mask_to_polygons` this is the exact inverse (no pixel centre lies on an edge).
    Raises ValueError for malformed rings or sizes below 1, ImportError without rasterio/shapely.
    """
    features, _ = _libs()
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be at least 1x1, got {width}x{height}")
    shapes = [(_to_shapely(p), 1) for p in polygons if len(p) and len(p[0]) >= 3]
    shapes = [(g, v) for g, v in shapes if not g.is_empty]
    if not shapes:
        return np.zeros((height, width), dtype=bool)
    return features.rasterize(shapes, out_shape=(height, width), fill=0, dtype=np.uint8, all_touched=False).astype(bool)
