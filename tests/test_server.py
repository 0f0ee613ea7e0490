"""`samhq serve`: the JSON API against the predictor called directly, its errors, and the page."""
import base64
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from samhq.data.synthetic import SyntheticShapes  # noqa: E402
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
def served():
    item = SyntheticShapes(1, (96, 128), seed=1000)[0]
    app = create_app("samhq-tiny-shapes", max_images=2)
    return TestClient(app, base_url="http://127.0.0.1:8000"), item


def test_segment_matches_the_predictor(served):
    client, item = served
    r = client.post("/api/images", files={"file": ("a.png", png_bytes(item["image"]), "image/png")})
    assert r.status_code == 200, r.text
    info = r.json()
    assert (info["width"], info["height"]) == (128, 96) and len(info["image_id"]) == 16
    again = client.post("/api/images", files={"file": ("b.png", png_bytes(item["image"]), "image/png")}).json()
    assert again["image_id"] == info["image_id"]  # same bytes, same id

    ref = SamHQPredictor.from_pretrained("samhq-tiny-shapes")
    ref.set_image(item["image"])
    ys, xs = np.nonzero(item["masks"][0])
    point, box = [float(xs[0]), float(ys[0])], [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    cases = [
        (dict(points=[point], labels=[1]), dict(point_coords=np.array([point]), point_labels=np.array([1]))),
        (dict(box=box, hq_token_only=True), dict(box=np.array(box), hq_token_only=True)),
        (dict(points=[point, [5.0, 5.0]], labels=[1, 0], box=box),
         dict(point_coords=np.array([point, [5.0, 5.0]]), point_labels=np.array([1, 0]), box=np.array(box))),
    ]
    for body, kwargs in cases:
        r = client.post("/api/segment", json={"image_id": info["image_id"], **body})
        assert r.status_code == 200, r.text
        out = r.json()
        masks, scores, _ = ref.predict(multimask_output=False, **kwargs)
        got = decode_mask(out["mask_png"])
        assert got.shape == (96, 128)
        np.testing.assert_array_equal(got, masks[0])
        assert out["score"] == pytest.approx(float(scores[0]), abs=1e-6) and out["area"] == int(masks[0].sum())


def test_errors_are_clear(served):
    client, item = served
    image_id = client.post("/api/images", files={"file": ("a.png", png_bytes(item["image"]), "image/png")}).json()["image_id"]
    r = client.post("/api/images", files={"file": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 400 and "cannot read the upload as an image" in r.json()["detail"]
    r = client.post("/api/segment", json={"image_id": "0123456789abcdef", "points": [[1, 1]]})
    assert r.status_code == 404 and "upload the image first" in r.json()["detail"]
    r = client.post("/api/segment", json={"image_id": image_id})
    assert r.status_code == 400 and "give a prompt" in r.json()["detail"]
    r = client.post("/api/segment", json={"image_id": image_id, "box": [50, 50, 10, 10]})
    assert r.status_code == 400 and "x1" in r.json()["detail"].lower()
    r = client.post("/api/segment", json={"image_id": image_id, "points": [[1, 1], [2, 2]], "labels": [1]})
    assert r.status_code == 400 and "labels" in r.json()["detail"]
    r = client.post("/api/segment", json={"image_id": image_id, "points": [[1, 2, 3]]})
    assert r.status_code == 400 and "point_coords" in r.json()["detail"]


def test_oldest_embedding_is_dropped(served):
    client, _ = served
    ids = []
    for seed in range(3):  # max_images=2
        image = SyntheticShapes(1, 64, seed=seed)[0]["image"]
        ids.append(client.post("/api/images", files={"file": ("a.png", png_bytes(image), "image/png")}).json()["image_id"])
    assert client.post("/api/segment", json={"image_id": ids[0], "points": [[3, 3]]}).status_code == 404
    assert client.post("/api/segment", json={"image_id": ids[2], "points": [[3, 3]]}).status_code == 200


def test_page_and_info(served):
    client, _ = served
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/api/segment" in page.text and "/api/images" in page.text
    info = client.get("/api/info").json()
    assert info["model"] == "samhq-tiny-shapes" and info["hq"] is True and info["image_size"] == 256


def test_cli_rejects_a_bad_port():
    r = subprocess.run([sys.executable, "-m", "samhq.cli", "serve", "--port", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--port" in r.stderr and len(r.stderr.strip().splitlines()) == 1
