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


def wait_file(folder, name, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = folder / name
        if path.exists() and not list(folder.glob("*.crdownload")):
            return path
        time.sleep(0.1)
    raise AssertionError(f"{name} was not downloaded; the folder has {sorted(p.name for p in folder.iterdir())}")


def test_labelling_objects_and_downloads(page, tmp_path):
    """Objects are kept with labels, renamed, refined and deleted; the downloads (made by samhq.formats on the
    server) hold the predictor's masks for each object's prompts, read back by each format's reader."""
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from test_tiles import scene

    from samhq.formats import read_labelme, read_yolo

    driver, _, _ = page
    image, (a, b, c) = scene(96, 128, [("ellipse", (8, 10, 48, 50), (220, 60, 40)),
                                       ("rectangle", (70, 20, 118, 60), (40, 200, 60)),
                                       ("ellipse", (30, 62, 70, 90), (60, 60, 220))], seed=5)
    path = tmp_path / "shapes.png"
    Image.fromarray(image).save(path)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.find_element("id", "file").send_keys(str(path))
    wait_status(driver, "embedded")
    canvas = driver.find_element("id", "canvas")
    scale = driver.execute_script("return state.scale")

    def at(px, py):
        return round((px + 0.5) * scale) - 256, round((py + 0.5) * scale) - 192

    def centre_of(mask):
        ys, xs = np.nonzero(mask)
        k = len(xs) // 2
        return int(xs[k]), int(ys[k])

    def name_it(text):
        field = driver.find_element("id", "label")
        field.clear()
        field.send_keys(text)

    ActionChains(driver).move_to_element_with_offset(canvas, *at(*centre_of(a))).click().perform()
    wait_status(driver, "score")
    name_it("cat")
    driver.find_element("id", "finish").click()
    wait_status(driver, "Added cat")

    ys, xs = np.nonzero(b)
    (ActionChains(driver).move_to_element_with_offset(canvas, *at(xs.min(), ys.min())).click_and_hold()
     .move_to_element_with_offset(canvas, *at((xs.min() + xs.max()) // 2, (ys.min() + ys.max()) // 2))
     .move_to_element_with_offset(canvas, *at(xs.max(), ys.max())).release().perform())
    wait_status(driver, "score")
    name_it("dog")
    driver.find_element("id", "label").send_keys(Keys.ENTER)  # Enter keeps the object too
    wait_status(driver, "Added dog")

    ActionChains(driver).move_to_element_with_offset(canvas, *at(*centre_of(c))).click().perform()
    wait_status(driver, "score")
    name_it("junk")
    driver.find_element("id", "finish").click()
    wait_status(driver, "Added junk")
    rows = driver.find_elements("css selector", "#objects li")
    assert len(rows) == 3 and driver.find_element("id", "count").text == "(3)"

    rows[2].find_element("css selector", "button.delete").click()
    wait_status(driver, "Deleted junk")
    rows = driver.find_elements("css selector", "#objects li")
    assert len(rows) == 2

    name = rows[0].find_element("css selector", "input.name")
    name.send_keys(Keys.CONTROL, "a")
    name.send_keys("kitty", Keys.ENTER)
    wait_status(driver, "Renamed to kitty")

    rows[0].find_element("css selector", "button.refine").click()
    wait_status(driver, "Refining kitty")
    assert driver.execute_script("return state.editing") == 0 and driver.execute_script("return state.points.length") == 1
    free = np.argwhere(~(a | b | c))[len(np.argwhere(~(a | b | c))) // 3]  # a background pixel (row, col)
    (ActionChains(driver).move_to_element_with_offset(canvas, *at(int(free[1]), int(free[0])))
     .key_down(Keys.SHIFT).click().key_up(Keys.SHIFT).perform())
    wait_status(driver, "score")
    driver.find_element("id", "finish").click()
    wait_status(driver, "Saved kitty")
    objects = driver.execute_script("return state.objects.map((o) => ({label: o.label, points: o.points, labels: o.labels, "
                                    "box: o.box, hq: o.hq_token_only}))")
    assert [o["label"] for o in objects] == ["kitty", "dog"]
    assert objects[0]["labels"] == [1, 0] and objects[0]["box"] is None and objects[1]["points"] == []

    driver.find_elements("css selector", "#objects li")[1].click()  # select
    assert "selected" in driver.find_elements("css selector", "#objects li")[1].get_attribute("class")

    ref = SamHQPredictor.from_pretrained("samhq-tiny-shapes")
    ref.set_image(image)
    want = []
    for o in objects:
        m, _, _ = ref.predict(point_coords=np.array(o["points"]) if o["points"] else None,
                              point_labels=np.array(o["labels"]) if o["points"] else None,
                              box=None if o["box"] is None else np.array(o["box"]), multimask_output=False)
        want.append(m[0])
    assert all(m.any() for m in want)

    for fmt in ("coco", "yolo", "labelme", "png"):
        driver.find_element("id", f"download-{fmt}").click()
        wait_status(driver, "Downloaded")
    coco = COCO(str(wait_file(downloads, "shapes_coco.json")))
    assert [c["name"] for c in coco.dataset["categories"]] == ["kitty", "dog"]
    anns = coco.dataset["annotations"]
    assert [a["category_id"] for a in anns] == [1, 2]
    for ann, m in zip(anns, want):
        assert np.array_equal(coco.annToMask(ann).astype(bool), m)
    import zipfile

    z = zipfile.ZipFile(wait_file(downloads, "shapes_yolo.zip"))
    got = read_yolo(z.read("yolo/labels/shapes.txt").decode(), 96, 128)
    assert [k for k, _ in got] == [0, 1] and all(np.array_equal(g, m) for (_, g), m in zip(got, want))
    import json

    labelme = read_labelme(json.loads(wait_file(downloads, "shapes.json").read_text()))
    assert sorted(label for label, _ in labelme) == ["dog", "kitty"]
    for label, m in labelme:
        assert np.array_equal(m, want[0] if label == "kitty" else want[1])
    z = zipfile.ZipFile(wait_file(downloads, "shapes_png.zip"))
    assert json.loads(z.read("shapes_labels.json")) == {"000.png": "kitty", "001.png": "dog"}
    for i, m in enumerate(want):
        assert np.array_equal(np.asarray(Image.open(z.open(f"shapes_masks/{i:03d}.png"))) > 127, m)
