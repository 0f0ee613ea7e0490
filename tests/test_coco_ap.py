"""COCO mask AP (samhq.eval.coco_ap, `samhq evaluate --coco-ap`) against a hand computation and pycocotools itself."""
import contextlib
import io
import json

import numpy as np
import pytest

pytest.importorskip("pycocotools")

from samhq.cli import main  # noqa: E402
from samhq.eval.coco_ap import coco_ap  # noqa: E402
from samhq.masks import mask_to_coco  # noqa: E402


def square(y0, y1, x0, x1, size=100):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def hand_case():
    """One 100x100 image, two objects: A (40x40, medium) and B (20x20, small). Three detections:
    A itself (score 0.9), a 40x40 false positive (0.8), and an 18x16 part of B (0.7), IoU 288/400 = 0.72."""
    a, b = square(10, 50, 10, 50), square(60, 80, 60, 80)
    gt = {"images": [{"id": 1, "height": 100, "width": 100}], "categories": [{"id": 1}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": mask_to_coco(a), "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "segmentation": mask_to_coco(b), "iscrowd": 0}]}
    res = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": mask_to_coco(a)},
           {"image_id": 1, "category_id": 1, "score": 0.8, "segmentation": mask_to_coco(square(0, 40, 55, 95))},
           {"image_id": 1, "category_id": 1, "score": 0.7, "segmentation": mask_to_coco(square(60, 78, 60, 76))}]
    return gt, res


def hand_ap():
    """COCO's 101-point interpolated AP, by hand, for hand_case().

    Ranked: TP (A), FP, then the part of B: a TP at IoU thresholds 0.50..0.70 (IoU 0.72), else a FP.
    Thresholds <= 0.72: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1; the precision envelope is 1 up to
    recall 0.5 (51 of the 101 recall points 0, 0.01, ..., 1) and 2/3 above it (50 points).
    Thresholds > 0.72: recall never passes 1/2: precision 1 on 51 points, 0 on the rest.
    Small objects: only B and the part of B count (A, and the FP of area 1600, are medium):
    AP 1 at thresholds <= 0.72, 0 above. Medium: A and the FP only (the part of B is small): TP then
    FP, recall 1 reached at precision 1: AP 1. No large objects: -1.
    """
    matched = (51 * 1 + 50 * 2 / 3) / 101
    unmatched = 51 / 101
    return {"AP": (5 * matched + 5 * unmatched) / 10, "AP50": matched, "AP75": unmatched,
            "APs": 0.5, "APm": 1.0, "APl": -1.0}


def test_coco_ap_matches_a_hand_computation():
    gt, res = hand_case()
    got = coco_ap(gt, res)
    for k, v in hand_ap().items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_cli_coco_ap_matches_the_hand_computation(tmp_path, capsys):
    gt, res = hand_case()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(res))
    out = tmp_path / "ap.json"
    assert main(["evaluate", "--coco-ap", str(tmp_path / "gt.json"), str(tmp_path / "res.json"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "AP50" in text and "67.0" in text and "83.5" in text
    saved = json.loads(out.read_text())
    for k, v in hand_ap().items():
        assert saved[k] == pytest.approx(v, abs=1e-9), k


def synthetic_set(seed=0, n_images=6):
    """Random rectangles and discs on 64x96 images, two categories; results are noisy copies plus false positives."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :96]
    images, anns, res = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "height": 64, "width": 96, "file_name": f"{i}.png"})
        for _ in range(rng.integers(1, 5)):
            cy, cx, r = rng.integers(8, 56), rng.integers(8, 88), rng.integers(3, 14)
            m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if rng.random() < 0.5 else \
                (abs(yy - cy) < r) & (abs(xx - cx) < rng.integers(2, 20))
            cat = int(rng.integers(1, 3))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "segmentation": mask_to_coco(m),
                         "iscrowd": 0, "area": float(m.sum())})
            noisy = m ^ (rng.random(m.shape) < 0.05 * rng.random()) & np.roll(m, int(rng.integers(-2, 3)), axis=1)
            res.append({"image_id": i, "category_id": cat if rng.random() < 0.9 else 3 - cat,
                        "segmentation": mask_to_coco(noisy), "score": float(rng.random())})
        for _ in range(rng.integers(0, 3)):  # false positives
            m = square(*sorted(rng.integers(0, 64, 2)), *sorted(rng.integers(0, 96, 2)), size=96)[:64]
            res.append({"image_id": i, "category_id": int(rng.integers(1, 3)), "segmentation": mask_to_coco(m),
                        "score": float(rng.random())})
    return {"images": images, "annotations": anns, "categories": [{"id": 1}, {"id": 2}]}, res


def test_cli_coco_ap_equals_pycocotools_on_a_synthetic_set(tmp_path, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, res = synthetic_set()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(res))
    assert main(["evaluate", "--coco-ap", str(tmp_path / "gt.json"), str(tmp_path / "res.json"),
                 "--json", str(tmp_path / "ap.json")]) == 0
    ours = json.loads((tmp_path / "ap.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(coco, coco.loadRes(str(tmp_path / "res.json")), "segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ours["stats"] == pytest.approx(list(ev.stats), abs=1e-12)
    assert 0.1 < ours["AP"] < 0.95  # a set that actually discriminates


@pytest.mark.parametrize("change, message", [
    (lambda gt, res: res.append({"image_id": 99, "category_id": 1, "score": 1.0, "segmentation": res[0]["segmentation"]}),
     "image_id 99, which is not in"),
    (lambda gt, res: res.clear(), "has no results"),
    (lambda gt, res: res[0].pop("score"), "entry 0 needs image_id, category_id, score and segmentation"),
    (lambda gt, res: gt.pop("images"), "needs \"images\" and \"annotations\""),
])
def test_cli_coco_ap_errors_are_one_line(tmp_path, capsys, change, message):
    gt, res = hand_case()
    change(gt, res)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(res))
    assert main(["evaluate", "--coco-ap", str(tmp_path / "gt.json"), str(tmp_path / "res.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_coco_ap_takes_no_model_or_dataset(tmp_path, capsys):
    gt, res = hand_case()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(res))
    assert main(["evaluate", "synthetic:2", "--coco-ap", str(tmp_path / "gt.json"), str(tmp_path / "res.json")]) == 2
    assert "give no model or dataset" in capsys.readouterr().err
    assert main(["evaluate", "--coco-ap", str(tmp_path / "missing.json"), str(tmp_path / "res.json")]) == 2
    assert "not found" in capsys.readouterr().err
