"""Issue 14, kind 2: explicit limits, checked before the expensive work, through every entry point.

A 17 KB PNG that declares 12000 x 12000 pixels (and one that declares 30000 x 30000, which PIL's
own check catches first) must be refused before a pixel is decoded (decoding is made to fail in
the test), by the intake, the predictor, the onnxruntime engine, the generator and pipelines, the
datasets, `samhq segment`, `samhq everything` (which goes on with the other images) and the server
(413 naming the option). The server reads an upload only up to its byte limit; too many prompts
are refused; no error echoes the request or a traceback back.
"""
import asyncio
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from test_automatic import tiny_256_model
from test_predictor import make_image

from samhq import limits, pipeline
from samhq.automatic import SamHQAutomaticMaskGenerator
from samhq.cli import main
from samhq.image_io import image_size, open_image, to_rgb_array
from samhq.limits import LimitError, Limits
from samhq.predictor import SamHQPredictor

from hostile import png_bomb, png_bytes

NO_GRAD = True
BOMB = png_bomb(12000, 12000)           # 144 MP of 1-bit pixels in ~17 KB
GIANT = png_bomb(30000, 30000, rows=1)  # declares 900 MP: PIL refuses it by itself
AMG_ARGS = ["--points-per-side", "4", "--pred-iou-thresh", "0.1", "--stability-thresh", "0.3", "--box-nms-thresh", "1.0"]


@pytest.fixture(scope="module")
def model():
    return tiny_256_model()


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    (root / "bomb.png").write_bytes(BOMB)
    (root / "giant.png").write_bytes(GIANT)
    Image.fromarray(make_image(40, 50, seed=1)).save(root / "good.png")
    (root / "truncated.png").write_bytes(png_bytes(make_image(40, 50, seed=2))[:300])
    model.save_pretrained(root / "model")
    return root


@pytest.fixture
def no_decoding(monkeypatch):
    """Any image decode fails the test: an over-limit image must be refused before it."""
    def decoded(self, *args, **kwargs):
        raise AssertionError("an over-limit image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)


def test_the_intake_refuses_before_decoding(files, no_decoding):
    for source in (BOMB, files / "bomb.png", str(files / "bomb.png")):
        with pytest.raises(LimitError, match=r"image is 12000x12000 pixels \(144 MP\), over the limit of 64 MP.*--max-pixels"):
            to_rgb_array(source)
        with pytest.raises(LimitError):
            open_image(source)
        with pytest.raises(LimitError):
            image_size(source)
    for source in (GIANT, files / "giant.png"):
        with pytest.raises(LimitError, match=r"900 MP\)?, over the limit of 64 MP"):
            to_rgb_array(source)
    # arrays and tensors that already exist are bounded too (these views take no memory)
    with pytest.raises(LimitError, match="8000x9000 pixels"):
        to_rgb_array(np.broadcast_to(np.zeros(1, np.uint8), (9000, 8000)))
    with pytest.raises(LimitError, match="8000x9000 pixels"):
        to_rgb_array(torch.zeros(1).expand(3, 9000, 8000))


def test_the_limit_is_configurable(files, monkeypatch):
    good = files / "good.png"  # 50 x 40 = 2000 pixels
    with pytest.raises(LimitError, match="50x40 pixels"):
        to_rgb_array(good, limits=Limits(max_pixels=1999))
    assert to_rgb_array(good, limits=Limits(max_pixels=2000)).shape == (40, 50, 3)
    previous = limits.configure(max_pixels=1000)
    try:
        with pytest.raises(LimitError):
            to_rgb_array(good)
    finally:
        limits.configure(previous)
    # PIL's own bomb check (twice Image.MAX_IMAGE_PIXELS) follows samhq's limit when that is higher
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    assert to_rgb_array(good, limits=Limits(max_pixels=2000)).shape == (40, 50, 3)
    with pytest.raises(ValueError):
        Limits(max_pixels=0)


def test_python_entry_points(files, model, no_decoding):
    bomb = files / "bomb.png"
    engines = [SamHQPredictor(model)]
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        engines.append(SamHQPredictor(model, engine="onnxruntime"))
    except ImportError:
        pass
    for engine in engines:
        with pytest.raises(LimitError, match="12000x12000"):
            engine.set_image(bomb)
    with pytest.raises(LimitError, match="12000x12000"):
        SamHQAutomaticMaskGenerator(model, points_per_side=4).generate(str(bomb))
    with pytest.raises(LimitError, match="12000x12000"):
        pipeline("mask-generation", model=model)(bomb)
    from samhq.processing import SamHQProcessor

    with pytest.raises(LimitError, match="12000x12000"):
        SamHQProcessor()(images=BOMB, return_tensors="pt")


def test_datasets_skip_the_bomb_and_keep_the_rest(files, tmp_path):
    from samhq.data.datasets import MaskFolder

    (tmp_path / "im").mkdir()
    (tmp_path / "gt").mkdir()
    (tmp_path / "im" / "bomb.png").write_bytes(BOMB)
    (tmp_path / "gt" / "bomb.png").write_bytes(BOMB)
    Image.fromarray(make_image(40, 50)).save(tmp_path / "im" / "good.png")
    Image.fromarray(np.eye(40, 50, dtype=np.uint8) * 255).save(tmp_path / "gt" / "good.png")
    ds = MaskFolder(tmp_path)
    assert [item["name"] for item in ds] == ["good"]
    (name, reason), = ds.skipped
    assert name == "bomb.png" and "12000x12000" in reason and "max_pixels" in reason


def test_segment_cli(files, capsys):
    code = main(["segment", str(files / "bomb.png"), "--model", str(files / "model"), "--point", "5,5",
                 "--out", str(files / "never.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("samhq segment: error: image is 12000x12000 pixels") and "--max-pixels" in err
    assert not (files / "never.png").exists()
    args = ["segment", str(files / "good.png"), "--model", str(files / "model"), "--point", "5,5", "--force"]
    assert main([*args, "--out", str(files / "a.png"), "--max-pixels", "1999"]) == 2
    assert "50x40 pixels" in capsys.readouterr().err
    assert main([*args, "--out", str(files / "a.png"), "--max-pixels", "2000"]) == 0
    assert main([*args, "--out", str(files / "a.png"), "--max-pixels", "0"]) == 2
    assert "--max-pixels must be at least 1" in capsys.readouterr().err
    assert limits.get_limits() == Limits()  # the command's options do not outlive it


def test_everything_goes_on_after_a_bomb(files, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for name in ("bomb.png", "giant.png", "good.png", "truncated.png"):
        (tmp_path / "in" / name).write_bytes((files / name).read_bytes())
    code = main(["everything", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", str(files / "model"),
                 *AMG_ARGS])
    out, err = capsys.readouterr()
    assert code == 1  # some images failed
    assert "1 images done, 0 skipped (already done), 3 failed" in out
    lines = err.strip().splitlines()
    assert any("skipped" in ln and "bomb.png" in ln and "12000x12000" in ln and "--max-pixels" in ln for ln in lines)
    assert any("skipped" in ln and "giant.png" in ln and "900 MP" in ln for ln in lines)
    assert any("skipped" in ln and "truncated.png" in ln for ln in lines)
    assert (tmp_path / "out" / "good.json").exists()


# ---------------------------------------------------------------------------------------------
# prompts


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_prompt_count_limit_in_python(model, engine):
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    predictor = SamHQPredictor(model, engine=engine)
    predictor.set_image(make_image(40, 50))
    pts = np.random.default_rng(0).random((300, 2)) * 40
    with pytest.raises(LimitError, match=r"300 points and 0 boxes in one request, over the limit of 256 .*--max-prompts"):
        predictor.predict(point_coords=pts, point_labels=np.ones(300))
    boxes = torch.tensor([[1.0, 1.0, 30.0, 30.0]]).repeat(300, 1)
    with pytest.raises(LimitError, match="0 points and 300 boxes"):
        predictor.predict_torch(None, None, predictor.transform.apply_boxes_torch(boxes, predictor.original_size))
    previous = limits.configure(max_prompts=300)
    try:
        masks, _, _ = predictor.predict(point_coords=pts, point_labels=np.ones(300))
        assert masks.shape[-2:] == (40, 50)
    finally:
        limits.configure(previous)


def test_prompt_count_limit_in_the_cli(files, capsys):
    points = [a for i in range(300) for a in ("--point", f"{i % 50},{i % 40}")]
    args = ["segment", str(files / "good.png"), "--model", str(files / "model"), *points, "--force",
            "--out", str(files / "p.png")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "300 points" in err and "--max-prompts" in err
    assert main([*args, "--max-prompts", "300"]) == 0


# ---------------------------------------------------------------------------------------------
# the server


@pytest.fixture(scope="module")
def app(model):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from samhq.server import create_app

    return create_app(model, limits=Limits(max_upload_bytes=64 * 1024, max_request_bytes=32 * 1024, max_prompts=100))


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False)


def upload(client, data, name="x.png"):
    return client.post("/api/images", files={"file": (name, data, "image/png")})


def test_server_refuses_bombs_and_bad_files(client, files):
    r = upload(client, BOMB)
    assert r.status_code == 413 and "12000x12000" in r.json()["detail"] and "--max-pixels" in r.json()["detail"]
    r = upload(client, GIANT)
    assert r.status_code == 413 and "900 MP" in r.json()["detail"]
    r = upload(client, (files / "truncated.png").read_bytes())
    assert r.status_code == 400 and "cannot read the upload as an image" in r.json()["detail"]
    assert upload(client, (files / "good.png").read_bytes()).status_code == 200


def test_server_upload_and_request_bytes(client):
    big = png_bytes(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))  # ~120 KB
    r = upload(client, big)
    assert r.status_code == 413
    detail = r.json()["detail"]
    assert "64 KiB" in detail and "--max-upload-mb" in detail and len(detail) < 300
    r = client.post("/api/segment", json={"image_id": "0" * 16, "points": [[1.5, 2.5]] * 5000})  # ~60 KB of JSON
    assert r.status_code == 413 and "--max-request-kb" in r.json()["detail"]


def test_server_reads_an_upload_only_up_to_the_limit(app):
    """Driven at the ASGI level, where every chunk the server asks for is counted."""
    head = (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")

    def run(headers):
        asked = 0

        async def receive():
            nonlocal asked
            asked += 1
            body = head if asked == 1 else b"x" * 16384
            return {"type": "http.request", "body": body, "more_body": asked < 12800}  # 200 MB offered

        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/api/images", "raw_path": b"/api/images", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
                 "headers": [(b"host", b"127.0.0.1:8000"),
                             (b"content-type", b"multipart/form-data; boundary=xyz"), *headers]}
        asyncio.run(app(scope, receive, send))
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return status, json.loads(body)["detail"], asked

    status, detail, asked = run([])  # streamed (chunked): stopped once past 64 KiB
    assert status == 413 and "--max-upload-mb" in detail
    assert asked <= 2 + 64 * 1024 // 16384
    status, detail, asked = run([(b"content-length", str(200 * 2**20).encode())])  # declared: refused unread
    assert status == 413 and asked == 0


def test_server_prompt_limit_and_short_errors(client, files):
    image_id = upload(client, (files / "good.png").read_bytes()).json()["image_id"]
    r = client.post("/api/segment", json={"image_id": image_id, "points": [[1, 1]] * 101})
    assert r.status_code == 413 and "101 points" in r.json()["detail"] and "--max-prompts" in r.json()["detail"]
    assert client.post("/api/segment", json={"image_id": image_id, "points": [[1, 1]] * 100}).status_code == 200
    # validation errors: short, and without the input that was sent
    r = client.post("/api/segment", json={"image_id": image_id, "points": [["A" * 20000, 1]]})
    assert r.status_code == 400 and len(r.text) < 500 and "AAAA" not in r.text and "points" in r.json()["detail"]
    r = client.post("/api/segment", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and len(r.text) < 500
    r = client.post("/api/segment", json={"image_id": "x" * 10000, "points": [[1, 1]]})
    assert r.status_code == 400 and "xxxxxxxx" not in r.text


def test_server_internal_errors_leak_nothing(app, client, files, monkeypatch):
    image_id = upload(client, (files / "good.png").read_bytes()).json()["image_id"]

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app.state.session, "segment", broken)
    r = client.post("/api/segment", json={"image_id": image_id, "points": [[1, 1]]})
    assert r.status_code == 500 and r.json()["detail"].startswith("internal server error (RuntimeError)")
    assert "secret" not in r.text and "Traceback" not in r.text
