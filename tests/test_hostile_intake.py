"""Issue 14, kind 1: every entry point sees the same image.

A JPEG whose EXIF Orientation is 1-8 must reach the Python API, the onnxruntime engine, the
pipelines, `samhq segment`, `samhq everything`, the server's uploads and the training/evaluation
datasets upright, as the tag's definition says (`hostile.upright`, written out from the spec, not by
PIL). 16-bit images that use a small part of their range get a warning naming `bit_depth`, and the
"minmax" and "percentile" modes scale as computed here by hand, through every entry point.
"""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_automatic import tiny_256_model
from test_predictor import make_image

from samhq import pipeline
from samhq.automatic import SamHQAutomaticMaskGenerator
from samhq.cli import main
from samhq.image_io import image_size, open_image, to_rgb_array
from samhq.masks import coco_to_mask
from samhq.predictor import SamHQPredictor

from hostile import jpeg_with_orientation, png_bytes, stored_pixels, upright

NO_GRAD = True
STORED = make_image(60, 100, seed=5)  # stored 100 wide, 60 tall; orientations 5-8 show it 60 wide, 100 tall
AMG = dict(points_per_side=4, pred_iou_thresh=0.1, stability_score_thresh=0.3, box_nms_thresh=1.0)
AMG_ARGS = ["--points-per-side", "4", "--pred-iou-thresh", "0.1", "--stability-thresh", "0.3", "--box-nms-thresh", "1.0"]


@pytest.fixture(scope="module")
def model():
    return tiny_256_model()


@pytest.fixture(scope="module")
def saved_model(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """orientation -> (path, file bytes, the upright pixels by hand)."""
    root = tmp_path_factory.mktemp("exif")
    out = {}
    for o in range(1, 9):
        data = jpeg_with_orientation(STORED, o)
        (root / f"o{o}.jpg").write_bytes(data)
        out[o] = (root / f"o{o}.jpg", data, upright(stored_pixels(data), o))
    return out


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_intake_applies_every_orientation(photos, orientation):
    path, data, expected = photos[orientation]
    assert expected.shape[:2] == ((60, 100) if orientation < 5 else (100, 60))
    for source in (path, str(path), data, bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(to_rgb_array(source), expected)
    np.testing.assert_array_equal(np.asarray(open_image(path)), expected)
    assert image_size(path) == image_size(data) == (expected.shape[1], expected.shape[0])


def test_an_opened_pil_image_is_taken_as_is_with_a_warning(photos):
    path, _, _ = photos[6]
    with Image.open(path) as im, pytest.warns(UserWarning, match="EXIF orientation 6.*pass the file path"):
        out = to_rgb_array(im)
    np.testing.assert_array_equal(out, stored_pixels(photos[6][1]))


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_python_api_and_onnxruntime_engine(photos, model, engine):
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    predictor = SamHQPredictor(model, engine=engine)
    for o in ((1, 3, 5, 6, 7, 8) if engine == "torch" else (6, 7)):
        path, data, expected = photos[o]
        predictor.set_image(expected)
        ref, size = predictor.features.clone(), predictor.original_size
        assert size == expected.shape[:2]
        for source in (path, str(path)):
            predictor.set_image(source)
            assert predictor.original_size == size
            torch.testing.assert_close(predictor.features, ref, rtol=0, atol=0)


def test_pipelines(photos, model):
    path, _, expected = photos[6]
    generator = pipeline("mask-generation", model=model)
    got, ref = generator(str(path), **AMG), generator(expected, **AMG)
    assert len(got["masks"]) == len(ref["masks"]) > 0
    for a, b in zip(got["masks"], ref["masks"]):
        assert a.shape == (100, 60)
        np.testing.assert_array_equal(a, b)
    seg = pipeline("image-segmentation", model=model)(path, **AMG)
    assert seg[0]["mask"].size == (60, 100)


def test_segment_cli(photos, model, saved_model, tmp_path, capsys):
    path, _, expected = photos[6]
    out, js = tmp_path / "m.png", tmp_path / "r.json"
    assert main(["segment", str(path), "--model", str(saved_model), "--point", "30,80", "--out", str(out),
                 "--json", str(js)]) == 0, capsys.readouterr().err
    ref = SamHQPredictor(model)
    ref.set_image(expected)
    masks, scores, _ = ref.predict(point_coords=np.array([[30, 80]]), point_labels=np.array([1]), multimask_output=False)
    doc = json.loads(js.read_text())
    assert (doc["width"], doc["height"]) == (60, 100)
    np.testing.assert_array_equal(np.asarray(Image.open(out)) > 0, masks[0])
    assert doc["masks"][0]["score"] == pytest.approx(float(scores[0]), abs=1e-6)


def test_everything_cli(photos, model, saved_model, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for o in (6, 8):
        (folder / f"o{o}.jpg").write_bytes(photos[o][1])
    assert main(["everything", str(folder), "--out", str(tmp_path / "out"), "--model", str(saved_model), *AMG_ARGS]) == 0
    capsys.readouterr()
    gen = SamHQAutomaticMaskGenerator(model, **AMG)
    for o in (6, 8):
        expected = photos[o][2]
        doc = json.loads((tmp_path / "out" / f"o{o}.json").read_text())
        assert (doc["images"][0]["width"], doc["images"][0]["height"]) == (60, 100)
        ref = gen.generate(expected)
        assert len(doc["annotations"]) == len(ref) > 0
        for ann, r in zip(doc["annotations"], ref):
            np.testing.assert_array_equal(coco_to_mask(ann["segmentation"]), r["segmentation"])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_datasets(photos, tmp_path, orientation):
    from samhq.data.datasets import CocoInstances, MaskFolder

    path, data, expected = photos[orientation]
    h, w = expected.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: h // 2, w // 3: w // 2] = 255  # drawn on the upright image, as annotation tools do
    (tmp_path / "im").mkdir()
    (tmp_path / "gt").mkdir()
    (tmp_path / "im" / "x.jpg").write_bytes(data)
    Image.fromarray(mask).save(tmp_path / "gt" / "x.png")
    (item,) = list(MaskFolder(tmp_path))
    np.testing.assert_array_equal(item["image"], expected)
    np.testing.assert_array_equal(item["masks"][0], mask > 0)

    pytest.importorskip("pycocotools")
    y0, y1, x0, x1 = h // 4, h // 2, w // 3, w // 2
    coco = {"images": [{"id": 1, "file_name": "im/x.jpg", "width": w, "height": h}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                             "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    ds = CocoInstances(tmp_path / "coco.json")
    assert ds.skipped == []
    np.testing.assert_array_equal(ds[0]["image"], expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_server_upload_size(photos, served, orientation):
    client, _ = served
    _, data, expected = photos[orientation]
    r = client.post("/api/images", files={"file": ("p.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (expected.shape[1], expected.shape[0])


def test_server_segments_the_upright_photo(photos, served):
    import base64
    import io

    client, model = served
    _, data, expected = photos[6]
    image_id = client.post("/api/images", files={"file": ("p.jpg", data, "image/jpeg")}).json()["image_id"]
    r = client.post("/api/segment", json={"image_id": image_id, "points": [[30, 80]], "labels": [1]})
    assert r.status_code == 200, r.text
    ref = SamHQPredictor(model)
    ref.set_image(expected)
    masks, _, _ = ref.predict(point_coords=np.array([[30, 80]]), point_labels=np.array([1]), multimask_output=False)
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["mask_png"])))) > 127
    np.testing.assert_array_equal(got, masks[0])


@pytest.fixture(scope="module")
def served(model):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from samhq.server import create_app

    return TestClient(create_app(model), base_url="http://127.0.0.1"), model


# ---------------------------------------------------------------------------------------------
# 16-bit images

RAW12 = np.random.default_rng(7).integers(100, 4001, (48, 64)).astype(np.uint16)  # 12-bit data in 16 bits
RAW12[0, 0], RAW12[0, 1] = 100, 4000


def by_hand(raw, mode):
    x = raw.astype(np.float64)
    lo, hi = (x.min(), x.max()) if mode == "minmax" else np.percentile(x, [1.0, 99.8])
    grey = np.round(np.clip((x - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def test_16_bit_modes(tmp_path):
    with pytest.warns(UserWarning, match=r"reach only 4000 of 0..65535.*bit_depth='minmax' or 'percentile'"):
        dark = to_rgb_array(RAW12)
    assert dark.max() == round(4000 / 257) == 16
    (tmp_path / "raw.png").write_bytes(png_bytes(RAW12))  # a 16-bit greyscale PNG (mode I;16)
    for mode in ("minmax", "percentile"):
        expected = by_hand(RAW12, mode)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning when the image is stretched
            for source in (RAW12, torch.from_numpy(RAW12.astype(np.int32)), tmp_path / "raw.png",
                           (tmp_path / "raw.png").read_bytes(), Image.open(tmp_path / "raw.png")):
                np.testing.assert_array_equal(to_rgb_array(source, bit_depth=mode), expected)
    full = np.array([[0, 30000, 65535]], np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 16-bit image that uses its range: no warning
        np.testing.assert_array_equal(to_rgb_array(full)[0, :, 0], [0, 117, 255])
    floats = np.array([[-3.0, 0.0, 5.0]])
    with pytest.raises(ValueError, match="bit_depth='minmax'"):
        to_rgb_array(floats)
    np.testing.assert_array_equal(to_rgb_array(floats, bit_depth="minmax")[0, :, 0], [0, 96, 255])
    np.testing.assert_array_equal(to_rgb_array(np.full((4, 4), 7, np.uint16), bit_depth="minmax"), 0)  # constant
    with pytest.raises(ValueError, match="bit_depth must be one of dtype, minmax, percentile"):
        to_rgb_array(RAW12, bit_depth="auto")


def test_16_bit_through_the_entry_points(model, saved_model, tmp_path, capsys):
    pytest.importorskip("fastapi")
    import base64
    import io

    from fastapi.testclient import TestClient

    from samhq.server import create_app

    (tmp_path / "raw.png").write_bytes(png_bytes(RAW12))
    ref = SamHQPredictor(model)
    point = dict(point_coords=np.array([[20, 30]]), point_labels=np.array([1]))

    # the command line: a one-line warning without the option; the stretched image with it
    assert main(["segment", str(tmp_path / "raw.png"), "--model", str(saved_model), "--point", "20,30",
                 "--out", str(tmp_path / "a.png")]) == 0
    err = capsys.readouterr().err
    assert "samhq segment: warning: the image's values reach only 4000" in err and "--bit-depth" in err
    assert main(["segment", str(tmp_path / "raw.png"), "--model", str(saved_model), "--point", "20,30",
                 "--out", str(tmp_path / "b.png"), "--bit-depth", "percentile"]) == 0
    assert "warning" not in capsys.readouterr().err
    ref.set_image(by_hand(RAW12, "percentile"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png")) > 0,
                                  ref.predict(multimask_output=False, **point)[0][0])

    # the server
    client = TestClient(create_app(model, bit_depth="minmax"), base_url="http://localhost")
    image_id = client.post("/api/images", files={"file": ("raw.png", png_bytes(RAW12), "image/png")}).json()["image_id"]
    r = client.post("/api/segment", json={"image_id": image_id, "points": [[20, 30]]})
    ref.set_image(by_hand(RAW12, "minmax"))
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["mask_png"])))) > 127
    np.testing.assert_array_equal(got, ref.predict(multimask_output=False, **point)[0][0])

    # samhq everything
    assert main(["everything", str(tmp_path / "raw.png"), "--out", str(tmp_path / "out"), "--model", str(saved_model),
                 "--bit-depth", "minmax", *AMG_ARGS]) == 0
    capsys.readouterr()
    doc = json.loads((tmp_path / "out" / "raw.json").read_text())
    recs = SamHQAutomaticMaskGenerator(model, **AMG).generate(by_hand(RAW12, "minmax"))
    assert len(doc["annotations"]) == len(recs) > 0
    for ann, r in zip(doc["annotations"], recs):
        np.testing.assert_array_equal(coco_to_mask(ann["segmentation"]), r["segmentation"])
