"""The server's labelling API (POST /api/export) and tiled uploads (samhq serve --tiles), against the
predictor and the tiled predictor called directly and the formats' own readers (pycocotools for COCO;
samhq's documented YOLO and LabelMe readers). The page that drives them is tested in headless Chromium
(test_server_browser.py)."""
import base64
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from samhq.data.synthetic import SyntheticShapes  # noqa: E402
from samhq.limits import Limits  # noqa: E402
from samhq.predictor import SamHQPredictor  # noqa: E402
from samhq.server import create_app  # noqa: E402

NO_GRAD = True


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_mask(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))) > 127


@pytest.fixture(scope="module")
def labelled():
    """An uploaded image, three objects (two labels, points with a negative, a box, an HQ-only one) and the
    predictor's masks for them."""
    item = SyntheticShapes(1, (96, 128), seed=1000)[0]
    client = TestClient(create_app("samhq-tiny-shapes", max_images=2), base_url="http://127.0.0.1:8000")
    image_id = client.post("/api/images", files={"file": ("photo.png", png_bytes(item["image"]), "image/png")}).json()["image_id"]
    ref = SamHQPredictor.from_pretrained("samhq-tiny-shapes")
    ref.set_image(item["image"])
    objects, masks = [], []
    for k, m in enumerate(item["masks"][:3]):
        ys, xs = np.nonzero(m)
        if k == 0:
            o = {"label": "cat", "points": [[float(xs[len(xs) // 2]), float(ys[len(ys) // 2])], [2.0, 2.0]], "labels": [1, 0]}
        elif k == 1:
            o = {"label": "dog", "box": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]}
        else:
            o = {"label": "cat", "points": [[float(xs[0]), float(ys[0])]], "labels": [1], "hq_token_only": True}
        mk, _, _ = ref.predict(point_coords=None if "points" not in o else np.array(o["points"]),
                               point_labels=None if "labels" not in o else np.array(o["labels"]),
                               box=None if "box" not in o else np.array(o["box"]), multimask_output=False,
                               hq_token_only=o.get("hq_token_only", False))
        objects.append(o)
        masks.append(mk[0])
    assert all(m.any() for m in masks)
    return client, image_id, objects, masks


def export(client, image_id, objects, fmt, file_name="photo.png"):
    return client.post("/api/export", json={"image_id": image_id, "format": fmt, "file_name": file_name, "objects": objects})


def test_the_page_masks_are_the_export_masks(labelled):
    client, image_id, objects, masks = labelled
    for o, m in zip(objects, masks):
        r = client.post("/api/segment", json={"image_id": image_id, **o})
        assert r.status_code == 200 and np.array_equal(decode_mask(r.json()["mask_png"]), m)


def test_coco_export_read_by_pycocotools(labelled):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    client, image_id, objects, masks = labelled
    r = export(client, image_id, objects, "coco")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert 'filename="photo_coco.json"' in r.headers["content-disposition"]
    coco = COCO()
    coco.dataset = r.json()
    coco.createIndex()
    assert [c["name"] for c in coco.dataset["categories"]] == ["cat", "dog"]  # labels in order of first use
    (img,) = coco.dataset["images"]
    assert (img["file_name"], img["height"], img["width"]) == ("photo.png", 96, 128)
    anns = coco.dataset["annotations"]
    assert [a["category_id"] for a in anns] == [1, 2, 1]
    for a, m in zip(anns, masks):
        assert np.array_equal(coco.annToMask(a).astype(bool), m)
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] and a["area"] == m.sum()


def test_yolo_labelme_and_png_exports(labelled):
    from samhq.formats import polygons_to_mask, read_labelme, read_yolo

    client, image_id, objects, masks = labelled
    r = export(client, image_id, objects, "yolo")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert sorted(z.namelist()) == ["yolo/data.yaml", "yolo/labels/photo.txt"]
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(z.read("yolo/data.yaml"))
    assert data["names"] == {0: "cat", 1: "dog"} and data["nc"] == 2
    got = read_yolo(z.read("yolo/labels/photo.txt").decode(), 96, 128, num_classes=2)
    assert [c for c, _ in got] == [0, 1, 0]
    for (_, g), m in zip(got, masks):  # pixel-edge polygons, filled by the pixel-centre rule: exact
        assert np.array_equal(g, m)

    r = export(client, image_id, objects, "labelme")
    assert r.status_code == 200 and 'filename="photo.json"' in r.headers["content-disposition"]
    doc = r.json()
    assert doc["imagePath"] == "photo.png" and (doc["imageHeight"], doc["imageWidth"]) == (96, 128)
    got = read_labelme(doc)
    union = {label: np.zeros((96, 128), bool) for label in ("cat", "dog")}
    for o, m in zip(objects, masks):
        union[o["label"]] |= m
    got_union = {label: np.zeros((96, 128), bool) for label in ("cat", "dog")}
    for label, m in got:
        got_union[label] |= m
    for label in union:
        assert np.array_equal(got_union[label], union[label])
    shapes = [s for s in doc["shapes"] if s["label"] == "dog"]
    assert np.array_equal(polygons_to_mask([[np.array(s["points"])] for s in shapes], 96, 128), masks[1])

    r = export(client, image_id, objects, "png")
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert sorted(z.namelist()) == ["photo_labels.json", "photo_masks/000.png", "photo_masks/001.png", "photo_masks/002.png"]
    assert json.loads(z.read("photo_labels.json")) == {"000.png": "cat", "001.png": "dog", "002.png": "cat"}
    for i, m in enumerate(masks):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(z.read(f"photo_masks/{i:03d}.png")))) > 127, m)


def test_export_errors(labelled):
    client, image_id, objects, _ = labelled
    for body, code, text in (
        ({"format": "voc"}, 400, "unknown format"),
        ({"objects": []}, 400, "no objects"),
        ({"objects": [{"label": "x"}]}, 400, "no clicks or box"),
        ({"objects": [{"label": "x", "points": [[1, 2]], "labels": [1, 0]}]}, 400, "labels"),
        ({"image_id": "0" * 16}, 404, "unknown image_id"),
    ):
        req = {"image_id": image_id, "format": "coco", "objects": objects, **body}
        r = client.post("/api/export", json=req)
        assert r.status_code == code and text in r.json()["detail"], (body, r.text)
    small = TestClient(create_app("samhq-tiny-shapes", limits=Limits(max_prompts=2)), base_url="http://127.0.0.1:8000")
    item = SyntheticShapes(1, (64, 64), seed=3)[0]
    iid = small.post("/api/images", files={"file": ("a.png", png_bytes(item["image"]), "image/png")}).json()["image_id"]
    r = export(small, iid, [{"points": [[5, 5]]}] * 3, "coco")
    assert r.status_code == 413 and "max_prompts" in r.json()["detail"]
    r = export(client, image_id, objects[:1], "coco", file_name='../evil"\r\nX-Injected: 1.png')
    assert r.status_code == 200 and "X-Injected" not in r.headers and "\n" not in r.headers["content-disposition"]
    assert r.json()["images"][0]["file_name"] == "evil_X-Injected_1.png"


def test_tiled_uploads(tmp_path):
    """With tiles, an upload larger than a tile is segmented in tiles (the TiledPredictor's masks); smaller ones
    and servers without tiles use the whole-image predictor and its pixel limit."""
    from test_tiles import scene

    from samhq.modeling.model import SamHQModel
    from samhq.tiles import TiledPredictor

    image, masks = scene(300, 520, [("ellipse", (200, 40, 330, 140), (200, 60, 40)),
                                    ("rectangle", (20, 180, 90, 260), (40, 60, 200))])
    model = SamHQModel.from_pretrained("samhq-tiny-shapes").eval()
    limits = Limits(max_pixels=100_000)  # 520 x 300 = 156,000: whole-image segmentation refuses it
    tiled = TestClient(create_app(model, limits=limits, tiles={"overlap": 64}, max_images=2), base_url="http://127.0.0.1:8000")
    info = tiled.get("/api/info").json()["tiles"]
    assert info["tile_size"] == 256 and info["overlap"] == 64
    up = tiled.post("/api/images", files={"file": ("big.png", png_bytes(image), "image/png")}).json()
    assert up["tiled"] is True and (up["width"], up["height"]) == (520, 300)
    small = tiled.post("/api/images", files={"file": ("s.png", png_bytes(image[:200, :200]), "image/png")}).json()
    assert small["tiled"] is False
    tp = TiledPredictor(model, overlap=64)
    tp.set_image(image)
    box = [200, 40, 331, 141]  # crosses the border between the first two windows
    want, score, _ = tp.predict(box=np.array(box, dtype=float), multimask_output=False)
    r = tiled.post("/api/segment", json={"image_id": up["image_id"], "box": box})
    assert r.status_code == 200
    got = decode_mask(r.json()["mask_png"])
    assert got.shape == (300, 520) and np.array_equal(got, want[0])
    assert r.json()["score"] == pytest.approx(float(score[0]), abs=1e-6)
    assert (got & masks[0]).sum() / (got | masks[0]).sum() > 0.7
    session = tiled.app.state.session
    assert 0 < len(session.tiled.cache) and session.tiled.cache.nbytes > 0  # windows embedded on demand, kept
    r = export(tiled, up["image_id"], [{"label": "blob", "box": box}], "coco")
    assert r.status_code == 200 and r.json()["images"][0]["width"] == 520

    plain = TestClient(create_app(model, limits=limits), base_url="http://127.0.0.1:8000")
    r = plain.post("/api/images", files={"file": ("big.png", png_bytes(image), "image/png")})
    assert r.status_code == 413 and "--tiles" in r.json()["detail"] and "max_pixels" in r.json()["detail"]
    capped = TestClient(create_app(model, limits=limits.replace(max_tiled_pixels=150_000), tiles={}),
                        base_url="http://127.0.0.1:8000")
    r = capped.post("/api/images", files={"file": ("big.png", png_bytes(image), "image/png")})
    assert r.status_code == 413 and "0.156 MP, over the limit of 0.15 MP (max_tiled_pixels)" in r.json()["detail"]


def test_export_keeps_the_servers_exposure_rules(labelled):
    """/api/export is a POST like the others: other sites' pages and foreign Host names are refused."""
    client, image_id, objects, _ = labelled
    body = {"image_id": image_id, "format": "coco", "objects": objects}
    r = client.post("/api/export", json=body, headers={"origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    r = client.post("/api/export", json=body, headers={"sec-fetch-site": "cross-site"})
    assert r.status_code == 403
    r = client.post("/api/export", json=body, headers={"host": "evil.example"})
    assert r.status_code == 400 and "is not allowed" in r.json()["detail"]
    assert client.post("/api/export", json=body, headers={"origin": "http://127.0.0.1:8000"}).status_code == 200
