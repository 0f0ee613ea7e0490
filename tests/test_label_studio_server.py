"""The ML backend against a real Label Studio (the `label-studio` package in its own environment):
a project with brush + smart keypoint + smart rectangle tools, an uploaded task image, the backend
connected through Label Studio's API; interactive predictions for a click and a box requested through
Label Studio, decoded with Label Studio's SDK, equal the predictor's masks; Label Studio's "retrieve
predictions" action stores the automatic masks; a tasks file from samhq.formats imports with its
predictions intact.

Label Studio: $SAMHQ_LABEL_STUDIO_URL with $SAMHQ_LABEL_STUDIO_TOKEN (a legacy API token; .ci/run
starts one instance per CI run), else one this module starts from the environment in
tests/label_studio_env.py (about 3 minutes on two busy cores, mostly its database migrations). Skips
when neither is there, or when Label Studio could not be installed or started ($SAMHQ_LABEL_STUDIO=off,
or the file $SAMHQ_LABEL_STUDIO_STATUS, which .ci/run writes when its Label Studio fails). Label
Studio must allow backends on loopback: ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false
(the latter for the webhook it registers for every backend)."""
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from label_studio_env import ls_venv, run_in_ls

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("rasterio")

from samhq.automatic import SamHQAutomaticMaskGenerator  # noqa: E402
from samhq.formats import label_studio_config, to_label_studio  # noqa: E402
from samhq.label_studio import create_label_studio_app  # noqa: E402
from samhq.predictor import SamHQPredictor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "examples" / "shapes.png"
START_TIMEOUT = float(os.environ.get("SAMHQ_LABEL_STUDIO_START_TIMEOUT", 900))
AMG = dict(points_per_side=4, pred_iou_thresh=0.5, stability_thresh=0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout: float, proc=None, status=None) -> bool:
    """Poll url/health; False when it does not answer in time, the process ends or the status file says failed."""
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            return False
        if status is not None and Path(status).exists():
            return False
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(2)
    return False


def start_label_studio(tmp: Path):
    """label-studio start on a free loopback port, with a user, a legacy token and local backends allowed."""
    venv = ls_venv()
    if venv is None or not (venv / "bin" / "label-studio").exists():
        pytest.skip("no Label Studio: set SAMHQ_LABEL_STUDIO_URL/_TOKEN or install it into .ci-ls-venv (see .ci/run)")
    port, token = free_port(), "samhq-test-token-0123456789"
    env = dict(os.environ, LABEL_STUDIO_USERNAME="test@samhq.local", LABEL_STUDIO_PASSWORD="samhq-test-pass",
               LABEL_STUDIO_USER_TOKEN=token, LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true", ML_BLOCK_LOCAL_IP="false",
               SSRF_PROTECTION_ENABLED="false",
               LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true", DJANGO_DB="sqlite")
    log = open(tmp / "label_studio.log", "w")
    proc = subprocess.Popen([str(venv / "bin" / "label-studio"), "start", "--no-browser", "--host", "127.0.0.1",
                             "--port", str(port), "--data-dir", str(tmp / "data")], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if not wait_up(url, START_TIMEOUT, proc):
        proc.terminate()
        proc.wait(30)
        tail = (tmp / "label_studio.log").read_text()[-1500:]
        pytest.skip(f"Label Studio did not start within {START_TIMEOUT:.0f} s: {tail}")
    return url, token, proc


@pytest.fixture(scope="module")
def ls(tmp_path_factory):
    if os.environ.get("SAMHQ_LABEL_STUDIO") == "off":
        pytest.skip("SAMHQ_LABEL_STUDIO=off: Label Studio could not be installed or started (see .ci/run's output)")
    url, token, proc = os.environ.get("SAMHQ_LABEL_STUDIO_URL"), os.environ.get("SAMHQ_LABEL_STUDIO_TOKEN"), None
    if url and token:
        status = os.environ.get("SAMHQ_LABEL_STUDIO_STATUS")
        if not wait_up(url, START_TIMEOUT, status=status):
            why = Path(status).read_text().strip() if status and Path(status).exists() else "no answer"
            pytest.skip(f"Label Studio at SAMHQ_LABEL_STUDIO_URL={url} did not start within {START_TIMEOUT:.0f} s ({why})")
    else:
        url, token, proc = start_label_studio(tmp_path_factory.mktemp("label_studio"))
    client = httpx.Client(base_url=url, headers={"Authorization": f"Token {token}"}, timeout=300)
    yield url, token, client
    client.close()
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def backend(ls):
    """The samhq backend on a free loopback port, in this process."""
    from samhq import SamHQModel

    url, token, _ = ls
    model = SamHQModel.from_pretrained("samhq-tiny-shapes")
    app = create_label_studio_app(model, url, token, auto="everything", **AMG)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.time() + 60
    while not server.started and time.time() < end:
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}", model, app
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def project(ls, backend):
    """A project with the samhq config, the backend connected (interactive) and shapes.png uploaded."""
    _, _, c = ls
    backend_url, _, _ = backend
    r = c.post("/api/projects", json={"title": "samhq test", "label_config": label_studio_config({1: "shape"}, "brush")})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    r = c.post("/api/ml", json={"url": backend_url, "project": pid, "title": "samhq", "is_interactive": True})
    assert r.status_code == 201, r.text
    ml = r.json()
    assert ml["state"] == "CO", ml  # Label Studio called /health and /setup: connected
    with open(SHAPES, "rb") as f:
        r = c.post(f"/api/projects/{pid}/import", files={"file": ("shapes.png", f, "image/png")})
    assert r.status_code == 201, r.text
    tasks = c.get("/api/tasks", params={"project": pid}).json()["tasks"]
    assert len(tasks) == 1 and tasks[0]["data"]["image"].startswith(f"/data/upload/{pid}/")
    yield pid, ml["id"], tasks[0]
    c.delete(f"/api/projects/{pid}")


def sdk_decode(regions, tmp_path):
    """Label Studio's SDK decodes the brush regions (in Label Studio's environment)."""
    out = run_in_ls(
        "import numpy as np\nfrom label_studio_sdk.converter.brush import decode_rle\n"
        "json.dump([np.asarray(decode_rle(r['value']['rle'])).reshape(r['original_height'], r['original_width'], 4)"
        "[:, :, 3].astype(int).tolist() for r in IN], open(OUT, 'w'))\n", regions, tmp_path)
    return [np.array(m) == 255 for m in out]


@pytest.fixture(scope="module")
def reference(backend):
    from PIL import Image

    _, model, _ = backend
    image = np.asarray(Image.open(SHAPES).convert("RGB"))
    predictor = SamHQPredictor(model)
    predictor.set_image(image)
    return image, predictor


@pytest.mark.parametrize("kind", ["click", "box"])
def test_interactive_prediction_through_label_studio(ls, project, reference, tmp_path, kind):
    _, _, c = ls
    pid, ml_id, task = project
    image, predictor = reference
    h, w = image.shape[:2]
    if kind == "click":  # the middle of pixel (93, 34)
        item = {"type": "keypointlabels", "value": {"x": 93.5 / w * 100, "y": 34.5 / h * 100, "width": 1,
                                                    "keypointlabels": ["shape"]}, "is_positive": True}
        expect = predictor.predict(point_coords=np.array([[93.0, 34.0]]), point_labels=np.array([1]), multimask_output=False)
    else:  # pixel edges 70..120 x 10..60
        item = {"type": "rectanglelabels", "value": {"x": 70 / w * 100, "y": 10 / h * 100, "width": 50 / w * 100,
                                                     "height": 50 / h * 100, "rotation": 0, "rectanglelabels": ["shape"]}}
        expect = predictor.predict(box=np.array([69.5, 9.5, 119.5, 59.5]), multimask_output=False)
    item.update(from_name=f"label_{kind}", to_name="image", original_width=w, original_height=h)
    r = c.post(f"/api/ml/{ml_id}/interactive-annotating", json={"task": task["id"], "context": {"result": [item]}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "errors" not in body, body
    (region,) = body["data"]["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["shape"]
    (mask,) = sdk_decode([region], tmp_path)
    assert mask.any() and np.array_equal(mask, expect[0][0])


def test_retrieve_predictions_action_stores_automatic_masks(ls, project, backend, reference, tmp_path):
    _, _, c = ls
    pid, _, task = project
    _, model, app = backend
    image, _ = reference
    r = c.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
               json={"selectedItems": {"all": True, "excluded": []}})
    assert r.status_code == 200, r.text
    preds = c.get("/api/predictions", params={"task": task["id"]}).json()
    assert len(preds) == 1, preds
    (pred,) = preds
    assert pred["model_version"] == app.state.backend.model_version
    ref = SamHQAutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0.5,
                                      stability_score_thresh=0.5).generate(image)
    masks = sdk_decode(pred["result"], tmp_path)
    assert len(masks) == len(ref) > 0
    assert all(np.array_equal(m, rec["segmentation"]) for m, rec in zip(masks, ref))
    assert pred["score"] == pytest.approx(np.mean([rec["predicted_iou"] for rec in ref]), abs=1e-5)


def test_tasks_file_imports_with_its_predictions(ls, project, reference, tmp_path):
    """samhq.formats.to_label_studio output, imported through Label Studio's API (which validates
    predictions against the config), keeps every mask."""
    _, _, c = ls
    pid, _, task = project
    image, predictor = reference
    masks = [predictor.predict(point_coords=np.array([[93.0, 34.0]]), point_labels=np.array([1]), multimask_output=False)[0][0],
             predictor.predict(box=np.array([5.0, 60.0, 60.0, 120.0]), multimask_output=False)[0][0]]
    images = [{"file_name": "shapes.png", "height": 128, "width": 128,
               "objects": [{"segmentation": m, "score": 0.5} for m in masks]}]
    tasks = to_label_studio(images, "shape", image_urls=[task["data"]["image"]], model_version="samhq-file")
    r = c.post(f"/api/projects/{pid}/import", json=tasks)
    assert r.status_code == 201, r.text
    new = [t for t in c.get("/api/tasks", params={"project": pid}).json()["tasks"] if t["id"] != task["id"]]
    assert len(new) == 1
    preds = [p for p in c.get("/api/predictions", params={"task": new[0]["id"]}).json() if p["model_version"] == "samhq-file"]
    assert len(preds) == 1
    got = sdk_decode(preds[0]["result"], tmp_path)
    assert len(got) == 2 and all(np.array_equal(a, b) for a, b in zip(got, masks))
