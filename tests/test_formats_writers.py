"""Each format written by samhq.formats and read back by the format's own reader (pycocotools and
COCOeval, Label Studio's SDK and converter, GDAL's OGR through pyogrio) or by our documented
readers (YOLO, LabelMe): the same objects, classes, boxes and areas."""
import base64
import json
import warnings

import numpy as np
import pytest
import torch

from label_studio_env import run_in_ls

pytest.importorskip("rasterio")
pytest.importorskip("shapely")
mask_utils = pytest.importorskip("pycocotools.mask")

from samhq.formats import (  # noqa: E402
    label_studio_config,
    mask_to_polygons,
    polygons_to_mask,
    read_labelme,
    read_yolo,
    to_coco,
    to_geojson,
    to_label_studio,
    to_labelme,
    to_yolo,
    write_formats,
    yolo_data_yaml,
)
from samhq.masks import mask_to_coco, mask_to_rle  # noqa: E402

CATS = {1: "cat", 4: "dog"}


def bbox(mask):
    """COCO's box of a mask, by hand: [x_min, y_min, x_max - x_min + 1, y_max - y_min + 1]."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def make_images():
    a = np.zeros((6, 60, 80), bool)
    a[0, 5:35, 5:40] = True
    a[0, 12:20, 15:30] = False  # a hole
    a[1, 40:55, 5:20] = True
    a[1, 45:58, 60:78] = True  # two regions
    a[2, 3, 45:79] = True  # a one-pixel line
    a[3, 10:20, 50:60] = True
    a[3, 20:30, 60:70] = True  # touching at a corner
    a[4, 0:60, 0:3] = True  # along the image border
    a[5, 30:42, 44:58] = True
    a[5, 33:39, 47:51] = False
    a[5, 35:37, 48:50] = True  # an island inside a hole
    yy, xx = np.mgrid[:37, :53]
    b = np.stack([(yy - 18.3) ** 2 + (xx - 25.6) ** 2 <= 15.2**2,
                  np.kron(np.random.default_rng(1).random((13, 18)) < 0.4, np.ones((3, 3), bool))[:37, :53]])
    objects_a = [
        {"segmentation": a[0], "category_id": 1, "score": 0.9},
        {"segmentation": mask_to_rle(torch.from_numpy(a[1:2]))[0], "category_id": 4, "score": 0.8},  # uncompressed RLE
        {"segmentation": mask_to_coco(a[2]), "category_id": 1, "score": 0.7},  # COCO RLE
        {"segmentation": a[3], "category_id": 4},
        {"segmentation": a[4].astype(np.uint8) * 255, "category_id": 1, "score": 0.5},
        {"segmentation": a[5], "category_id": 4, "score": 0.4},
    ]
    images = [
        {"file_name": "photos/a.png", "height": 60, "width": 80, "objects": objects_a},
        {"file_name": "photos/b.jpg", "height": 37, "width": 53,
         "objects": [{"segmentation": b[0], "category_id": 4, "score": 0.95}, {"segmentation": b[1], "score": 0.6}]},
    ]
    return images, [list(a), list(b)]


@pytest.fixture(scope="module")
def data():
    return make_images()


def coco_decode(rle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


# ---------------------------------------------------------------------------------------------
# COCO


@pytest.mark.parametrize("segmentation", ["rle", "polygons"])
def test_coco_read_by_pycocotools(data, tmp_path, segmentation):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, masks = data
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(to_coco(images, CATS, segmentation=segmentation)))
    coco = COCO(str(path))
    assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == CATS
    for image_id, (image, ms) in enumerate(zip(images, masks), start=1):
        info = coco.loadImgs(image_id)[0]
        assert (info["file_name"], info["height"], info["width"]) == (image["file_name"], image["height"], image["width"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) == len(ms)
        for ann, obj, m in zip(anns, image["objects"], ms):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                back = coco.annToMask(ann).astype(bool)
            assert np.array_equal(back, m)
            assert ann["area"] == m.sum() and ann["bbox"] == bbox(m)
            assert ann["category_id"] == obj.get("category_id", 1) and ann.get("score") == obj.get("score")
            if segmentation == "polygons":
                assert isinstance(ann["segmentation"], list)
    # COCO's own evaluation of the file against itself: a perfect score, so every record is well formed
    dets = [dict(a, score=a.get("score", 1.0)) for a in coco.dataset["annotations"]]
    for d in dets:
        d.pop("id")
    ev = COCOeval(coco, coco.loadRes(dets), "segm")
    ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_coco_simplified_polygons_agree_with_pycocotools(data):
    images, masks = data
    doc = to_coco(images[1:], CATS, segmentation="polygons", tolerance=1.0)
    for ann in doc["annotations"]:
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], 37, 53))
        decoded = coco_decode(rle)
        assert ann["area"] == decoded.sum() and ann["bbox"] == bbox(decoded)
    disc = masks[1][0]
    back = coco_decode(mask_utils.merge(mask_utils.frPyObjects(doc["annotations"][0]["segmentation"], 37, 53)))
    assert (back & disc).sum() / (back | disc).sum() >= 0.95  # r = 15 px disc at 1 px: 0.963


# ---------------------------------------------------------------------------------------------
# YOLO


def test_yolo_read_back(data):
    yaml = pytest.importorskip("yaml")
    images, masks = data
    spec = yaml.safe_load(yolo_data_yaml(CATS, "/data/set"))
    assert spec["names"] == {0: "cat", 1: "dog"} and spec["nc"] == 2 and spec["train"] == "images"
    for image, ms in zip(images, masks):
        text = to_yolo(image, CATS)
        lines = text.splitlines()
        assert len(lines) == len(ms)  # one line per object, however many regions and holes
        for line in lines:
            values = [float(v) for v in line.split()[1:]]
            assert len(values) % 2 == 0 and 0 <= min(values) and max(values) <= 1
        objects = read_yolo(text, image["height"], image["width"], num_classes=2)
        for (cls, back), obj, m in zip(objects, image["objects"], ms):
            assert cls == {1: 0, 4: 1}[obj.get("category_id", 1)]
            assert np.array_equal(back, m) and bbox(back) == bbox(m)


def test_yolo_under_opencv_fill_is_one_pixel_larger(data):
    """ultralytics fills label polygons with cv2.fillPoly, which paints the outline too: it keeps
    every pixel and adds at most the pixels along the right / bottom edges and the cuts."""
    cv2 = pytest.importorskip("cv2")
    images, masks = data
    disc = masks[1][0]
    line = to_yolo({**images[1], "objects": images[1]["objects"][:1]}, CATS).split()
    ring = np.array([float(v) for v in line[1:]]).reshape(-1, 2) * [53, 37]
    filled = np.zeros((37, 53), np.uint8)
    cv2.fillPoly(filled, [np.round(ring).astype(np.int32)], 1)
    filled = filled.astype(bool)
    assert not (disc & ~filled).any()
    grown = disc.copy()
    grown[:, 1:] |= disc[:, :-1]
    grown[1:, :] |= grown[:-1, :]
    assert not (filled & ~grown).any()


def test_yolo_reader_errors():
    with pytest.raises(ValueError, match="line 2"):
        read_yolo("0 0 0 1 0 1 1\n0 0 0 1\n", 4, 4)
    with pytest.raises(ValueError, match="class 3"):
        read_yolo("3 0 0 1 0 1 1\n", 4, 4, num_classes=2)
    with pytest.raises(ValueError, match="normalised"):
        read_yolo("0 0 0 4 0 4 4\n", 4, 4)


# ---------------------------------------------------------------------------------------------
# LabelMe


def test_labelme_read_back(data, tmp_path):
    from PIL import Image

    images, masks = data
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(png)
    doc = json.loads(json.dumps(to_labelme(images[0], CATS, image_path="../a.png", image_data=png.read_bytes())))
    assert doc["imagePath"] == "../a.png" and (doc["imageHeight"], doc["imageWidth"]) == (60, 80)
    assert base64.b64decode(doc["imageData"]) == png.read_bytes()
    assert all(s["shape_type"] == "polygon" and set(s) == {"label", "points", "group_id", "description", "shape_type",
                                                            "flags", "mask"} for s in doc["shapes"])
    objects = read_labelme(doc)
    assert len(objects) == len(masks[0])
    for (label, back), obj, m in zip(objects, images[0]["objects"], masks[0]):
        assert label == CATS[obj["category_id"]] and np.array_equal(back, m)
    two = [s for s in doc["shapes"] if s["group_id"] is not None]
    assert len(two) == 6 and len({s["group_id"] for s in two}) == 3  # three objects of two regions each
    assert to_labelme(images[0], CATS)["imageData"] is None


def test_labelme_pil_polygon_reading_is_one_pixel_larger(data):
    """LabelMe's shape_to_mask draws the polygon with PIL (fill and outline): on pixel-edge polygons it
    keeps every pixel and adds the right and bottom edge rows."""
    from PIL import Image, ImageDraw

    images, masks = data
    shape = to_labelme({**images[1], "objects": images[1]["objects"][:1]}, CATS)["shapes"][0]
    canvas = Image.new("L", (53, 37))
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in shape["points"]], fill=1, outline=1)
    drawn, disc = np.asarray(canvas).astype(bool), masks[1][0]
    assert not (disc & ~drawn).any() and 0.85 < disc.sum() / drawn.sum() < 0.95


# ---------------------------------------------------------------------------------------------
# Label Studio


def test_label_studio_brush_decoded_by_the_sdk(data, tmp_path):
    images, masks = data
    tasks = to_label_studio(images, CATS, kind="brush", image_urls=["/data/upload/1/a.png", "/data/upload/1/b.jpg"])
    assert [t["data"]["image"] for t in tasks] == ["/data/upload/1/a.png", "/data/upload/1/b.jpg"]
    results = [r for t in tasks for r in t["predictions"][0]["result"]]
    assert all(r["type"] == "brushlabels" and r["from_name"] == "label" and r["to_name"] == "image" for r in results)
    decoded = run_in_ls(
        "import numpy as np\nfrom label_studio_sdk.converter.brush import decode_rle\n"
        "out = [np.asarray(decode_rle(r['value']['rle'])).reshape(r['original_height'], r['original_width'], 4)[:, :, 3]"
        ".astype(int).tolist() for r in IN]\njson.dump(out, open(OUT, 'w'))\n", results, tmp_path)
    expect = [m for ms in masks for m in ms]
    labels = [CATS[o.get("category_id", 1)] for im in images for o in im["objects"]]
    assert len(decoded) == len(expect)
    for d, m, r, label in zip(decoded, expect, results, labels):
        assert np.array_equal(np.array(d) == 255, m) and set(np.unique(d)) <= {0, 255}
        assert r["value"]["brushlabels"] == [label]
    assert tasks[0]["predictions"][0]["score"] == pytest.approx(np.mean([0.9, 0.8, 0.7, 0.5, 0.4]))


def test_our_brush_decoder_reads_the_sdk_encoder(tmp_path):
    """ls_rle_to_mask reads what Label Studio's SDK writes (literal lists too: its encoder uses them for single values)."""
    from samhq.formats import ls_rle_to_mask, mask_to_ls_rle

    rng = np.random.default_rng(2)
    masks = [rng.random((23, 31)) < 0.5, np.ones((300, 260), bool), np.zeros((5, 7), bool)]
    rles = run_in_ls(
        "import numpy as np\nfrom label_studio_sdk.converter.brush import mask2rle, encode_rle\n"
        "out = [mask2rle((np.array(m, dtype=np.uint8) * 255)) for m in IN['masks']]\n"
        "out.append(encode_rle(np.array(IN['mixed'])))\njson.dump(out, open(OUT, 'w'))\n",
        {"masks": [m.astype(int).tolist() for m in masks], "mixed": [0, 0, 0, 9, 255, 255, 255, 255]}, tmp_path)
    for rle, m in zip(rles, masks):
        assert np.array_equal(ls_rle_to_mask(rle, *m.shape), m)
        assert np.array_equal(ls_rle_to_mask(mask_to_ls_rle(m), *m.shape), m)
    assert ls_rle_to_mask(rles[-1], 1, 2).tolist() == [[True, True]]  # alpha of (0, 0, 0, 9), (255, ...)
    with pytest.raises(ValueError, match="not 4x4x4"):
        ls_rle_to_mask(rles[0], 4, 4)


def test_label_studio_polygons_through_the_converter(data, tmp_path):
    """Label Studio's own converter turns our PolygonLabels (percent) into COCO; pycocotools decodes it."""
    from PIL import Image

    images, masks = data
    for image, name in zip(images, ("a.png", "b.png")):
        Image.fromarray(np.zeros((image["height"], image["width"], 3), np.uint8)).save(tmp_path / name)
    tasks = to_label_studio(images, CATS, kind="polygon", image_urls=[str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    export = [{"id": k + 1, "data": t["data"], "annotations": [{"id": k + 1, "result": t["predictions"][0]["result"]}]}
              for k, t in enumerate(tasks)]
    payload = {"config": label_studio_config(CATS, "polygon", prompts=False), "export": export, "dir": str(tmp_path / "ls")}
    coco = run_in_ls(
        "import os\nfrom label_studio_sdk.converter import Converter\n"
        "os.makedirs(IN['dir'], exist_ok=True)\npath = os.path.join(IN['dir'], 'export.json')\n"
        "json.dump(IN['export'], open(path, 'w'))\n"
        "Converter(config=IN['config'], project_dir=IN['dir']).convert_to_coco(path, IN['dir'], is_dir=False)\n"
        "json.dump(json.load(open(os.path.join(IN['dir'], 'result.json'))), open(OUT, 'w'))\n", payload, tmp_path)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for image_id, (image, ms) in enumerate(zip(images, masks)):
        h, w = image["height"], image["width"]
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
        # one polygon per region: group this image's regions back by object
        regions = [(label, p) for obj, m in zip(image["objects"], ms)
                   for label, p in [(CATS[obj.get("category_id", 1)], mask_to_polygons(m))] for _ in p]
        assert len(anns) == len(regions)
        got = {}
        for ann, (label, _) in zip(anns, regions):
            assert names[ann["category_id"]] == label and CATS[ann["category_id"]] == label  # our ids kept
            got.setdefault(label, np.zeros((h, w), bool))
            got[label] |= coco_decode(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w)))
        for label in got:
            union = np.any([m for obj, m in zip(image["objects"], ms) if CATS[obj.get("category_id", 1)] == label], axis=0)
            assert np.array_equal(got[label], union)


def test_label_studio_config_parses():
    import xml.etree.ElementTree as ET

    root = ET.fromstring(label_studio_config({1: 'a "quoted" <name>', 2: "b"}, "brush"))
    tags = [el.tag for el in root]
    assert tags == ["Image", "BrushLabels", "KeyPointLabels", "RectangleLabels"]
    assert [(lab.get("value"), lab.get("category")) for lab in root[1]] == [('a "quoted" <name>', "1"), ("b", "2")]
    assert root[2].get("smart") == "true" and root[0].get("value") == "$image"


# ---------------------------------------------------------------------------------------------
# GeoJSON


def read_ogr(path):
    """GDAL's OGR (pyogrio): -> (crs, [shapely geometry], {field: values})."""
    pyogrio = pytest.importorskip("pyogrio")
    import shapely

    meta, _, geometry, fields = pyogrio.raw.read(str(path))
    return meta["crs"], list(shapely.from_wkb(geometry)), dict(zip(meta["fields"], fields))


def geometry_mask(geom, h, w, inverse=None):
    import shapely

    if inverse is not None:
        geom = shapely.transform(geom, lambda xy: np.stack([inverse[0] * xy[:, 0] + inverse[1] * xy[:, 1] + inverse[2],
                                                            inverse[3] * xy[:, 0] + inverse[4] * xy[:, 1] + inverse[5]], 1))
    polys = list(getattr(geom, "geoms", [geom]))
    return polygons_to_mask([[np.asarray(p.exterior.coords)] + [np.asarray(i.coords) for i in p.interiors] for p in polys], h, w)


def test_geojson_pixel_coordinates_read_by_gdal(data, tmp_path):
    images, masks = data
    image, ms = images[0], masks[0]
    doc = to_geojson(image, CATS)
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(doc))
    crs, geoms, fields = read_ogr(path)
    assert crs == "EPSG:4326" and len(geoms) == len(ms)  # GDAL's reading of a GeoJSON without crs (RFC 7946)
    assert list(fields["category"]) == [CATS[o["category_id"]] for o in image["objects"]]
    for g, m, feat in zip(geoms, ms, doc["features"]):
        assert g.is_valid and g.area == m.sum()
        assert np.array_equal(geometry_mask(g, 60, 80), m)
        assert feat["geometry"]["type"] == ("MultiPolygon" if len(mask_to_polygons(m)) > 1 else "Polygon")
        for p in getattr(g, "geoms", [g]):
            assert p.exterior.is_ccw and not any(i.is_ccw for i in p.interiors)  # RFC 7946 winding
    ring = doc["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5  # closed: a 35x30 square with a hole


def test_geojson_georeferenced_with_an_affine_and_crs(data, tmp_path):
    affine = pytest.importorskip("affine")
    images, masks = data
    image, ms = images[1], masks[1]
    t = affine.Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4649776.0)  # UTM, 0.5 m pixels, north up
    path = tmp_path / "b.geojson"
    path.write_text(json.dumps(to_geojson(image, CATS, transform=t, crs="EPSG:32633")))
    crs, geoms, _ = read_ogr(path)
    assert crs == "EPSG:32633"
    inverse = list(~t)[:6]
    for g, m in zip(geoms, ms):
        assert g.area == pytest.approx(m.sum() * 0.25)
        assert np.array_equal(geometry_mask(g, 37, 53, inverse), m)
        for p in getattr(g, "geoms", [g]):
            assert p.exterior.is_ccw  # counter-clockwise on the map although y flipped
    with pytest.raises(ValueError, match="invertible affine"):
        to_geojson(image, CATS, transform=(1, 0, 0, 0, 0, 0))


# ---------------------------------------------------------------------------------------------
# Files


def test_write_formats_layout_and_no_overwrite(data, tmp_path):
    from PIL import Image

    images, masks = data
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "photos" / "a.png")  # b.jpg is missing
    images = [dict(im, file_name=str(tmp_path / im["file_name"])) for im in images]
    out = tmp_path / "out"
    written = write_formats(images, out, "coco,yolo,labelme,label-studio,geojson,png", CATS, embed_images=True,
                            image_url_prefix="/data/local-files/?d=", image_root=tmp_path)
    rel = sorted(p.relative_to(out).as_posix() for p in written)
    assert rel == sorted(["coco/instances.json", "yolo/data.yaml", "yolo/labels/a.txt", "yolo/labels/b.txt",
                          "labelme/a.json", "labelme/b.json", "label_studio/tasks.json", "label_studio/config.xml",
                          "geojson/a.geojson", "geojson/b.geojson", "a_masks", "b_masks"])
    link = out / "yolo" / "images" / "a.png"
    assert link.is_symlink() and link.resolve() == (tmp_path / "photos" / "a.png").resolve()
    assert not (out / "yolo" / "images" / "b.jpg").exists()
    lm = json.loads((out / "labelme" / "a.json").read_text())
    assert lm["imagePath"] == "../../photos/a.png" and lm["imageData"]
    assert json.loads((out / "labelme" / "b.json").read_text())["imageData"] is None
    tasks = json.loads((out / "label_studio" / "tasks.json").read_text())
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=photos/a.png"
    pngs = sorted((out / "a_masks").iterdir())
    assert len(pngs) == 6 and np.array_equal(np.asarray(Image.open(pngs[0])) > 0, masks[0][0])
    # a second run refuses (naming the file) and changes nothing; overwrite replaces
    before = (out / "coco" / "instances.json").stat().st_mtime_ns
    (out / "geojson" / "b.geojson").unlink()
    with pytest.raises(FileExistsError, match="a.geojson already exists"):
        write_formats(images, out, "geojson,coco", CATS)
    assert not (out / "geojson" / "b.geojson").exists()
    write_formats(images, out, "geojson,coco", CATS, overwrite=True)
    assert (out / "geojson" / "b.geojson").exists() and (out / "coco" / "instances.json").stat().st_mtime_ns >= before
    assert not list(out.rglob("*.tmp"))


def test_bad_input_is_a_clear_error(data, tmp_path):
    images, _ = data
    with pytest.raises(ValueError, match="unknown format 'tiff'"):
        write_formats(images, tmp_path, "coco,tiff")
    with pytest.raises(ValueError, match="category_id 4 has no name"):
        to_coco(images, "object")
    with pytest.raises(ValueError, match="60x50"):
        to_yolo({"file_name": "x", "height": 50, "width": 60, "objects": [{"segmentation": np.zeros((60, 50), bool)}]})
    with pytest.raises(ValueError, match="same outputs"):
        write_formats([images[0], dict(images[0], file_name="other/a.png")], tmp_path, "coco", CATS)
    with pytest.raises(ValueError, match="ids must be integers"):
        to_coco(images, {"one": "cat"})
