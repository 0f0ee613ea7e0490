import json

import numpy as np
import pytest
import torch

from samhq.data.synthetic import SyntheticShapes
from samhq.eval.evaluate import box_prompt, evaluate, point_prompt
from samhq.eval.metrics import boundary_iou, mask_iou
from samhq.predictor import SamHQPredictor


def test_box_prompt_is_the_tight_pixel_box():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True
    m[7, 1] = True
    assert box_prompt(m).tolist() == [1, 2, 8, 7]


def test_point_prompt_is_the_deepest_pixel():
    m = np.zeros((12, 14), bool)
    m[2:9, 1:12] = True  # 7 x 11: depth 4 on row 5, columns 4..8; the first wins
    m[0, 13] = True
    assert point_prompt(m).tolist() == [4, 5]
    edge = np.zeros((7, 7), bool)
    edge[:, :3] = True  # the border counts as background: column 1 (depth 2), not column 0 (3 px from column 3)
    assert point_prompt(edge).tolist() == [1, 1]


def _direct(model, item, prompt):
    """SAM-token and HQ masks through the predictor's public `predict`, one prompt at a time.

    With multimask_output=False the predictor returns token 0 + HQ logits, or HQ alone with
    hq_token_only: the SAM token's logits are the difference of the two.
    """
    pred = SamHQPredictor(model)
    pred.set_image(item["image"])
    out = {"sam": [], "hq": []}
    for m in item["masks"]:
        if prompt == "box":
            kw = dict(box=box_prompt(m))
        else:
            kw = dict(point_coords=point_prompt(m)[None], point_labels=np.ones(1))
        hq = pred.predict(multimask_output=False, hq_token_only=True, **kw)
        both = pred.predict(multimask_output=False, **kw)
        out["hq"].append(hq[0][0])
        out["sam"].append((pred.upscale_masks(torch.from_numpy(both[2] - hq[2])) > 0)[0].numpy())
    return out


def test_evaluate_matches_a_direct_computation(small_model):
    torch.manual_seed(0)
    data = SyntheticShapes(1, (48, 64), seed=11, objects_per_image=(3, 3))
    result = evaluate(small_model, data, prompt="both")
    n_obj = len(data[0]["masks"])
    assert n_obj >= 2 and result.images == 1 and len(result.records) == 2 * n_obj
    for i in range(len(data)):
        item = data[i]
        for prompt in ("box", "point"):
            direct = _direct(small_model, item, prompt)
            rows = [r for r in result.records if r["index"] == i and r["prompt"] == prompt]
            assert [r["kind"] for r in rows] == item["kinds"]
            for r, gt, sam, hq in zip(rows, item["masks"], direct["sam"], direct["hq"]):
                assert r["sam_iou"] == pytest.approx(mask_iou(gt, sam), abs=1e-3)
                assert r["hq_iou"] == pytest.approx(mask_iou(gt, hq), abs=1e-3)
                assert r["sam_biou"] == pytest.approx(boundary_iou(gt, sam), abs=1e-3)
                assert r["hq_biou"] == pytest.approx(boundary_iou(gt, hq), abs=1e-3)
    for prompt in ("box", "point"):
        rows = [r for r in result.records if r["prompt"] == prompt]
        s = result.summary[prompt]
        assert s["hq"]["objects"] == n_obj
        assert s["hq"]["mIoU"] == pytest.approx(np.mean([r["hq_iou"] for r in rows]))
        assert s["sam"]["mBIoU"] == pytest.approx(np.mean([r["sam_biou"] for r in rows]))
    # The SAM and HQ tokens of a random model are different masks.
    assert any(r["sam_iou"] != r["hq_iou"] for r in result.records)


def test_evaluate_best_sam_token_and_files(small_model, tmp_path):
    data = SyntheticShapes(1, 48, seed=2)
    single = evaluate(small_model, data, prompt="point")
    best = evaluate(small_model, data, prompt="point", sam_output="best")
    assert [r["hq_iou"] for r in single.records] == [r["hq_iou"] for r in best.records]
    assert "box" not in single.summary and "point" in single.summary
    j = single.save_json(tmp_path / "r.json")
    loaded = json.loads(j.read_text())
    assert loaded["summary"]["point"]["hq"]["objects"] == len(data[0]["masks"])
    assert len(loaded["records"]) == len(single.records)
    c = single.save_csv(tmp_path / "r.csv")
    lines = c.read_text().splitlines()
    assert lines[0].startswith("image,index,object,kind,prompt") and len(lines) == 1 + len(single.records)
    with pytest.raises(FileExistsError, match="already exists"):
        single.save_json(j)
    assert "HQ" in single.table() and "SAM token" in single.table()


def test_evaluate_plain_sam_scores_the_sam_token_only(small_model):
    small_model.hq_enabled = False
    try:
        result = evaluate(small_model, SyntheticShapes(1, 32, seed=1))
    finally:
        small_model.hq_enabled = True
    assert result.outputs == ("sam",) and "hq_iou" not in result.records[0]
    assert "HQ" not in result.table() and "SAM token" in result.table()


def test_evaluate_bad_arguments(small_model):
    data = SyntheticShapes(1, 32)
    with pytest.raises(ValueError, match="prompt must be"):
        evaluate(small_model, data, prompt="mask")
    with pytest.raises(ValueError, match="sam_output"):
        evaluate(small_model, data, sam_output="all")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(small_model, [{"image": np.zeros((8, 8, 3), np.uint8), "masks": [np.zeros((8, 8), bool)]}])


def test_cli_evaluate_folder(small_model, tmp_path, capsys):
    from PIL import Image

    from samhq.cli import main

    small_model.save_pretrained(tmp_path / "model")
    item = SyntheticShapes(1, 40, seed=4, objects_per_image=(1, 1))[0]
    (tmp_path / "data" / "im").mkdir(parents=True)
    (tmp_path / "data" / "gt").mkdir()
    Image.fromarray(item["image"]).save(tmp_path / "data" / "im" / "a.png")
    Image.fromarray(item["masks"][0].astype(np.uint8) * 255).save(tmp_path / "data" / "gt" / "a.png")
    (tmp_path / "data" / "im" / "b.jpg").write_bytes(b"broken")
    Image.new("L", (40, 40)).save(tmp_path / "data" / "gt" / "b.png")
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    args = ["evaluate", str(tmp_path / "model"), str(tmp_path / "data"), "--json", str(out_json), "--csv", str(out_csv)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "1 images, 1 objects" in text and "skipped 1" in text and "b.jpg" in text
    result = json.loads(out_json.read_text())
    direct = evaluate(small_model, [{"image": item["image"], "masks": item["masks"]}])
    assert result["summary"]["box"]["hq"]["mIoU"] == pytest.approx(direct.summary["box"]["hq"]["mIoU"])
    assert out_csv.read_text().count("\n") == 2
    assert main(args) == 2  # outputs exist: refused without --force
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["synthetic:0"], "N >= 1"),
    (["synthetic:x"], "synthetic:N"),
    (["nope/dir"], "dataset not found"),
    (["other", "synthetic:1"], "two models given"),
])
def test_cli_evaluate_errors(argv, message, capsys, tmp_path):
    from samhq.cli import main

    assert main(["evaluate", "--model", str(tmp_path / "m"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_dataset_specs(tmp_path):
    from samhq.cli.evaluate import open_dataset
    from samhq.data import CocoInstances, MaskFolder

    ds = open_dataset("synthetic:3:64:7")
    assert isinstance(ds, SyntheticShapes) and len(ds) == 3 and ds.image_size == (64, 64) and ds.seed == 7
    assert open_dataset("synthetic:5").image_size == (256, 256)
    (tmp_path / "ann.json").write_text(json.dumps({"images": [], "annotations": []}))
    assert isinstance(open_dataset(str(tmp_path / "ann.json"), images=str(tmp_path)), CocoInstances)
    assert isinstance(open_dataset(str(tmp_path), masks=str(tmp_path)), MaskFolder)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="COCO instance JSON"):
        open_dataset(str(tmp_path / "x.txt"))
