"""`samhq segment INPUT --prompts FILE --out DIR`: detector boxes in, COCO results out.

The results equal `samhq.prompt_files`' records for the same prompts (the library run directly); they
keep the detector's score and category_id (times the predicted IoU with --multiply-iou); pycocotools
scores them through `samhq evaluate --coco-ap`; a run killed mid-way and resumed writes the very same
files as a run left alone."""
import json
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image
from test_prompt_files import detection_set
from test_tiles import needs_demo, scene

from samhq.cli import _outputs as O
from samhq.cli import main

pytest.importorskip("pycocotools")
NO_GRAD = True
pytestmark = needs_demo
NAME = "samhq-tiny-shapes"
JOURNAL = ".samhq-segment.done"


@pytest.fixture(scope="module")
def dets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dets")
    gt, dets = detection_set(root)
    return root, gt, dets


def library_records(root, **options):
    """The library's records with the thread count the command runs with (--threads 1)."""
    from samhq import SamHQPredictor
    from samhq.prompt_files import iter_prompt_results, read_prompts

    from conftest import torch_threads

    predictor = SamHQPredictor.from_pretrained(NAME)
    out = []
    with torch_threads(1):
        for _, records, err in iter_prompt_results(predictor, read_prompts(root / "dets.json", root / "gt.json",
                                                                           image_dir=root / "img"), **options):
            assert err is None
            out += records
    return json.loads(json.dumps(out))


def test_detections_in_coco_results_out(dets, tmp_path, capsys):
    root, gt, det = dets
    out = tmp_path / "out"
    argv = ["segment", str(root / "gt.json"), "--image-dir", str(root / "img"), "--prompts", str(root / "dets.json"),
            "--out", str(out), "--model", NAME, "--threads", "1"]
    assert main(argv) == 0
    assert "2 images done, 0 skipped (already done), 0 failed, 5 masks" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results == library_records(root)
    assert [(r["image_id"], r["category_id"], r["score"]) for r in results] == \
        [(d["image_id"], d["category_id"], d["score"]) for d in sorted(det, key=lambda d: d["image_id"])]
    doc = json.loads((out / "000000000001.json").read_text())
    assert doc["image_id"] == 1 and (doc["height"], doc["width"]) == (256, 256)
    assert doc["masks"] == [r for r in results if r["image_id"] == 1]

    ap = tmp_path / "ap.json"
    assert main(["evaluate", "--coco-ap", str(root / "gt.json"), str(out / "results.json"), "--json", str(ap)]) == 0
    assert json.loads(ap.read_text())["AP50"] > 0.9
    capsys.readouterr()

    assert main(argv) == 0  # done: nothing redone, the same results
    assert "0 images done, 2 skipped" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text()) == results

    assert main([*argv, "--force", "--multiply-iou", "--format", "json,coco,yolo"]) == 0
    capsys.readouterr()
    multiplied = json.loads((out / "results.json").read_text())
    for a, b in zip(multiplied, results):
        assert a["segmentation"] == b["segmentation"] and a["score"] == pytest.approx(b["score"] * b["predicted_iou"])
    coco = json.loads((out / "coco" / "instances.json").read_text())
    assert [c["id"] for c in coco["categories"]] == [1, 2]  # the ground truth's ids (its categories have no names)
    assert [a["category_id"] for a in coco["annotations"]] == [r["category_id"] for r in results]


def test_categories_from_the_coco_file(dets, tmp_path, capsys):
    root, gt, _ = dets
    named = dict(gt, categories=[{"id": 1, "name": "ball"}, {"id": 2, "name": "box"}])
    (tmp_path / "gt.json").write_text(json.dumps(named))
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "gt.json"), "--image-dir", str(root / "img"), "--prompts", str(root / "dets.json"),
                 "--out", str(out), "--model", NAME, "--threads", "1", "--format", "json,coco,yolo"]) == 0
    coco = json.loads((out / "coco" / "instances.json").read_text())
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "ball"), (2, "box")]
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load((out / "yolo" / "data.yaml").read_text())["names"] == {0: "ball", 1: "box"}
    assert main(["segment", str(tmp_path / "gt.json"), "--image-dir", str(root / "img"), "--prompts", str(root / "dets.json"),
                 "--out", str(tmp_path / "o2"), "--model", NAME, "--threads", "1", "--format", "coco",
                 "--category", "thing"]) == 0
    coco = json.loads((tmp_path / "o2" / "coco" / "instances.json").read_text())
    assert coco["categories"][0]["name"] == "thing" and {a["category_id"] for a in coco["annotations"]} == {1}
    results = json.loads((tmp_path / "o2" / "results.json").read_text())  # the COCO results keep the detector's ids
    assert {r["category_id"] for r in results} == {1, 2}
    capsys.readouterr()


def test_prompt_file_errors(dets, tmp_path, capsys):
    root, _, _ = dets
    base = ["segment", str(root / "img"), "--model", NAME]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1, "bbox": [1, 2, 3], "score": 0.5}]))
    out = ["--out", str(tmp_path / "o")]
    for extra, text in ((["--prompts", str(root / "dets.json")], "give it with --out DIR"),
                        (["--prompts", str(root / "dets.json"), *out, "--json", "x"], "--out is a folder"),
                        (["--prompts", str(root / "dets.json"), *out, "--box", "1,1,5,5"], "not both"),
                        (["--prompts", str(bad), "--out", str(tmp_path / "o")], "entry 0 (image_id 1): bbox must be")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Eight images with two boxes each, as per-image prompts."""
    root = tmp_path_factory.mktemp("many")
    (root / "img").mkdir()
    prompts = {}
    for i in range(8):
        image, masks = scene(128, 160, [("ellipse", (10 + 3 * i, 12, 70, 80), (220, 60, 40)),
                                        ("rectangle", (90, 40, 150, 110), (40, 200, 60))], seed=i)
        Image.fromarray(image).save(root / "img" / f"im{i}.png")
        prompts[f"im{i}.png"] = [{"box": [10 + 3 * i, 12, 71, 81], "score": 0.9, "category_id": 1},
                                 {"box": [90, 40, 151, 111], "score": 0.8, "category_id": 2, "id": 100 + i}]
    (root / "prompts.json").write_text(json.dumps(prompts))
    return root


def test_a_killed_run_resumed_writes_the_same_files(many, tmp_path):
    cmd = lambda out: [sys.executable, "-m", "samhq.cli", "segment", str(many / "img"), "--prompts",  # noqa: E731
                       str(many / "prompts.json"), "--out", str(out), "--model", NAME, "--threads", "1", "--format", "json,coco"]
    whole = tmp_path / "whole"
    r = subprocess.run(cmd(whole), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not O.read_done(out, JOURNAL) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = O.read_done(out, JOURNAL)
    assert 0 < len(before) < 8, "the run was not killed mid-way"
    assert not (out / "results.json").exists()
    r = subprocess.run(cmd(out), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{8 - len(before)} images done, {len(before)} skipped" in r.stdout
    names = sorted(p.name for p in whole.rglob("*") if p.is_file() and not p.name.startswith(".samhq"))
    assert names == sorted(p.name for p in out.rglob("*") if p.is_file() and not p.name.startswith(".samhq"))
    for rel in ["results.json", "coco/instances.json"] + [f"im{i}.json" for i in range(8)]:
        assert (out / rel).read_bytes() == (whole / rel).read_bytes(), rel
    assert not list(out.glob(O.TMP_PREFIX + "*")) and not (out / O.LOCK_FILE).exists()
    results = json.loads((out / "results.json").read_text())
    assert [r["image_id"] for r in results] == [f"im{i}.png" for i in range(8) for _ in range(2)]
    assert [r.get("prompt_id") for r in results][1::2] == list(range(100, 108))


def test_prompt_files_in_tiles(dets, tmp_path, capsys):
    """--tiles: the records of `samhq.prompt_files` with a TiledPredictor (128-px tiles on 256-px images)."""
    from samhq.modeling.model import SamHQModel
    from samhq.prompt_files import iter_prompt_results, read_prompts
    from samhq.tiles import TiledPredictor

    from conftest import torch_threads

    root, _, _ = dets
    out = tmp_path / "out"
    assert main(["segment", str(root / "gt.json"), "--image-dir", str(root / "img"), "--prompts", str(root / "dets.json"),
                 "--out", str(out), "--model", NAME, "--threads", "1", "--tiles", "--tile-size", "128", "--overlap", "32"]) == 0
    capsys.readouterr()
    with torch_threads(1):
        tp = TiledPredictor(SamHQModel.from_pretrained(NAME).eval(), tile_size=128, overlap=32)
        entries = read_prompts(root / "dets.json", root / "gt.json", image_dir=root / "img")
        want = [r for _, records, _ in iter_prompt_results(tp, entries) for r in records]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(want))
