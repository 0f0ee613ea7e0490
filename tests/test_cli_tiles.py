"""`--tiles` in `samhq segment` and `samhq everything`: the commands give the tiled library's masks
(`TiledPredictor`, `TiledMaskGenerator` run directly), GeoTIFF inputs come out as GeoTIFF / GeoPackage /
WGS 84 GeoJSON with the source's georeferencing (read back by rasterio, GDAL's OGR and pyproj), prompts
drawn on a map land on the hand-computed pixels, and the pixel limit of whole-image runs names --tiles.

The demo model's input is 256 px: a 300 x 520 image is 2 x 3 tiles."""
import json

import numpy as np
import pytest
from PIL import Image
from test_tiles import needs_demo, scene

from samhq.cli import main
from samhq.masks import coco_to_mask

NO_GRAD = True
pytestmark = needs_demo
NAME = "samhq-tiny-shapes"
SHAPES = [("ellipse", (200, 40, 330, 140), (200, 60, 40)), ("rectangle", (20, 180, 90, 260), (40, 60, 200)),
          ("ellipse", (380, 150, 470, 280), (60, 200, 60))]
AMG_ARGS = ["--points-per-side", "8", "--pred-iou-thresh", "0.5", "--stability-thresh", "0.5", "--threads", "1"]
X0, Y0, PX = 500000.0, 5000000.0, 0.5  # UTM 33N: the raster's top-left corner and pixel size in metres


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    image, masks = scene(300, 520, SHAPES, seed=4)
    Image.fromarray(image).save(root / "big.png")
    return root, image, masks


@pytest.fixture(scope="module")
def model():
    from samhq.modeling.model import SamHQModel

    return SamHQModel.from_pretrained(NAME).eval()


@pytest.fixture(scope="module")
def geotiff(data):
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    root, image, _ = data
    path = root / "scene.tif"
    profile = dict(driver="GTiff", height=300, width=520, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(X0, Y0, PX, PX))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.moveaxis(image, -1, 0))
    return path


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def test_segment_tiles_gives_the_tiled_predictors_masks(data, model, tmp_path, capsys):
    from samhq.tiles import TiledPredictor

    root, image, masks = data
    tp = TiledPredictor(model, tile_size=128, overlap=32)
    tp.set_image(image)
    box = [200, 40, 331, 141]  # larger than a 128-px tile: decoded on a coarser level, refined
    want, score, _ = tp.predict(box=np.array(box, dtype=float), multimask_output=False)
    out = tmp_path / "m.png"
    js = tmp_path / "m.json"
    assert main(["segment", str(root / "big.png"), "--model", NAME, "--tiles", "--tile-size", "128", "--overlap", "32",
                 "--box", ",".join(map(str, box)), "--out", str(out), "--json", str(js), "--threads", "1"]) == 0
    got = np.asarray(Image.open(out)) > 0
    assert got.shape == (300, 520) and np.array_equal(got, want[0]) and iou(got, masks[0]) > 0.7
    (entry,) = json.loads(js.read_text())["masks"]
    assert np.array_equal(coco_to_mask(entry["segmentation"]), want[0])
    assert entry["score"] == pytest.approx(float(score[0]), abs=1e-6) and entry["area"] == int(want[0].sum())
    ys, xs = np.nonzero(want[0])
    assert entry["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    capsys.readouterr()


def test_the_pixel_limit_names_tiles_and_tiles_pass_it(data, tmp_path, capsys):
    root, _, _ = data
    args = ["segment", str(root / "big.png"), "--model", NAME, "--box", "200,40,331,141", "--max-pixels", "100000",
            "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "over the limit of 0.1 MP (max_pixels)" in err and "--tiles" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a.png").exists()
    assert main([*args, "--out", str(tmp_path / "a.png"), "--tiles"]) == 0
    assert main([*args, "--out", str(tmp_path / "b.png"), "--tiles", "--max-tiled-pixels", "150000"]) == 2
    assert "(max_tiled_pixels) for an image decoded whole in tiled mode" in capsys.readouterr().err


def test_everything_tiles_gives_the_tiled_generators_masks(data, model, tmp_path, capsys):
    from samhq.tiles import TiledMaskGenerator

    root, image, _ = data
    want = TiledMaskGenerator(model, points_per_side=8, pred_iou_thresh=0.5, stability_score_thresh=0.5,
                              output_mode="uncompressed_rle").generate(image)
    out = tmp_path / "out"
    assert main(["everything", str(root / "big.png"), "--out", str(out), "--model", NAME, "--tiles", *AMG_ARGS,
                 "--format", "json,png"]) == 0
    doc = json.loads((out / "big.json").read_text())
    assert doc["info"]["tiles"] == {} and len(doc["annotations"]) == len(want) > 0
    from samhq.masks import rle_to_mask

    for a, r in zip(doc["annotations"], want):
        assert np.array_equal(coco_to_mask(a["segmentation"]), rle_to_mask(r["segmentation"]))
        assert a["predicted_iou"] == pytest.approx(r["predicted_iou"]) and a["crop_box"] == r["crop_box"]
    assert len(list((out / "big_masks").glob("*.png"))) == len(want) and (out / "big_overlay.png").exists()
    capsys.readouterr()


def test_geotiff_in_geotiff_geopackage_and_geojson_out(data, geotiff, tmp_path, capsys):
    import rasterio
    pytest.importorskip("pyogrio")
    pyproj = pytest.importorskip("pyproj")
    from pyogrio.raw import read

    out = tmp_path / "out"
    assert main(["everything", str(geotiff), "--out", str(out), "--model", NAME, "--tiles", *AMG_ARGS,
                 "--format", "json,geotiff,gpkg,geojson"]) == 0
    masks = [coco_to_mask(a["segmentation"]) for a in json.loads((out / "scene.json").read_text())["annotations"]]
    assert len(masks) > 0
    with rasterio.open(geotiff) as src, rasterio.open(out / "geotiff" / "scene.tif") as lab:
        assert lab.transform == src.transform and lab.crs == src.crs and (lab.height, lab.width) == (300, 520)
        labels = lab.read(1)
    assert np.array_equal(labels > 0, np.any(masks, axis=0))
    for k, m in enumerate(masks, start=1):
        assert not (labels == k)[~m].any()  # each label lies inside its own mask (overlaps: the smaller wins)
    meta, _, geometry, fields = read(out / "gpkg" / "scene.gpkg")
    assert pyproj.CRS.from_user_input(meta["crs"]).to_epsg() == 32633 and len(geometry) == len(masks)
    import shapely

    areas = shapely.area(shapely.from_wkb(geometry))
    assert np.allclose(sorted(areas), sorted(m.sum() * PX * PX for m in masks))  # pixel-edge polygons: exact areas
    doc = json.loads((out / "geojson" / "scene.geojson").read_text())
    assert "crs" not in doc and len(doc["features"]) == len(masks)
    to_utm = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32633", always_xy=True)
    geometry = doc["features"][0]["geometry"]
    ring = geometry["coordinates"][0] if geometry["type"] == "Polygon" else geometry["coordinates"][0][0]
    lon, lat = np.asarray(ring).T
    x, y = to_utm.transform(lon, lat)
    cols, rows = (np.asarray(x) - X0) / PX, (Y0 - np.asarray(y)) / PX
    assert np.allclose(cols, np.round(cols), atol=1e-3) and np.allclose(rows, np.round(rows), atol=1e-3)  # on pixel edges
    capsys.readouterr()


def test_prompts_drawn_on_a_map(data, geotiff, model, tmp_path, capsys):
    from samhq.tiles import TiledPredictor

    _, image, masks = data

    def utm(col, row):
        return [X0 + col * PX, Y0 - row * PX]

    ys, xs = np.nonzero(masks[1])
    click = (float(xs.mean()), float(ys.mean()))
    box = (380, 150, 471, 281)
    corners = [utm(box[0], box[1]), utm(box[2], box[1]), utm(box[2], box[3]), utm(box[0], box[3]), utm(box[0], box[1])]
    fc = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "EPSG:32633"}}, "features": [
        {"type": "Feature", "properties": {"category_id": 2}, "geometry": {"type": "Point", "coordinates": utm(*click)}},
        {"type": "Feature", "properties": {"category_id": 3}, "geometry": {"type": "Polygon", "coordinates": [corners]}}]}
    (tmp_path / "clicks.geojson").write_text(json.dumps(fc))
    out = tmp_path / "out"
    assert main(["segment", str(geotiff), "--model", NAME, "--tiles", "--prompts-geojson", str(tmp_path / "clicks.geojson"),
                 "--format", "json,gpkg,coco", "--categories", "2=shed,3=pond", "--out", str(out), "--threads", "1"]) == 0
    tp = TiledPredictor(model)
    tp.set_image(image)
    want_click, _, _ = tp.predict(point_coords=np.array([click]), point_labels=np.array([1]), multimask_output=False)
    want_box, _, _ = tp.predict(box=np.array(box, dtype=float), multimask_output=False)
    doc = json.loads((out / "scene.json").read_text())
    got = [coco_to_mask(m["segmentation"]) for m in doc["masks"]]
    assert np.array_equal(got[0], want_click[0]) and np.array_equal(got[1], want_box[0])
    assert np.allclose(doc["masks"][0]["prompt"]["points"], [click]) and np.allclose(doc["masks"][1]["prompt"]["box"], box)
    cats = json.loads((out / "coco" / "instances.json").read_text())["categories"]
    assert [(c["id"], c["name"]) for c in cats] == [(2, "shed"), (3, "pond")]
    assert [m["category_id"] for m in doc["masks"]] == [2, 3]
    capsys.readouterr()


def test_tile_store_is_reused(data, tmp_path, monkeypatch, capsys):
    pytest.importorskip("zarr")
    from samhq.modeling.model import SamHQModel

    root, _, _ = data
    calls = []
    real = SamHQModel.get_image_embeddings

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(SamHQModel, "get_image_embeddings", counted)
    args = ["segment", str(root / "big.png"), "--model", NAME, "--tiles", "--tile-store", str(tmp_path / "store"),
            "--box", "200,40,331,141", "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    first = len(calls)
    assert first > 0 and (tmp_path / "store" / "big.zarr").is_dir()
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 0
    assert len(calls) == first  # every window came from the store
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    capsys.readouterr()
