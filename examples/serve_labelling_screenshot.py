"""Screenshot of `samhq serve`'s labelling page with a few labelled objects (docs/samhq_serve_labelling.png).

Needs Debian's chromium and chromium-driver and selenium. It starts the server in this process on the
bundled demo model, opens the page in headless Chromium, uploads examples/shapes.png, clicks three
objects (a box for one), names them, selects one and saves the window.

    python examples/serve_labelling_screenshot.py --out docs/samhq_serve_labelling.png
"""
import argparse
import shutil
import socket
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.support.ui import WebDriverWait

from samhq.server import create_app

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="samhq-tiny-shapes")
    ap.add_argument("--image", default=str(ROOT / "examples" / "shapes.png"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "samhq_serve_labelling.png"))
    ap.add_argument("--objects", default="tag:0.82,0.24;stripe:0.62,0.55,0.72,0.66;blob:0.63,0.77",
                    help="LABEL:X,Y (a click) or LABEL:X0,Y0,X1,Y1 (a box), in fractions of the image, separated by ;")
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(args.model), host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    opts = Options()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,900"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element("id", "file").send_keys(str(Path(args.image).resolve()))
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "Click the object" in d.find_element("id", "status").text)
        canvas = driver.find_element("id", "canvas")
        w, h = int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))

        def at(fx, fy):  # offsets from the canvas centre
            return round(fx * w - w / 2), round(fy * h - h / 2)

        for spec in args.objects.split(";"):
            label, nums = spec.split(":")
            v = [float(x) for x in nums.split(",")]
            action = ActionChains(driver).move_to_element_with_offset(canvas, *at(v[0], v[1]))
            if len(v) == 2:
                action.click().perform()
            else:
                action.click_and_hold().move_to_element_with_offset(canvas, *at(v[2], v[3])).release().perform()
            wait.until(lambda d: "score" in d.find_element("id", "status").text)
            field = driver.find_element("id", "label")
            field.clear()
            field.send_keys(label)
            driver.find_element("id", "finish").click()
            wait.until(lambda d, label=label: f"Added {label}" in d.find_element("id", "status").text)
        driver.find_elements("css selector", "#objects li")[0].click()
        time.sleep(0.3)
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        server.should_exit = True


if __name__ == "__main__":
    main()
