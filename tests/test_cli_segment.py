"""`samhq segment` run as a subprocess: its files match the predictor's masks; bad input exits 2 with a
one-line message and writes nothing."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from samhq.predictor import SamHQPredictor


def samhq(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "samhq.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_predictor import make_image, small_256

    root = tmp_path_factory.mktemp("segment")
    model = small_256()
    model.save_pretrained(root / "model")
    image = make_image(90, 140, seed=3)
    Image.fromarray(image).save(root / "img.png")
    predictor = SamHQPredictor(model)
    predictor.set_image(image)
    return root, predictor


def test_files_match_the_predictor(setup, tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools import mask as mask_utils

    root, predictor = setup
    out, overlay, js = tmp_path / "m.png", tmp_path / "o.png", tmp_path / "r.json"
    r = samhq("segment", root / "img.png", "--model", root / "model", "--point", "30,40", "--point", "100,70,0",
              "--box", "10,5,120,80", "--hq-only", "--out", out, "--overlay", overlay, "--json", js)
    assert r.returncode == 0, r.stderr
    masks, scores, _ = predictor.predict(point_coords=np.array([[30, 40], [100, 70]]), point_labels=np.array([1, 0]),
                                         box=np.array([10, 5, 120, 80]), multimask_output=False, hq_token_only=True)
    written = np.asarray(Image.open(out))
    assert written.shape == (90, 140) and set(np.unique(written)) <= {0, 255}
    assert ((written > 0) == masks[0]).all()
    doc = json.loads(js.read_text())
    (entry,) = doc["masks"]
    assert entry["score"] == pytest.approx(float(scores[0]), abs=1e-5)
    assert entry["area"] == int(masks[0].sum())
    rle = dict(entry["segmentation"], counts=entry["segmentation"]["counts"].encode())
    assert (mask_utils.decode(rle).astype(bool) == masks[0]).all()
    ys, xs = np.nonzero(masks[0])
    assert entry["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    ov = np.asarray(Image.open(overlay))
    assert ov.shape == (90, 140, 3) and (ov != np.asarray(Image.open(root / "img.png"))).any()


def test_several_boxes_write_one_mask_each(setup, tmp_path):
    root, predictor = setup
    boxes = [[5, 5, 60, 70], [40, 20, 130, 85]]
    r = samhq("segment", root / "img.png", "--model", root / "model",
              *[a for b in boxes for a in ("--box", ",".join(map(str, b)))], "--multimask", "--out", tmp_path / "m.png")
    assert r.returncode == 0, r.stderr
    tb = predictor.transform.apply_boxes_torch(torch.tensor(boxes, dtype=torch.float), predictor.original_size)
    masks, _, _ = predictor.predict_torch(None, None, tb, multimask_output=True)
    for i in range(2):
        assert ((np.asarray(Image.open(tmp_path / f"m_{i}.png")) > 0) == masks[i, 0].numpy()).all()


BAD = [
    (["missing.png", "--point", "1,2"], "image file not found"),
    (["broken.png", "--point", "1,2"], "as an image: "),
    (["pixel.png", "--point", "0,0"], "single pixel"),
    (["empty.png", "--point", "0,0"], "as an image: "),
    (["img.png", "--point", "1,2,1,1"], "expects X,Y or X,Y,LABEL"),
    (["img.png", "--point", "1,2,7"], "LABEL must be 1"),
    (["img.png", "--point", "nan,2"], "NaN or infinite"),
    (["img.png", "--box", "50,5,10,40"], "x1 >= x0"),
    (["img.png"], "give at least one prompt"),
    (["img.png", "--point", "1,2", "--box", "0,0,5,5", "--box", "1,1,9,9"], "one --box only"),
    (["img.png", "--point", "1,2", "--out", "existing.png"], "already exists; pass --force"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_exits_2_and_writes_nothing(setup, tmp_path, args, message):
    root, _ = setup
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "pixel.png")
    Image.open(root / "img.png").save(tmp_path / "img.png")
    (tmp_path / "existing.png").write_bytes(b"keep me")
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    extra = [] if "--out" in args else ["--out", "new.png"]
    r = samhq("segment", *args, "--model", root / "model", "--overlay", "ov.png", "--json", "r.json", *extra,
              cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_force_overwrites_and_help_has_an_example(setup, tmp_path):
    root, _ = setup
    (tmp_path / "m.png").write_bytes(b"old")
    r = samhq("segment", root / "img.png", "--model", root / "model", "--point", "30,40", "--out", tmp_path / "m.png", "--force")
    assert r.returncode == 0, r.stderr
    assert np.asarray(Image.open(tmp_path / "m.png")).shape == (90, 140)
    h = samhq("segment", "--help")
    assert h.returncode == 0 and "example:" in h.stdout and "samhq segment photo.jpg --point" in h.stdout
