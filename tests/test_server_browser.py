"""The click-to-segment page in a real browser (headless Chromium): upload, click, drag a box, clear.

The masks the page reports must be the predictor's for the same prompts. Skips without selenium,
chromium and chromedriver (Debian: apt install chromium chromium-driver).
"""
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from samhq.data.synthetic import SyntheticShapes  # noqa: E402
from samhq.predictor import SamHQPredictor  # noqa: E402
from samhq.server import create_app  # noqa: E402

NO_GRAD = True
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(create_app("samhq-tiny-shapes"), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.get(f"http://127.0.0.1:{port}/")
    item = SyntheticShapes(1, (96, 128), seed=1001)[0]
    path = tmp_path_factory.mktemp("page") / "shapes.png"
    Image.fromarray(item["image"]).save(path)
    yield driver, item, path
    driver.quit()
    server.should_exit = True
    thread.join(timeout=10)


def wait_status(driver, text, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: text in d.find_element("id", "status").text)
    return driver.find_element("id", "status").text


def area_in(status: str) -> int:
    return int(status.split("·")[1].split("px")[0])


def test_click_drag_and_clear(page):
    from selenium.webdriver.common.action_chains import ActionChains

    driver, item, path = page
    driver.find_element("id", "file").send_keys(str(path))
    wait_status(driver, "embedded")
    canvas = driver.find_element("id", "canvas")
    scale = driver.execute_script("return state.scale")
    assert scale == 4  # a small image is shown enlarged
    assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("512", "384")

    def at(px, py):  # Selenium offsets are from the element's centre, in CSS pixels
        return round((px + 0.5) * scale) - 256, round((py + 0.5) * scale) - 192

    ref = SamHQPredictor.from_pretrained("samhq-tiny-shapes")
    ref.set_image(item["image"])
    ys, xs = np.nonzero(item["masks"][0])
    x, y = int(xs[len(xs) // 2]), int(ys[len(ys) // 2])
    ActionChains(driver).move_to_element_with_offset(canvas, *at(x, y)).click().perform()
    status = wait_status(driver, "score")
    assert driver.execute_script("return state.mask !== null && state.labels.length === 1 && state.labels[0] === 1")
    clicked = driver.execute_script("return state.points[0]")  # the browser may land on a sub-pixel position
    assert abs(clicked[0] - x - 0.5) <= 0.5 and abs(clicked[1] - y - 0.5) <= 0.5
    masks, _, _ = ref.predict(point_coords=np.array([clicked]), point_labels=np.array([1]), multimask_output=False)
    assert area_in(status) == int(masks[0].sum())

    driver.find_element("id", "clear").click()
    wait_status(driver, "cleared")
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    (ActionChains(driver).move_to_element_with_offset(canvas, *at(x0, y0)).click_and_hold()
     .move_to_element_with_offset(canvas, *at((x0 + x1) // 2, (y0 + y1) // 2))
     .move_to_element_with_offset(canvas, *at(x1, y1)).release().perform())
    status = wait_status(driver, "score")
    assert driver.execute_script("return state.points.length") == 0
    box = driver.execute_script("return state.box")
    assert np.allclose(box, [x0 + 0.5, y0 + 0.5, x1 + 0.5, y1 + 0.5], atol=0.5)
    masks, _, _ = ref.predict(box=np.array(box, dtype=float), multimask_output=False)
    assert area_in(status) == int(masks[0].sum())
