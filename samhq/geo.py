"""Georeferenced rasters: (Big)GeoTIFF read in windows, masks back as GeoTIFF, GeoJSON (WGS 84) and GeoPackage.

    from samhq.geo import RasterSource, write_label_geotiff, to_wgs84_geojson, write_vector
    src = RasterSource("scene.tif")                        # nothing read yet
    objects = TiledMaskGenerator(model).objects(src)       # or TiledPredictor(model).set_image(src) ...
    write_label_geotiff("labels.tif", objects, src)        # uint16/uint32 labels, src's transform and CRS
    json.dump(to_wgs84_geojson(objects, src), open("objects.geojson", "w"))   # RFC 7946: lon/lat
    write_vector("objects.gpkg", objects, src)             # the source CRS (GeoPackage, or .shp)

Frames: a raster's affine `transform` maps pixel-edge coordinates (column x, row y; pixel (i, j)
is the square [j, j+1] x [i, i+1]) to map coordinates in its CRS, as rasterio/GDAL define it;
`samhq.formats.mask_to_polygons` traces masks in that pixel-edge frame, so polygons land exactly
on the pixels' edges on the map. Prompts in map coordinates (`prompts_from_geojson`) go the other
way: GeoJSON (WGS 84 unless it carries a `crs` member) -> the raster's CRS -> pixels.

Memory: `RasterSource.read` reads one window (GDAL's decimated read for coarse pyramid levels)
with GDAL's block cache capped (`cache_mb`, default 32), and `write_label_geotiff` writes block
by block, so a run's memory grows with the tile and the objects found, not with the raster.

Needs the `geo` extra: pip install 'samhq[geo]' (rasterio, pyproj, shapely, pyogrio).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EXTRA = "pip install 'samhq[geo]'"


def _rasterio():
    try:
        import rasterio
        import rasterio.windows  # noqa: F401
    except ImportError:
        raise ImportError(f"georeferenced rasters need rasterio: {EXTRA}") from None
    return rasterio


def _pyproj():
    try:
        import pyproj
    except ImportError:
        raise ImportError(f"reprojection needs pyproj: {EXTRA}") from None
    return pyproj


# ---------------------------------------------------------------------------------------------
# Reading in windows


class RasterSource:
    """A raster file (GeoTIFF, BigTIFF, anything GDAL reads) as a window source for `samhq.tiles`.

    bands: the 1-based bands to use as R, G, B (default 1, 2, 3, or band 1 repeated for a
    single-band raster). value_range: (low, high) mapped linearly to 0..255 (e.g. (0, 4095) for
    12-bit imagery); default: the dtype's rules of `samhq.image_io` (uint8 as is, 16-bit divided by
    257, floats in [0, 1]). cache_mb: GDAL's block cache while reading. Attributes: shape (H, W),
    transform (affine, pixel -> map), crs (a rasterio CRS or None), profile.
    Raises ValueError for a file GDAL cannot open or bands it does not have.
    """

    def __init__(self, path, bands=None, value_range=None, cache_mb: int = 32) -> None:
        rasterio = _rasterio()
        self.path = Path(path)
        try:
            self.dataset = rasterio.open(self.path)
        except rasterio.errors.RasterioIOError as e:
            raise ValueError(f"cannot open raster {self.path}: {e}") from None
        ds = self.dataset
        n = ds.count
        self.bands = list(bands) if bands is not None else ([1, 2, 3] if n >= 3 else [1])
        if any(b < 1 or b > n for b in self.bands) or len(self.bands) not in (1, 3):
            raise ValueError(f"{self.path} has {n} band(s); bands must be 1 or 3 of 1..{n}, got {self.bands}")
        self.value_range = value_range
        self.cache_mb = int(cache_mb)
        self.shape = (ds.height, ds.width)
        self.transform, self.crs, self.profile = ds.transform, ds.crs, ds.profile

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.dataset.close()

    def read(self, box, out_shape=None) -> np.ndarray:
        """Pixels of box (x0, y0, x1, y1) as (h, w, 3) uint8, resampled (bilinear) to out_shape (h, w) when given."""
        rasterio = _rasterio()
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        x0, y0, x1, y1 = (int(v) for v in box)
        h, w = out_shape if out_shape is not None else (y1 - y0, x1 - x0)
        with rasterio.Env(GDAL_CACHEMAX=self.cache_mb * 2**20):
            arr = self.dataset.read(self.bands, window=Window(x0, y0, x1 - x0, y1 - y0), out_shape=(len(self.bands), h, w),
                                    resampling=Resampling.bilinear)
        arr = np.moveaxis(arr, 0, -1)
        if self.value_range is not None:
            lo, hi = self.value_range
            arr = np.clip((arr.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)
        from .image_io import to_rgb_array

        return to_rgb_array(arr)


# ---------------------------------------------------------------------------------------------
# Objects: mask crops in image pixels


def _objects(objects) -> list[dict]:
    """Objects as dicts with mask (h, w) bool crop and box (x0, y0, x1, y1), plus optional score / category_id.

    Accepts `samhq.tiles.Region`s, `merge_tile_masks` / `TiledMaskGenerator.objects` dicts, or dicts
    with a full-size "segmentation" (bool array or RLE) as the generators return them.
    """
    from .masks import coco_to_mask, rle_to_mask

    out = []
    for o in objects:
        if hasattr(o, "mask") and hasattr(o, "box"):
            out.append({"mask": o.mask, "box": tuple(o.box), "score": getattr(o, "score", None)})
            continue
        o = dict(o)
        if "mask" not in o:
            seg = o.get("segmentation")
            full = rle_to_mask(seg) if isinstance(seg, dict) and isinstance(seg.get("counts"), list) else \
                coco_to_mask(seg) if isinstance(seg, dict) else np.asarray(seg, dtype=bool)
            rows, cols = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
            if len(rows) == 0:
                continue
            o["box"] = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
            o["mask"] = full[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        if "score" not in o:
            o["score"] = o.get("predicted_iou")
        out.append(o)
    return out


def write_label_geotiff(path, objects, like, block: int = 512, overwrite: bool = False, cache_mb: int = 32) -> Path:
    """Write objects as a label raster (0 background, object k as k, 1-based in the given order) with
    `like`'s georeferencing (a `RasterSource`, or a dict with height, width, transform and crs).

    Where objects overlap, the smaller one wins (painted last), so objects inside others stay
    visible. The file is a tiled, deflate-compressed GeoTIFF (BigTIFF when needed), uint16 for up to
    65535 objects, else uint32, written block by block with GDAL's cache capped at cache_mb.
    Refuses to overwrite unless asked.
    """
    rasterio = _rasterio()
    from rasterio.windows import Window

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if isinstance(like, RasterSource):
        (h, w), transform, crs = like.shape, like.transform, like.crs
    else:
        h, w, transform, crs = like["height"], like["width"], like["transform"], like.get("crs")
    objs = _objects(objects)
    dtype = "uint16" if len(objs) < 2**16 else "uint32"
    order = sorted(range(len(objs)), key=lambda i: -int(objs[i]["mask"].sum()))  # large first, small on top
    boxes = np.array([objs[i]["box"] for i in order], dtype=np.int64).reshape(-1, 4)
    profile = dict(driver="GTiff", height=h, width=w, count=1, dtype=dtype, transform=transform, crs=crs, tiled=True,
                   blockxsize=block, blockysize=block, compress="deflate", BIGTIFF="IF_SAFER", nodata=None)
    tmp = path.with_name(path.name + ".tmp")
    with rasterio.Env(GDAL_CACHEMAX=cache_mb * 2**20), rasterio.open(tmp, "w", **profile) as dst:
        for by in range(0, h, block):
            for bx in range(0, w, block):
                bw, bh = min(block, w - bx), min(block, h - by)
                out = np.zeros((bh, bw), dtype=dtype)
                hit = np.flatnonzero((boxes[:, 0] < bx + bw) & (boxes[:, 2] > bx) & (boxes[:, 1] < by + bh) & (boxes[:, 3] > by))
                for k in hit:
                    i = order[k]
                    x0, y0, x1, y1 = objs[i]["box"]
                    cx0, cy0, cx1, cy1 = max(x0, bx), max(y0, by), min(x1, bx + bw), min(y1, by + bh)
                    m = objs[i]["mask"][cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
                    out[cy0 - by:cy1 - by, cx0 - bx:cx1 - bx][m] = i + 1
                dst.write(out, 1, window=Window(bx, by, bw, bh))
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# Polygons


def _image_doc(objects, height, width, tolerance, min_area) -> dict:
    """The objects as a `samhq.formats` image dict with polygons (traced on each crop, shifted into the image)."""
    from .formats import mask_to_polygons

    objs = []
    for o in _objects(objects):
        x0, y0 = o["box"][:2]
        polys = [[ring + np.array([x0, y0], dtype=np.float64) for ring in p]
                 for p in mask_to_polygons(o["mask"], tolerance, min_area)]
        if polys:
            objs.append({"polygons": polys, "score": o.get("score"), "category_id": o.get("category_id")})
    return {"height": height, "width": width, "objects": objs}


def _georef(like):
    if isinstance(like, RasterSource):
        return like.shape, like.transform, like.crs
    return (like["height"], like["width"]), like["transform"], like.get("crs")


def _categories(objects, categories):
    if categories is not None:
        return categories
    ids = sorted({int(o.get("category_id") or 1) for o in objects} | {1}) if objects else [1]
    return {i: "object" if i == 1 else f"category {i}" for i in ids}


def to_wgs84_geojson(objects, like, tolerance: float = 0.0, min_area: float = 0.0, categories=None,
                     decimals: int | None = 9) -> dict:
    """Objects as an RFC 7946 GeoJSON FeatureCollection: polygons on the pixels' edges, reprojected from
    `like`'s CRS to WGS 84 longitude/latitude (pyproj, always x = longitude first).

    like: a `RasterSource` or {height, width, transform, crs}; a raster without a CRS raises
    ValueError (there is nothing to reproject from). tolerance / min_area simplify in pixels
    (`samhq.formats.mask_to_polygons`); properties are id, category_id, category, score. Straight
    pixel edges stay straight lines between their vertices (no densifying: over a few kilometres the
    difference is far below a pixel).
    """
    import shapely
    from shapely.geometry import mapping, shape
    from shapely.geometry.polygon import orient

    from .formats import to_geojson

    (h, w), transform, crs = _georef(like)
    if crs is None:
        raise ValueError("the raster has no CRS, so its map coordinates cannot be placed on the globe; "
                         "use samhq.formats.to_geojson for map- or pixel-coordinate GeoJSON")
    objs = _objects(objects)
    doc = to_geojson(_image_doc(objs, h, w, tolerance, min_area), _categories(objs, categories), transform=transform)
    pyproj = _pyproj()
    to_wgs84 = pyproj.Transformer.from_crs(pyproj.CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs),
                                           "EPSG:4326", always_xy=True)
    for f in doc["features"]:
        geom = shapely.transform(shape(f["geometry"]), lambda xy: np.column_stack(to_wgs84.transform(xy[:, 0], xy[:, 1])))
        geom = orient(geom, 1.0) if geom.geom_type == "Polygon" else type(geom)([orient(p, 1.0) for p in geom.geoms])
        f["geometry"] = mapping(geom)
        if decimals is not None:
            f["geometry"] = json.loads(json.dumps(f["geometry"]), parse_float=lambda s: round(float(s), decimals))
    return json.loads(json.dumps(doc))


def write_vector(path, objects, like, tolerance: float = 0.0, min_area: float = 0.0, categories=None,
                 overwrite: bool = False) -> Path:
    """Objects as (Multi)Polygons in `like`'s own CRS: a GeoPackage (.gpkg) or a Shapefile (.shp), by suffix
    (pyogrio/GDAL). Fields id, category_id (cat_id in a Shapefile), category, score. Refuses to
    overwrite unless asked."""
    try:
        import pyogrio.raw
    except ImportError:
        raise ImportError(f"writing GeoPackage or Shapefile needs pyogrio: {EXTRA}") from None
    import shapely
    from shapely.geometry import MultiPolygon, shape

    from .formats import to_geojson

    path = Path(path)
    drivers = {".gpkg": "GPKG", ".shp": "ESRI Shapefile"}
    if path.suffix.lower() not in drivers:
        raise ValueError(f"{path}: write .gpkg (GeoPackage) or .shp (Shapefile)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    (h, w), transform, crs = _georef(like)
    objs = _objects(objects)
    doc = to_geojson(_image_doc(objs, h, w, tolerance, min_area), _categories(objs, categories), transform=transform)
    geoms = [shape(f["geometry"]) for f in doc["features"]]
    geoms = [g if g.geom_type == "MultiPolygon" else MultiPolygon([g]) for g in geoms]
    props = [f["properties"] for f in doc["features"]]
    shp = path.suffix.lower() == ".shp"
    fields = ["id", "cat_id" if shp else "category_id", "category", "score"]  # Shapefile names have <= 10 letters
    data = [np.array([p["id"] for p in props], dtype=np.int64), np.array([p["category_id"] for p in props], dtype=np.int64),
            np.array([p["category"] for p in props], dtype=object),
            np.array([np.nan if p["score"] is None else p["score"] for p in props], dtype=np.float64)]
    sidecars = (".shp", ".shx", ".dbf", ".prj", ".cpg") if path.suffix.lower() == ".shp" else (".gpkg",)
    for suffix in sidecars:
        path.with_suffix(suffix).unlink(missing_ok=True)
    pyogrio.raw.write(str(path), np.array(shapely.to_wkb(geoms), dtype=object) if geoms else np.array([], dtype=object),
                      data, fields, driver=drivers[path.suffix.lower()], geometry_type="MultiPolygon",
                      crs=crs.to_wkt() if crs is not None and hasattr(crs, "to_wkt") else crs)
    return path


# ---------------------------------------------------------------------------------------------
# Prompts in map coordinates


def _geojson_crs(doc: dict):
    member = doc.get("crs") if isinstance(doc, dict) else None
    if member is None:
        return "EPSG:4326"  # RFC 7946
    try:
        return member["properties"]["name"]
    except (KeyError, TypeError):
        raise ValueError(f"GeoJSON crs member {member!r} is not {{'type': 'name', 'properties': {{'name': ...}}}}") from None


def prompts_from_geojson(geojson, like) -> list:
    """Prompts drawn on a map -> `samhq.prompt_files.FilePrompt`s in the raster's pixels.

    geojson: a FeatureCollection (dict, or a path to one), in WGS 84 longitude/latitude (RFC 7946)
    unless it has a GeoJSON 2008 `crs` member. Each Feature is one prompt: a Point or MultiPoint is
    points (label from properties "label" or "labels", default 1 = foreground); a Polygon is a box,
    its bounding box in pixels (a rectangle drawn in a GIS); a GeometryCollection of one Polygon and
    Points is a box with points. properties "score" and "category_id" are kept. Raises ValueError
    naming the feature for anything else.
    """
    from shapely.geometry import shape

    from .prompt_files import FilePrompt

    if isinstance(geojson, (str, Path)):
        geojson = json.loads(Path(geojson).read_text())
    (h, w), transform, crs = _georef(like)
    if crs is None:
        raise ValueError("the raster has no CRS; map-coordinate prompts cannot be placed on it")
    pyproj = _pyproj()
    to_raster = pyproj.Transformer.from_crs(_geojson_crs(geojson), pyproj.CRS.from_user_input(
        crs.to_wkt() if hasattr(crs, "to_wkt") else crs), always_xy=True)
    inv = ~transform

    def to_pixels(xy: np.ndarray) -> np.ndarray:
        mx, my = to_raster.transform(xy[:, 0], xy[:, 1])
        return _apply(inv, np.stack([np.asarray(mx, dtype=np.float64), np.asarray(my, dtype=np.float64)], 1))

    features = geojson.get("features") if isinstance(geojson, dict) else None
    if not isinstance(features, list):
        raise ValueError("prompts in map coordinates must be a GeoJSON FeatureCollection")
    out = []
    for i, f in enumerate(features):
        where = f"feature {i}"
        try:
            geom = shape(f["geometry"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{where}: not a GeoJSON feature with a geometry ({e})") from None
        props = f.get("properties") or {}
        parts = list(geom.geoms) if geom.geom_type == "GeometryCollection" else [geom]
        polys = [g for g in parts if g.geom_type == "Polygon"]
        points = [p for g in parts if g.geom_type in ("Point", "MultiPoint") for p in getattr(g, "geoms", [g])]
        if len(polys) > 1 or len(polys) + len(points) != len([p for g in parts for p in getattr(g, "geoms", [g])]):
            raise ValueError(f"{where}: a prompt is Points, one Polygon (a box), or a GeometryCollection of both; "
                             f"got {geom.geom_type}")
        box = pts = labels = None
        if polys:
            corners = to_pixels(np.asarray(polys[0].exterior.coords, dtype=np.float64))
            box = np.array([*corners.min(0), *corners.max(0)])
        if points:
            pts = to_pixels(np.array([[p.x, p.y] for p in points], dtype=np.float64))
            lab = props.get("labels", props.get("label", 1))
            labels = np.broadcast_to(np.asarray(lab, dtype=np.float64), (len(pts),)).copy()
            if not np.isin(labels, (0, 1)).all():
                raise ValueError(f"{where}: labels must be 1 (foreground) or 0 (background), got {lab!r}")
        coords = np.concatenate([c.reshape(-1, 2) for c in (pts, None if box is None else box.reshape(2, 2)) if c is not None])
        if not np.isfinite(coords).all():
            raise ValueError(f"{where}: its coordinates do not map into the raster's CRS")
        out.append(FilePrompt(box, pts, labels, float(props.get("score", 1.0)), int(props.get("category_id", 1)),
                              props.get("id", f.get("id")), where))
        if not ((coords >= 0) & (coords <= [w, h])).all():
            import warnings

            warnings.warn(f"{where} lies (partly) outside the {w}x{h} raster; check its coordinates and CRS", stacklevel=2)
    return out


def pixel_to_map(like, xy) -> np.ndarray:
    """(N, 2) pixel-edge coordinates (x = column, y = row) -> map coordinates in the raster's CRS."""
    _, transform, _ = _georef(like)
    return _apply(transform, np.asarray(xy, dtype=np.float64).reshape(-1, 2))


def _apply(t, xy: np.ndarray) -> np.ndarray:
    """An affine (a, b, c, d, e, f) applied to (N, 2) points: x' = a x + b y + c, y' = d x + e y + f."""
    a, b, c, d, e, f = (float(v) for v in list(t)[:6])
    return np.stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f], 1)
