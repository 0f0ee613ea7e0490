"""Issue 14, kind 6: the server's cache keeps what is being used, and a server on loopback answers
only loopback Host names and its own page's uploads (DNS rebinding, cross-site posts), with options
for a deployment behind a proxy. `samhq serve`'s options reach the app. (The page itself is driven
in headless Chromium by test_server_browser.py.)"""
import io

import numpy as np
import pytest
from PIL import Image
from test_predictor import make_image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from samhq.cli import main  # noqa: E402
from samhq.server import create_app, host_allowed  # noqa: E402

NO_GRAD = True


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_image(40, 50, seed=seed)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def app():
    return create_app("samhq-tiny-shapes", max_images=2)


def client_for(app, base="http://127.0.0.1:8000"):
    return TestClient(app, base_url=base)


def upload(client, data, **headers):
    return client.post("/api/images", files={"file": ("a.png", data, "image/png")}, headers=headers)


def segment(client, image_id, **headers):
    return client.post("/api/segment", json={"image_id": image_id, "points": [[5, 5]]}, headers=headers)


def test_the_cache_drops_the_least_recently_used(app):
    client = client_for(app)
    a, b = (upload(client, png(i)).json()["image_id"] for i in (1, 2))
    assert segment(client, a).status_code == 200  # a is used: b is now the least recently used
    c = upload(client, png(3)).json()["image_id"]
    assert segment(client, b).status_code == 404
    assert segment(client, a).status_code == 200 and segment(client, c).status_code == 200
    assert upload(client, png(1)).json()["image_id"] == a  # uploading the same bytes again is a use too
    d = upload(client, png(4)).json()["image_id"]  # c is now the least recently used
    assert segment(client, c).status_code == 404
    assert segment(client, a).status_code == 200 and segment(client, d).status_code == 200


def test_loopback_server_answers_loopback_hosts_only(app):
    for base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://localhost", "http://[::1]:8000"):
        assert client_for(app, base).get("/api/info").status_code == 200, base
    for host in ("attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example", "localhost.evil"):
        r = client_for(app).get("/api/info", headers={"host": host})
        assert r.status_code == 400, host
        assert "is not allowed" in r.json()["detail"] and "--allowed-hosts" in r.json()["detail"]
    r = client_for(app).get("/", headers={"host": "x" * 5000})
    assert r.status_code == 400 and len(r.text) < 500  # never echoes the request back


def test_host_options():
    assert host_allowed("seg.example.org:443", ["localhost", "seg.example.org"])
    assert host_allowed("a.b.example.org", ["*.example.org"]) and not host_allowed("example.org.evil", ["*.example.org"])
    assert host_allowed("anything", ["*"])
    open_app = create_app("samhq-tiny-shapes", host="0.0.0.0")  # bound to every interface: any Host
    assert client_for(open_app, "http://192.168.1.20:8000").get("/api/info").status_code == 200
    proxied = create_app("samhq-tiny-shapes", allowed_hosts=["localhost", "seg.example.org"],
                         allowed_origins=["https://seg.example.org"])
    client = client_for(proxied, "http://seg.example.org")
    assert client.get("/api/info").status_code == 200
    assert client_for(proxied, "http://other.example").get("/api/info").status_code == 400
    assert upload(client, png(1), origin="https://seg.example.org").status_code == 200
    assert upload(client, png(1), origin="https://other.example").status_code == 403


def test_cross_origin_writes_are_refused(app):
    client = client_for(app)
    image_id = upload(client, png(5)).json()["image_id"]  # no Origin: not a browser (curl, scripts)
    assert upload(client, png(5), origin="http://127.0.0.1:8000", **{"sec-fetch-site": "same-origin"}).status_code == 200
    assert segment(client, image_id, origin="http://127.0.0.1:8000").status_code == 200
    for headers in ({"origin": "http://attacker.example"}, {"origin": "null"}, {"origin": "http://127.0.0.1:9999"},
                    {"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"}):
        for r in (upload(client, png(6), **headers), segment(client, image_id, **headers)):
            assert r.status_code == 403, headers
            assert "refused" in r.json()["detail"] and "--allowed-origins" in r.json()["detail"]
    assert client.get("/api/info", headers={"origin": "http://attacker.example"}).status_code == 200  # reads are fine


def test_serve_options_reach_the_app(monkeypatch, capsys):
    uvicorn = pytest.importorskip("uvicorn")
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    assert main(["serve", "--port", "8123", "--max-upload-mb", "0.05", "--max-prompts", "3", "--max-pixels", "1000",
                 "--allowed-hosts", "seg.example.org", "--allowed-origins", "https://seg.example.org",
                 "--max-images", "1", "--threads", "1"]) == 0
    capsys.readouterr()
    assert started["port"] == 8123 and started["host"] == "127.0.0.1"
    client = client_for(started["app"], "http://seg.example.org")
    assert client.get("/api/info").json()["max_prompts"] == 3
    assert client_for(started["app"], "http://localhost:8123").get("/api/info").status_code == 200
    big = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    r = upload(client, buf.getvalue())
    assert r.status_code == 413 and "--max-upload-mb" in r.json()["detail"]
    r = upload(client, png(1))  # 50 x 40 = 2000 pixels
    assert r.status_code == 413 and "--max-pixels" in r.json()["detail"]
    for bad in (["--max-upload-mb", "0"], ["--max-prompts", "0"], ["--port", "70000"]):
        assert main(["serve", *bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
