"""Screenshot of a Label Studio task with samhq's pre-annotation (docs/label_studio.png).

Needs a running Label Studio (started with ML_BLOCK_LOCAL_IP=false SSRF_PROTECTION_ENABLED=false so it
may call a backend on this machine), its user's email, password and API token, Debian's chromium and
chromium-driver, and selenium. It starts the samhq backend in this process, makes a project with the
samhq labelling config, connects the backend, uploads examples/shapes.png, runs Label Studio's
"Retrieve predictions" action, opens the task in headless Chromium and saves the window.

    python examples/label_studio_screenshot.py --label-studio-url http://127.0.0.1:8080 \\
        --token TOKEN --email you@example.com --password PASS --out docs/label_studio.png
"""
import argparse
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from PIL import Image

from samhq.formats import label_studio_config
from samhq.label_studio import create_label_studio_app

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label-studio-url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--email", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--model", default="samhq-tiny-shapes")
    ap.add_argument("--image", default=str(ROOT / "examples" / "shapes.png"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "label_studio.png"))
    args = ap.parse_args()
    url = args.label_studio_url.rstrip("/")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_label_studio_app(args.model, url, args.token, auto="everything", points_per_side=12,
                                  pred_iou_thresh=0.8, stability_thresh=0.9)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)

    c = httpx.Client(base_url=url, headers={"Authorization": f"Token {args.token}"}, timeout=600)
    project = {"title": "samhq pre-annotation", "label_config": label_studio_config({1: "shape"}, "brush")}
    pid = c.post("/api/projects", json=project).raise_for_status().json()["id"]
    try:
        c.post("/api/ml", json={"url": f"http://127.0.0.1:{port}", "project": pid, "title": "samhq",
                                "is_interactive": True}).raise_for_status()
        with open(args.image, "rb") as f:
            c.post(f"/api/projects/{pid}/import", files={"file": (Path(args.image).name, f, "image/png")}).raise_for_status()
        c.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
               json={"selectedItems": {"all": True, "excluded": []}}).raise_for_status()
        # show this model's predictions in the editor
        c.patch(f"/api/projects/{pid}", json={"model_version": app.state.backend.model_version}).raise_for_status()
        task = c.get("/api/tasks", params={"project": pid}).json()["tasks"][0]
        print(f"task {task['id']}: {task.get('total_predictions')} prediction(s)")
        shoot(url, args.email, args.password, f"{url}/projects/{pid}/data?task={task['id']}", Path(args.out))
    finally:
        c.delete(f"/api/projects/{pid}")
        server.should_exit = True


def shoot(url: str, email: str, password: str, page: str, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,760"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))
    try:
        driver.get(f"{url}/user/login/")
        driver.find_element(By.NAME, "email").send_keys(email)
        driver.find_element(By.NAME, "password").send_keys(password)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
        time.sleep(3)
        driver.get(page)
        time.sleep(12)  # the editor loads its scripts, the image and the brush regions
        raw = out.with_suffix(".raw.png")
        driver.save_screenshot(str(raw))
    finally:
        driver.quit()
    im = Image.open(raw).convert("RGB")
    im = im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.LANCZOS).quantize(colors=128)
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out, optimize=True)
    raw.unlink()
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
