"""Georeferenced rasters (samhq.geo): windows read exactly, georeferencing kept, polygons on the pixels'
edges on the map (hand-computed transforms), prompts from map coordinates, memory bounded by the tile."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pyproj = pytest.importorskip("pyproj")
pytest.importorskip("shapely")
pyogrio = pytest.importorskip("pyogrio")

from rasterio.transform import Affine, from_origin  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from samhq.geo import RasterSource, pixel_to_map, prompts_from_geojson, to_wgs84_geojson, write_label_geotiff, write_vector  # noqa: E402

UTM = "EPSG:32633"
UTM_T = Affine(2.0, 0.0, 500000.0, 0.0, -2.0, 5400000.0)  # 2 m pixels, top-left corner at (500000, 5400000)


def write_tif(path, array, transform=UTM_T, crs=UTM, **extra):
    """(H, W, C) or (H, W) array -> a tiled GeoTIFF."""
    arr = array if array.ndim == 3 else array[..., None]
    prof = dict(driver="GTiff", height=arr.shape[0], width=arr.shape[1], count=arr.shape[2], dtype=arr.dtype.name,
                transform=transform, crs=crs, tiled=True, blockxsize=64, blockysize=64, **extra)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(np.moveaxis(arr, -1, 0))
    return path


def test_windows_are_read_exactly(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (130, 200, 3), dtype=np.uint8)
    with RasterSource(write_tif(tmp_path / "rgb.tif", rgb)) as src:
        assert src.shape == (130, 200) and src.transform == UTM_T and src.crs.to_string() == UTM
        for box in [(0, 0, 200, 130), (17, 5, 81, 99), (199, 129, 200, 130)]:
            x0, y0, x1, y1 = box
            assert np.array_equal(src.read(box), rgb[y0:y1, x0:x1])
        assert src.read((0, 0, 200, 130), (65, 100)).shape == (65, 100, 3)  # GDAL's decimated read
    with RasterSource(write_tif(tmp_path / "big.tif", rgb, BIGTIFF="YES")) as src:  # BigTIFF (64-bit offsets)
        assert open(tmp_path / "big.tif", "rb").read(4) == b"II+\x00"
        assert np.array_equal(src.read((3, 4, 150, 100)), rgb[4:100, 3:150])
    grey = rng.integers(0, 4096, (40, 50), dtype=np.uint16)  # 12-bit single band
    with RasterSource(write_tif(tmp_path / "grey.tif", grey), value_range=(0, 4095)) as src:
        got = src.read((0, 0, 50, 40))
        expected = np.round(grey.astype(np.float32) * (255 / 4095)).astype(np.uint8)
        assert np.array_equal(got, np.repeat(expected[..., None], 3, -1))
    with pytest.raises(ValueError, match="bands"):
        RasterSource(tmp_path / "grey.tif", bands=[1, 2, 3])
    (tmp_path / "junk.tif").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot open raster"):
        RasterSource(tmp_path / "junk.tif")


def square_objects():
    big = np.zeros((30, 40), bool)
    big[:, :] = True
    small = np.ones((6, 8), bool)
    return [{"mask": big, "box": (10, 20, 50, 50), "score": 0.9},
            {"mask": small, "box": (30, 40, 38, 46), "score": 0.8, "category_id": 2}]  # inside the big one


def test_label_geotiff_keeps_the_transform_and_crs(tmp_path):
    with RasterSource(write_tif(tmp_path / "src.tif", np.zeros((100, 120, 3), np.uint8))) as src:
        out = write_label_geotiff(tmp_path / "labels.tif", square_objects(), src, block=32)
        with pytest.raises(FileExistsError):
            write_label_geotiff(out, square_objects(), src)
    with rasterio.open(out) as ds:
        assert ds.transform == UTM_T and ds.crs == rasterio.crs.CRS.from_string(UTM)
        assert (ds.height, ds.width, ds.count, ds.dtypes[0]) == (100, 120, 1, "uint16")
        labels = ds.read(1)
    expected = np.zeros((100, 120), np.uint16)
    expected[20:50, 10:50] = 1
    expected[40:46, 30:38] = 2  # the smaller object stays on top
    assert np.array_equal(labels, expected)


def corners_of(geometry):
    """The distinct vertices of a (Multi)Polygon's outer rings, as a set of rounded (x, y)."""
    polys = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
    return {(round(x, 6), round(y, 6)) for poly in polys for x, y in poly[0]}


def test_geojson_in_degrees_lands_on_the_pixels(tmp_path):
    # a geographic raster: pixel (column x, row y) -> lon = 10 + 0.001 x, lat = 50 - 0.001 y
    like = {"height": 100, "width": 120, "transform": from_origin(10.0, 50.0, 0.001, 0.001), "crs": "EPSG:4326"}
    doc = to_wgs84_geojson(square_objects()[:1], like)
    (f,) = doc["features"]
    # pixels columns 10..49, rows 20..49: edges at x = 10 and 50, y = 20 and 50
    assert corners_of(f["geometry"]) == {(10.010, 49.980), (10.050, 49.980), (10.050, 49.950), (10.010, 49.950)}
    assert "crs" not in doc and f["properties"]["score"] == 0.9  # RFC 7946: WGS 84 implied


def test_geojson_and_geopackage_of_a_projected_raster(tmp_path):
    # UTM 33N, 2 m pixels: x = 500000 + 2 col, y = 5400000 - 2 row
    like = {"height": 100, "width": 120, "transform": UTM_T, "crs": UTM}
    map_corners = {(500020.0, 5399960.0), (500100.0, 5399960.0), (500100.0, 5399900.0), (500020.0, 5399900.0)}
    np.testing.assert_allclose(pixel_to_map(like, [[10, 20], [50, 50]]), [[500020, 5399960], [500100, 5399900]])
    # GeoPackage: the source CRS, the hand-computed corners (read back by GDAL's OGR)
    gpkg = write_vector(tmp_path / "objects.gpkg", square_objects(), like)
    meta, _, geoms, fields = pyogrio.raw.read(gpkg)
    assert pyproj.CRS(meta["crs"]) == pyproj.CRS(UTM) and list(meta["fields"]) == ["id", "category_id", "category", "score"]
    import shapely

    first = json.loads(shapely.to_geojson(shapely.from_wkb(geoms[0])))
    assert corners_of(first) == map_corners
    assert list(fields[1]) == [1, 2] and list(fields[3]) == pytest.approx([0.9, 0.8])
    # the small object has a hole-free square; the big one's hole is not there (labels overlap, polygons do not cut)
    # GeoJSON: the same corners taken to longitude/latitude by pyproj
    to_ll = pyproj.Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    expected = {tuple(round(v, 6) for v in to_ll.transform(x, y)) for x, y in map_corners}
    doc = to_wgs84_geojson(square_objects(), like)
    assert corners_of(doc["features"][0]["geometry"]) == expected
    assert 14.9 < doc["features"][0]["geometry"]["coordinates"][0][0][0] < 15.1  # UTM 33's central meridian is 15 E
    # and GDAL reads the GeoJSON as WGS 84
    (tmp_path / "o.geojson").write_text(json.dumps(doc))
    meta, _, geoms, _ = pyogrio.raw.read(tmp_path / "o.geojson")
    assert pyproj.CRS(meta["crs"]) == pyproj.CRS("EPSG:4326") and len(geoms) == 2
    with pytest.raises(ValueError, match="no CRS"):
        to_wgs84_geojson(square_objects(), dict(like, crs=None))
    write_vector(tmp_path / "objects.shp", square_objects(), like)
    assert pyproj.CRS(pyogrio.read_info(tmp_path / "objects.shp")["crs"]) == pyproj.CRS(UTM)


def test_prompts_in_map_coordinates_become_pixels():
    like = {"height": 100, "width": 120, "transform": UTM_T, "crs": UTM}
    to_ll = pyproj.Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)

    def lonlat(col, row):
        return list(to_ll.transform(500000 + 2 * col, 5400000 - 2 * row))

    box = [lonlat(10, 20), lonlat(50, 20), lonlat(50, 50), lonlat(10, 50), lonlat(10, 20)]
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": lonlat(33.5, 44.25)}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [lonlat(1, 2), lonlat(3, 4)]},
         "properties": {"labels": [1, 0], "category_id": 4}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [box]}, "properties": {"score": 0.7}},
        {"type": "Feature", "geometry": {"type": "GeometryCollection", "geometries": [
            {"type": "Polygon", "coordinates": [box]}, {"type": "Point", "coordinates": lonlat(30, 30)}]}, "properties": {}},
    ]}
    p0, p1, p2, p3 = prompts_from_geojson(doc, like)
    np.testing.assert_allclose(p0.points, [[33.5, 44.25]], atol=1e-6)
    assert p0.box is None and list(p0.labels) == [1]
    np.testing.assert_allclose(p1.points, [[1, 2], [3, 4]], atol=1e-6)
    assert list(p1.labels) == [1, 0] and p1.category_id == 4
    np.testing.assert_allclose(p2.box, [10, 20, 50, 50], atol=1e-6)
    assert p2.points is None and p2.score == 0.7
    np.testing.assert_allclose(p3.box, [10, 20, 50, 50], atol=1e-6)
    np.testing.assert_allclose(p3.points, [[30, 30]], atol=1e-6)
    # in the raster's own CRS, named by a GeoJSON 2008 crs member
    own = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}},
           "features": [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [500001.0, 5399999.0]},
                         "properties": {}}]}
    np.testing.assert_allclose(prompts_from_geojson(own, like)[0].points, [[0.5, 0.5]], atol=1e-9)
    line = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [lonlat(0, 0), lonlat(1, 1)]}, "properties": {}}]}
    with pytest.raises(ValueError, match="feature 0: a prompt is Points"):
        prompts_from_geojson(line, like)


MEASURE = textwrap.dedent("""
    import json, sys, tracemalloc
    import numpy as np
    from samhq.geo import RasterSource, write_label_geotiff
    from samhq.tiles import tile_windows

    def status(field):
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    src = RasterSource(sys.argv[1], cache_mb=8)
    h, w = src.shape
    windows = tile_windows(h, w, 256, 64)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to now: imports' transient peaks do not count
    base = status("VmRSS")
    tracemalloc.start()
    total = 0
    for win in windows:
        total += int(src.read(win.box).sum(dtype=np.uint64))
    objects = [{"mask": np.ones((100, 100), bool), "box": (50, 50, 150, 150)},
               {"mask": np.ones((40, 200), bool), "box": (w - 300, h - 100, w - 100, h - 60)}]
    write_label_geotiff(sys.argv[2], objects, src, cache_mb=8)
    peak = tracemalloc.get_traced_memory()[1]
    grown = status("VmHWM") - base
    print(json.dumps({"windows": len(windows), "traced_peak": peak, "rss_growth": grown}))
""")


def make_big_tif(path, size):
    prof = dict(driver="GTiff", height=size, width=size, count=3, dtype="uint8", tiled=True, blockxsize=256,
                blockysize=256, transform=UTM_T, crs=UTM)
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **prof) as dst:
        for y in range(0, size, 512):
            for x in range(0, size, 512):
                dst.write(rng.integers(0, 256, (3, 512, 512), dtype=np.uint8), window=Window(x, y, 512, 512))
    return path


def test_peak_memory_grows_with_the_tile_not_the_image(tmp_path):
    """Reading every window and writing the labels of a raster 4x larger costs at most 1.2x the memory."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak memory is measured with Linux's /proc/self/clear_refs and VmHWM")
    small, large = make_big_tif(tmp_path / "s.tif", 2048), make_big_tif(tmp_path / "l.tif", 4096)
    (tmp_path / "measure.py").write_text(MEASURE)

    def measure(src):
        out = subprocess.run([sys.executable, str(tmp_path / "measure.py"), str(src), str(src.with_suffix(".labels.tif"))],
                             capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
        return json.loads(out.stdout.strip().splitlines()[-1])

    s, lg = measure(small), measure(large)
    assert lg["windows"] >= 4 * s["windows"] * 0.9
    assert lg["traced_peak"] <= 1.2 * s["traced_peak"], (s, lg)  # Python/numpy allocations (tracemalloc)
    assert lg["rss_growth"] <= 1.2 * s["rss_growth"], (s, lg)  # everything, GDAL's cache included
    assert s["rss_growth"] < 40 * 2**20, (s, lg)  # the small raster is 12 MB, the large 50 MB


def test_a_georeferenced_scene_end_to_end(tmp_path):
    """Everything mode and map-coordinate prompts on a GeoTIFF read in windows, written back georeferenced."""
    from samhq import SamHQModel
    from samhq.checkpoints import BUNDLED
    from samhq.masks import coco_to_mask
    from samhq.tiles import TiledMaskGenerator, TiledPredictor

    if not (BUNDLED["samhq-tiny-shapes"] / "model.safetensors").exists():
        pytest.skip("the demo model is not in this checkout")
    from conftest import torch_threads

    sys.path.insert(0, str(Path(__file__).parent))
    from test_tiles import OVERLAP_SCENE, iou, scene

    with torch_threads(1):
        model = SamHQModel.from_pretrained("samhq-tiny-shapes").eval()
        image, masks = scene(384, 384, OVERLAP_SCENE)
        src = RasterSource(write_tif(tmp_path / "scene.tif", image))
        objects = TiledMaskGenerator(model, overlap=128, points_per_side=8, pred_iou_thresh=0.8,
                                     stability_score_thresh=0.9).objects(src)
        assert objects and all(o["mask"].shape == (o["box"][3] - o["box"][1], o["box"][2] - o["box"][0]) for o in objects)
        write_label_geotiff(tmp_path / "labels.tif", objects, src)
        with rasterio.open(tmp_path / "labels.tif") as ds:
            labels = ds.read(1)
            assert ds.transform == UTM_T and ds.crs == src.crs
        full = []
        for o in objects:
            m = np.zeros((384, 384), bool)
            m[o["box"][1]:o["box"][3], o["box"][0]:o["box"][2]] = o["mask"]
            full.append(m)
        expected = np.zeros((384, 384), np.uint16)
        for i in sorted(range(len(full)), key=lambda i: -full[i].sum()):  # larger first, smaller on top
            expected[full[i]] = i + 1
        assert np.array_equal(labels, expected)
        assert max(iou(m, masks[2]) for m in full) > 0.9  # the wide object, joined across windows
        doc = to_wgs84_geojson(objects, src)
        assert len(doc["features"]) == len(objects)
        # a box drawn on the map around the wide object
        ys, xs = np.nonzero(masks[2])
        to_ll = pyproj.Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
        ring = [list(to_ll.transform(*pixel_to_map(src, [[x, y]])[0])) for x, y in
                [(xs.min(), ys.min()), (xs.max() + 1, ys.min()), (xs.max() + 1, ys.max() + 1), (xs.min(), ys.max() + 1)]]
        (prompt,) = prompts_from_geojson({"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]}, "properties": {}}]}, src)
        tp = TiledPredictor(model)
        tp.set_image(src)
        mask, _, _ = tp.predict(box=prompt.box, multimask_output=False)  # as segment_prompts does for boxes
        assert iou(mask[0], masks[2]) >= 0.7
        from samhq.prompt_files import segment_prompts

        (rec,) = segment_prompts(tp, src, [prompt], 1)
        assert np.array_equal(coco_to_mask(rec["segmentation"]), mask[0])
