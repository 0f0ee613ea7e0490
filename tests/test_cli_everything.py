"""`samhq everything` over a folder: good images done, a corrupt one reported, reruns resume."""
import json

import numpy as np
import pytest
from PIL import Image
from test_automatic import tiny_256_model

from samhq.automatic import SamHQAutomaticMaskGenerator
from samhq.cli import main
from samhq.image_io import to_rgb_array
from samhq.masks import coco_to_mask

ARGS = ["--points-per-side", "4", "--pred-iou-thresh", "0.1", "--stability-thresh", "0.3", "--box-nms-thresh", "1.0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("everything")
    model = tiny_256_model()
    model.save_pretrained(root / "model")
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 255, (90, 120), dtype=np.uint8)).save(data / "gray.png")
    rgba = g.integers(0, 255, (100, 80, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(data / "sub" / "rgba.png")
    (data / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (data / "notes.md").write_text("not an image, ignored")
    return root, data, model


def run(capsys, *argv):
    code = main(["everything", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_folder_run_resume_and_force(setup, capsys):
    root, data, model = setup
    out_dir = root / "out"
    code, out, err = run(capsys, str(data), "--out", str(out_dir), "--model", str(root / "model"), "--format", "both", *ARGS)
    assert code == 1  # one image failed
    assert "broken.jpg" in err and "skipped" in err
    assert "2 images done, 0 skipped (already done), 1 failed" in out
    for name in ("gray", "sub/rgba"):
        doc = json.loads((out_dir / f"{name}.json").read_text())
        image = to_rgb_array(data / f"{name}.png")
        ref = SamHQAutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0.1, stability_score_thresh=0.3,
                                          box_nms_thresh=1.0).generate(image)
        assert doc["images"][0]["height"] == image.shape[0] and doc["images"][0]["width"] == image.shape[1]
        anns = doc["annotations"]
        assert len(anns) == len(ref) > 0
        pngs = sorted((out_dir / f"{name}_masks").glob("*.png"))
        assert len(pngs) == len(ref)
        for ann, r, png in zip(anns, ref, pngs):
            np.testing.assert_array_equal(coco_to_mask(ann["segmentation"]), r["segmentation"])
            np.testing.assert_array_equal(np.asarray(Image.open(png)) > 0, r["segmentation"])
            ys, xs = np.nonzero(r["segmentation"])  # COCO's bbox: width = x_max - x_min + 1
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["area"] == r["area"]
        overlay = Image.open(out_dir / f"{name}_overlay.png")
        assert overlay.size == (image.shape[1], image.shape[0]) and overlay.mode == "RGB"
    assert not list(out_dir.rglob("*.tmp"))
    before = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*")}

    code, out, err = run(capsys, str(data), "--out", str(out_dir), "--model", str(root / "model"), "--format", "both", *ARGS)
    assert "0 images done, 2 skipped (already done), 1 failed" in out
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("*")} == before  # nothing rewritten

    code, out, err = run(capsys, str(data), "--out", str(out_dir), "--model", str(root / "model"), "--force", *ARGS)
    assert "2 images done, 0 skipped" in out
    assert (out_dir / "gray.json").stat().st_mtime_ns != before[out_dir / "gray.json"]
    assert (out_dir / "gray_overlay.png").stat().st_mtime_ns == before[out_dir / "gray_overlay.png"]  # json only


def test_single_image_and_list(setup, capsys, tmp_path):
    root, data, _ = setup
    listing = tmp_path / "list.txt"
    listing.write_text(f"# images\n{data / 'gray.png'}\n\n{data / 'sub' / 'rgba.png'}\n")
    code, out, _ = run(capsys, str(listing), "--out", str(tmp_path / "o"), "--model", str(root / "model"), *ARGS)
    assert code == 0 and "2 images done" in out
    assert sorted(p.name for p in (tmp_path / "o").glob("*.json")) == ["gray.json", "rgba.json"]
    code, out, _ = run(capsys, str(data / "gray.png"), "--out", str(tmp_path / "single"), "--model", str(root / "model"),
                       "--format", "png", *ARGS)
    assert code == 0 and (tmp_path / "single" / "gray_overlay.png").exists()
    assert not (tmp_path / "single" / "gray.json").exists()


def test_user_errors(setup, capsys, tmp_path):
    root, _, _ = setup
    code, _, err = run(capsys, str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--model", str(root / "model"))
    assert code == 2 and "input not found" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--model", str(root / "model"))
    assert code == 2 and "no images" in err
