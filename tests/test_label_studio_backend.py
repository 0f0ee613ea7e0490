"""The Label Studio ML backend's protocol, in process: Label Studio's requests (as its ml/api_connector
sends them) answered with the masks samhq's own predictor and automatic generator give for the same
prompts; images fetched with the key from a stand-in for Label Studio's file serving (a local HTTP
server that checks the key, redirects, and exchanges personal access tokens); access rules.
The same flows against a real Label Studio are in test_label_studio_server.py."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("rasterio")

from fastapi.testclient import TestClient  # noqa: E402

from samhq.automatic import SamHQAutomaticMaskGenerator  # noqa: E402
from samhq.formats import label_studio_config, ls_rle_to_mask, polygons_to_mask  # noqa: E402
from samhq.label_studio import LabelConfig, create_label_studio_app  # noqa: E402
from samhq.predictor import SamHQPredictor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGE = (ROOT / "examples" / "shapes.png").read_bytes()
TOKEN, JWT, ACCESS = "legacy-token-123", "header.payload.signature", "access-1"
CONFIG = label_studio_config({1: "shape", 2: "other"}, "brush")
POLY_CONFIG = label_studio_config({1: "shape"}, "polygon", from_name="poly")


class StandIn(BaseHTTPRequestHandler):
    """Label Studio's file serving as the backend meets it: /data/... needs the key."""

    seen: list = []

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", ctype="application/json", headers=()):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        auth = self.headers.get("Authorization")
        StandIn.seen.append((self.server.server_port, self.path, auth))
        if self.path.startswith("/data/upload/"):
            return self._send(200, IMAGE, "image/png") if auth in (f"Token {TOKEN}", f"Bearer {ACCESS}") else self._send(401)
        if self.path == "/data/moved":
            return self._send(302, headers=[("Location", self.server.elsewhere + "/public.png")])
        if self.path == "/public.png":
            return self._send(200, IMAGE, "image/png")
        if self.path == "/data/not-an-image":
            return self._send(200, b"hello", "text/plain") if auth else self._send(401)
        self._send(404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/token/refresh" and body.get("refresh") == JWT:
            return self._send(200, json.dumps({"access": ACCESS}).encode())
        self._send(401)


def serve():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def env():
    from samhq import SamHQModel

    ls, other = serve(), serve()
    ls.elsewhere = f"http://127.0.0.1:{other.server_port}"
    model = SamHQModel.from_pretrained("samhq-tiny-shapes")
    url = f"http://127.0.0.1:{ls.server_port}"
    app = create_label_studio_app(model, url, TOKEN, auto="everything", points_per_side=4, pred_iou_thresh=0.5,
                                  stability_thresh=0.5, polygon_tolerance=0.0, max_images=2)
    client = TestClient(app, base_url="http://localhost:9090")
    image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(ROOT / "examples" / "shapes.png").convert("RGB"))
    ref = SamHQPredictor(model)
    ref.set_image(image)
    yield {"client": client, "app": app, "model": model, "image": image, "ref": ref, "url": url, "other": other}
    ls.shutdown()
    other.shutdown()


def task(path="/data/upload/1/shapes.png"):
    return {"id": 7, "data": {"image": path}}


def click(x, y, positive=True, label="shape", w=128, h=128):
    """A smart keypoint in the middle of pixel (x, y), in Label Studio's percent form."""
    return {"type": "keypointlabels", "from_name": "label_click", "to_name": "image", "original_width": w,
            "original_height": h, "is_positive": positive,
            "value": {"x": (x + 0.5) / w * 100, "y": (y + 0.5) / h * 100, "width": 0.6, "keypointlabels": [label]}}


def rect(x0, y0, x1, y1, label="shape", rotation=0, w=128, h=128):
    """A smart rectangle from pixel edge (x0, y0) to pixel edge (x1, y1)."""
    return {"type": "rectanglelabels", "from_name": "label_box", "to_name": "image", "original_width": w,
            "original_height": h, "value": {"x": x0 / w * 100, "y": y0 / h * 100, "width": (x1 - x0) / w * 100,
                                            "height": (y1 - y0) / h * 100, "rotation": rotation,
                                            "rectanglelabels": [label]}}


def predict(client, context=None, config=CONFIG, tasks=None):
    body = {"tasks": tasks or [task()], "project": "1.1700000000", "label_config": config,
            "params": {"login": None, "password": None, "context": context}}
    return client.post("/predict", json=body)


def brush_masks(results, tmp_path=None):
    """Decode brushlabels results (ls_rle_to_mask: checked against Label Studio's SDK in test_formats_writers)."""
    return [ls_rle_to_mask(r["value"]["rle"], r["original_height"], r["original_width"]) for r in results]


def test_health_setup_versions(env):
    c = env["client"]
    assert c.get("/health").json()["status"] == "UP" and c.get("/").status_code == 200
    r = c.post("/setup", json={"project": "1.1700000000", "schema": CONFIG, "hostname": "http://x", "access_token": "t"})
    assert r.status_code == 200 and r.json()["model_version"] == "samhq-SamHQModel"
    assert c.get("/versions").json() == {"versions": ["samhq-SamHQModel"]}
    bad = c.post("/setup", json={"project": "1.1", "schema": '<View><Image name="image" value="$image"/>'
                                 '<Choices name="c" toName="image"><Choice value="a"/></Choices></View>'})
    assert bad.status_code == 400 and "BrushLabels" in bad.json()["detail"]
    assert c.post("/setup", json={"schema": "<View"}).status_code == 400


@pytest.mark.parametrize("name, context, prompt", [
    ("click", [click(93, 34)], dict(point_coords=[[93, 34]], point_labels=[1])),
    ("clicks", [click(93, 34), click(40, 90, positive=False)], dict(point_coords=[[93, 34], [40, 90]], point_labels=[1, 0])),
    ("box", [rect(70, 10, 120, 60)], dict(box=[69.5, 9.5, 119.5, 59.5])),
    ("box and click", [rect(70, 10, 120, 60), click(93, 34)], dict(point_coords=[[93, 34]], point_labels=[1],
                                                                   box=[69.5, 9.5, 119.5, 59.5])),
])
def test_interactive_brush_equals_the_predictor(env, tmp_path, name, context, prompt):
    r = predict(env["client"], {"result": context})
    assert r.status_code == 200, r.text
    (pred,) = r.json()["results"]
    (region,) = pred["result"]
    assert region["type"] == "brushlabels" and region["from_name"] == "label" and region["to_name"] == "image"
    assert region["value"]["brushlabels"] == ["shape"] and (region["original_width"], region["original_height"]) == (128, 128)
    masks, scores, _ = env["ref"].predict(**{k: np.asarray(v, dtype=float) for k, v in prompt.items()}, multimask_output=False)
    (got,) = brush_masks([region], tmp_path)
    assert got.any() and np.array_equal(got, masks[0])
    assert pred["score"] == pytest.approx(float(scores[0]), abs=1e-6) and pred["model_version"] == "samhq-SamHQModel"


def test_label_picks_the_control_and_polygons_read_back(env):
    config = ('<View><Image name="image" value="$image"/>'
              '<BrushLabels name="b" toName="image"><Label value="shape"/></BrushLabels>'
              '<PolygonLabels name="p" toName="image"><Label value="other"/></PolygonLabels>'
              '<KeyPointLabels name="k" toName="image" smart="true"><Label value="shape"/><Label value="other"/></KeyPointLabels>'
              '</View>')
    r = predict(env["client"], {"result": [click(93, 34, label="other")]}, config=config)
    regions = r.json()["results"][0]["result"]
    assert {g["type"] for g in regions} == {"polygonlabels"} and all(g["from_name"] == "p" for g in regions)
    rings = [[np.array(g["value"]["points"]) / 100 * 128] for g in regions]
    masks, _, _ = env["ref"].predict(point_coords=np.array([[93.0, 34.0]]), point_labels=np.array([1]), multimask_output=False)
    assert np.array_equal(polygons_to_mask(rings, 128, 128), masks[0])  # polygon_tolerance=0: exact
    r = predict(env["client"], {"result": [click(93, 34, label="nope")]}, config=config)
    assert r.status_code == 400 and "no BrushLabels / PolygonLabels control has the label 'nope'" in r.json()["detail"]


def test_rotated_box_uses_its_bounds_and_several_boxes_give_several_masks(env, tmp_path):
    c = env["client"]
    # a 40 x 20 box rotated 90 degrees clockwise about its top-left corner (80, 20): x 60..80, y 20..60
    r = predict(c, {"result": [rect(80, 20, 120, 40, rotation=90)]})
    (got,) = brush_masks(r.json()["results"][0]["result"], tmp_path)
    expect = env["ref"].predict(box=np.array([59.5, 19.5, 79.5, 59.5]), multimask_output=False)[0][0]
    assert np.array_equal(got, expect)
    r = predict(c, {"result": [rect(70, 10, 120, 60), rect(5, 60, 60, 120)]})
    got = brush_masks(r.json()["results"][0]["result"], tmp_path)
    assert len(got) == 2
    assert np.array_equal(got[1], env["ref"].predict(box=np.array([4.5, 59.5, 59.5, 119.5]), multimask_output=False)[0][0])


def test_automatic_everything_equals_the_generator(env, tmp_path):
    r = predict(env["client"], None, tasks=[task(), task()])
    assert r.status_code == 200, r.text
    a, b = r.json()["results"]
    ref = SamHQAutomaticMaskGenerator(env["model"], points_per_side=4, pred_iou_thresh=0.5,
                                      stability_score_thresh=0.5).generate(env["image"])
    assert len(a["result"]) == len(ref) > 0 and a["result"] and len(b["result"]) == len(ref)
    got = brush_masks(a["result"], tmp_path)
    assert all(np.array_equal(g, rec["segmentation"]) for g, rec in zip(got, ref))
    assert a["score"] == pytest.approx(np.mean([rec["predicted_iou"] for rec in ref]), abs=1e-6)
    assert {g["value"]["brushlabels"][0] for g in a["result"]} == {"shape"}  # the mask control's first label


def test_each_image_is_embedded_once(env):
    backend = env["app"].state.backend
    start = getattr(backend.predictor, "embedded", 0)
    for _ in range(3):
        assert predict(env["client"], {"result": [click(93, 34)]}).status_code == 200
    predict(env["client"], None)
    assert backend.predictor.embedded - start <= 1  # at most the first request embeds (earlier tests may have)


def test_automatic_prompt_modes(env, tmp_path):
    app = create_label_studio_app(env["model"], env["url"], TOKEN, auto="point:73,27", auto_label="other")
    r = TestClient(app, base_url="http://localhost").post("/predict", json={"tasks": [task()], "label_config": CONFIG})
    (region,) = r.json()["results"][0]["result"]
    assert region["value"]["brushlabels"] == ["other"]
    expect = env["ref"].predict(point_coords=np.array([[73 * 1.28 - 0.5, 27 * 1.28 - 0.5]]), point_labels=np.array([1]),
                                multimask_output=False)[0][0]
    assert np.array_equal(brush_masks([region], tmp_path)[0], expect)
    app = create_label_studio_app(env["model"], env["url"], TOKEN, auto="none")
    r = TestClient(app, base_url="http://localhost").post("/predict", json={"tasks": [task()], "label_config": CONFIG})
    assert r.json()["results"][0]["result"] == []
    with pytest.raises(ValueError, match="point:X,Y"):
        create_label_studio_app(env["model"], env["url"], TOKEN, auto="point:50")


def test_images_key_redirects_and_personal_access_tokens(env):
    c = env["client"]
    StandIn.seen.clear()
    # a redirect off Label Studio's origin drops the key
    r = predict(c, {"result": [click(93, 34)]}, tasks=[task("/data/moved")])
    assert r.status_code == 200, r.text
    assert [(p, a) for port, p, a in StandIn.seen] == [("/data/moved", f"Token {TOKEN}"), ("/public.png", None)]
    # full URLs: Label Studio's own origin gets the key; other hosts are refused unless allowed
    assert predict(c, {"result": [click(93, 34)]}, tasks=[task(env["url"] + "/data/upload/1/shapes.png")]).status_code == 200
    r = predict(c, {"result": [click(93, 34)]}, tasks=[task("http://192.0.2.1/a.png")])
    assert r.status_code == 502 and "--image-host 192.0.2.1" in r.json()["detail"]
    r = predict(c, {"result": [click(93, 34)]}, tasks=[task("s3://bucket/a.png")])
    assert r.status_code == 502 and "only Label Studio paths" in r.json()["detail"]
    r = predict(c, {"result": [click(93, 34)]}, tasks=[task("/data/not-an-image")])
    assert r.status_code == 502 and "not an image" in r.json()["detail"]
    # a wrong key: Label Studio's 401, said in one line
    app = create_label_studio_app(env["model"], env["url"], "wrong", auto="none")
    r = TestClient(app, base_url="http://localhost").post("/predict", json={
        "tasks": [task()], "label_config": CONFIG, "params": {"context": {"result": [click(93, 34)]}}})
    assert r.status_code == 502 and "401" in r.json()["detail"] and "--api-key" in r.json()["detail"]
    # a personal access token (a JWT) is exchanged for an access token, sent as Bearer
    StandIn.seen.clear()
    app = create_label_studio_app(env["model"], env["url"], JWT, auto="none")
    r = TestClient(app, base_url="http://localhost").post("/predict", json={
        "tasks": [task()], "label_config": CONFIG, "params": {"context": {"result": [click(93, 34)]}}})
    assert r.status_code == 200, r.text
    assert StandIn.seen[-1][2] == f"Bearer {ACCESS}"


def test_host_cors_and_basic_auth(env):
    app = env["app"]
    assert TestClient(app, base_url="http://127.0.0.1:9090").get("/health").status_code == 200
    assert TestClient(app, base_url="http://evil.example:9090").get("/health").status_code == 400  # DNS rebinding
    c = env["client"]
    ok = c.options("/predict", headers={"Origin": env["url"], "Access-Control-Request-Method": "POST"})
    assert ok.headers.get("access-control-allow-origin") == env["url"]
    no = c.options("/predict", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in no.headers
    guarded = create_label_studio_app(env["model"], env["url"], TOKEN, auto="none", basic_auth=("ls", "secret"),
                                      allowed_hosts=["ml-backend"])
    g = TestClient(guarded, base_url="http://ml-backend:9090")
    assert g.get("/health").status_code == 401
    assert g.get("/health", auth=("ls", "wrong")).status_code == 401
    assert g.get("/health", auth=("ls", "secret")).status_code == 200


def test_bad_requests_are_400_with_a_reason(env):
    c = env["client"]
    assert c.post("/predict", content=b"not json").status_code == 400
    r = c.post("/predict", json={"tasks": "x"})
    assert r.status_code == 400 and "tasks" in r.json()["detail"]
    r = predict(c, {"result": [dict(click(93, 34), value={"x": "a", "y": 3, "keypointlabels": ["shape"]})]})
    assert r.status_code == 400 and "x must be a number" in r.json()["detail"]
    r = predict(c, {"result": [click(93, 34)]}, tasks=[{"id": 1, "data": {"text": "no image"}}])
    assert r.status_code == 400 and "data['image']" in r.json()["detail"]
    r = predict(c, {"result": [{"type": "choices", "value": {"choices": ["a"]}}]})
    assert r.status_code == 200 and r.json()["results"][0]["result"] == []  # nothing to prompt with


def test_label_config_parse():
    cfg = LabelConfig.parse(CONFIG)
    assert cfg.images == {"image": "image"}
    assert [(c.tag, c.name, c.labels) for c in cfg.controls] == [
        ("BrushLabels", "label", ["shape", "other"]), ("KeyPointLabels", "label_click", ["shape", "other"]),
        ("RectangleLabels", "label_box", ["shape", "other"])]
    assert LabelConfig.parse(POLY_CONFIG).mask_control("shape").name == "poly"
    with pytest.raises(ValueError, match="not valid XML"):
        LabelConfig.parse("<View><Image></View>")
