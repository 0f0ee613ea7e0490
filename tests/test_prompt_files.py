"""Prompts from files (samhq.prompt_files): reading the three formats, one-line errors, and COCO results out."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from samhq.prompt_files import PromptFileError, iter_prompt_results, list_images, read_prompts, segment_prompts

pycocotools = pytest.importorskip("pycocotools")

NO_GRAD = True


def write_images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for name, (h, w) in sizes.items():
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(folder / name)


def coco_list(path, entries):
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f, "height": h, "width": w} for i, f, h, w in entries]}))
    return path


# ---------------------------------------------------------------------------------------------
# Reading


def test_detections_map_to_a_coco_image_list_and_to_a_folder(tmp_path):
    write_images(tmp_path / "img", {"000000000007.png": (20, 30), "000000000009.png": (20, 30), "cat.png": (20, 30)})
    dets = [{"image_id": 7, "bbox": [1, 2, 10, 5], "score": 0.5, "category_id": 3},
            {"image_id": 9, "bbox": [0, 0, 4, 4], "score": 0.25, "category_id": 1},
            {"image_id": 7, "bbox": [5, 5, 0, 0], "score": 0.75, "category_id": 2, "id": 12}]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    # a folder: ids are the numeric file stems (COCO's own file names)
    entries = read_prompts(tmp_path / "dets.json", tmp_path / "img")
    assert [e.name for e in entries] == ["000000000007.png", "000000000009.png"]  # cat.png has no prompts
    first = entries[0]
    assert first.image_id == 7 and [p.category_id for p in first.prompts] == [3, 2]
    np.testing.assert_array_equal(first.prompts[0].box, [1, 2, 11, 7])  # XYWH -> XYXY
    assert first.prompts[0].score == 0.5 and first.prompts[1].id == 12
    # a COCO images list with other file names
    images = coco_list(tmp_path / "list.json", [(7, "img/cat.png", 20, 30), (9, "img/000000000009.png", 20, 30)])
    entries = read_prompts(tmp_path / "dets.json", images)
    assert [(e.image_id, e.path.name, e.height, e.width) for e in entries] == [(7, "cat.png", 20, 30),
                                                                                (9, "000000000009.png", 20, 30)]


def test_a_coco_annotation_file_gives_its_boxes(tmp_path):
    write_images(tmp_path, {"a.png": (20, 30)})
    ann = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}],
           "annotations": [{"id": 5, "image_id": 1, "bbox": [1, 1, 3, 3], "category_id": 4},
                           {"id": 6, "image_id": 1, "bbox": [0, 0, 9, 9], "category_id": 4, "iscrowd": 1}]}
    (tmp_path / "gt.json").write_text(json.dumps(ann))
    (entry,) = read_prompts(tmp_path / "gt.json")  # its own images list
    assert len(entry.prompts) == 1 and entry.prompts[0].score == 1.0 and entry.prompts[0].id == 5  # crowd left out


def test_per_image_points_and_boxes(tmp_path):
    write_images(tmp_path / "img", {"a.png": (20, 30)})
    write_images(tmp_path / "img" / "sub", {"b.png": (20, 30)})
    prompts = {"a.png": [{"box": [1, 2, 8, 9]}, {"points": [[3, 4], [5, 6]], "labels": [1, 0], "category_id": 2, "score": 0.5}],
               "sub/b.png": [{"points": [[1, 1]]}]}
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    a, b = read_prompts(tmp_path / "p.json", tmp_path / "img")
    assert a.name == "a.png" and b.name == "sub/b.png"
    np.testing.assert_array_equal(a.prompts[0].box, [1, 2, 8, 9])
    np.testing.assert_array_equal(a.prompts[1].labels, [1, 0])
    np.testing.assert_array_equal(b.prompts[0].labels, [1])


@pytest.mark.parametrize("content, message", [
    ([{"image_id": 7, "bbox": [1, 2, 3], "score": 1, "category_id": 1}],
     "entry 0 (image_id 7): bbox must be [x, y, width, height]"),
    ([{"image_id": 7, "bbox": [1, 2, 3, 4], "category_id": 1}], "entry 0 (image_id 7): a detection needs a \"score\""),
    ([{"image_id": 7, "bbox": [1, 2, 3, 4], "score": 1, "category_id": 1},
      {"image_id": 8, "bbox": [1, 2, 3, 4], "score": 1, "category_id": 1}], "entry 1 (image_id 8): image 8 is not among"),
    ([{"image_id": 7, "bbox": [1, 2, -3, 4], "score": 1, "category_id": 1}], "width and height must be >= 0"),
    ([{"image_id": 7, "bbox": [1, 2, 3, "x"], "score": 1, "category_id": 1}], "bbox must be"),
    ([{"image_id": 7, "bbox": [1, 2, 3, 4], "score": "high", "category_id": 1}], "score must be a number"),
    ({"000000000007.png": [{"box": [5, 5, 1, 1]}]}, "'000000000007.png'[0]: box [5, 5, 1, 1] must have x1 >= x0"),
    ({"000000000007.png": [{"points": [[1, 2]], "labels": [1, 1]}]}, "labels must be 1 numbers"),
    ({"000000000007.png": [{"points": [[1, 2]], "labels": [2]}]}, "labels must be 1 (foreground) or 0"),
    ({"000000000007.png": [{"polygon": [1, 2]}]}, "a prompt is"),
    ({"nope.png": [{"box": [1, 1, 2, 2]}]}, "image 'nope.png' is not among"),
    ("not json", "not valid JSON"),
])
def test_malformed_files_give_one_line_naming_the_entry(tmp_path, content, message):
    write_images(tmp_path / "img", {"000000000007.png": (20, 30)})
    (tmp_path / "p.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(PromptFileError) as e:
        read_prompts(tmp_path / "p.json", tmp_path / "img")
    assert message in str(e.value) and str(tmp_path / "p.json") in str(e.value) and "\n" not in str(e.value)


def test_image_lists_are_checked(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}]}))
    with pytest.raises(PromptFileError, match=r"images\[1\]: image id 1 appears twice"):
        list_images(tmp_path / "l.json")
    with pytest.raises(PromptFileError, match="no images"):
        list_images(tmp_path)


# ---------------------------------------------------------------------------------------------
# Detections in, COCO results out


@pytest.fixture(scope="module")
def demo():
    from samhq import SamHQModel
    from samhq.checkpoints import BUNDLED

    if not (BUNDLED["samhq-tiny-shapes"] / "model.safetensors").exists():
        pytest.skip("the demo model is not in this checkout")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield SamHQModel.from_pretrained("samhq-tiny-shapes").eval()
    torch.set_num_threads(threads)


def detection_set(tmp_path):
    """Two images of solid shapes, their COCO ground truth, and 'detections': the true boxes moved by a pixel or
    two, with scores and categories, plus one false positive."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_tiles import scene

    from samhq.masks import mask_to_coco

    rng = np.random.default_rng(0)
    shapes = [[("ellipse", (30, 40, 110, 100), (220, 60, 40)), ("rectangle", (150, 120, 230, 200), (40, 200, 60))],
              [("ellipse", (60, 60, 200, 180), (60, 60, 220)), ("rectangle", (20, 200, 90, 240), (230, 230, 40))]]
    (tmp_path / "img").mkdir()
    images, anns, dets = [], [], []
    for i, sh in enumerate(shapes, start=1):
        image, masks = scene(256, 256, sh, seed=i)
        Image.fromarray(image).save(tmp_path / "img" / f"{i:012d}.png")
        images.append({"id": i, "file_name": f"{i:012d}.png", "height": 256, "width": 256})
        for j, m in enumerate(masks):
            ys, xs = np.nonzero(m)
            box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": j + 1, "segmentation": mask_to_coco(m),
                         "bbox": box, "area": int(m.sum()), "iscrowd": 0})
            jitter = rng.integers(-2, 3, 4)
            dets.append({"image_id": i, "category_id": j + 1, "score": round(float(rng.uniform(0.5, 1)), 3),
                         "bbox": [int(b + j) for b, j in zip(box, jitter)]})
    dets.append({"image_id": 1, "category_id": 2, "score": 0.3, "bbox": [180, 10, 50, 40]})  # nothing there
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1}, {"id": 2}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    return gt, dets


def test_detections_in_coco_results_out(demo, tmp_path):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from samhq import SamHQPredictor
    from samhq.masks import coco_to_mask

    gt, dets = detection_set(tmp_path)
    entries = read_prompts(tmp_path / "dets.json", tmp_path / "gt.json", image_dir=tmp_path / "img")
    predictor = SamHQPredictor(demo)
    results = []
    for _entry, records, error in iter_prompt_results(predictor, entries):
        assert error is None
        results += records
    assert len(results) == len(dets)
    for rec, det in zip(results, sorted(dets, key=lambda d: d["image_id"])):  # image order, file order within
        assert (rec["image_id"], rec["category_id"], rec["score"]) == (det["image_id"], det["category_id"], det["score"])
    # each batched mask is what predict() gives for that box alone
    image = np.asarray(Image.open(tmp_path / "img" / "000000000001.png"))
    predictor.set_image(image)
    x, y, w, h = dets[0]["bbox"]
    alone, score, _ = predictor.predict(box=np.array([x, y, x + w, y + h]), multimask_output=False)
    assert np.array_equal(coco_to_mask(results[0]["segmentation"]), alone[0])
    assert results[0]["predicted_iou"] == pytest.approx(float(score[0]), abs=1e-6)
    # read back by pycocotools, and scored
    (tmp_path / "res.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(coco, coco.loadRes(str(tmp_path / "res.json")), "segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[1] > 0.9  # AP50: the demo model segments these solid shapes from near-true boxes
    # scores times the predicted IoU
    again = segment_prompts(predictor, image, entries[0].prompts, 1, multiply_iou=True)
    for a, r in zip(again, results):
        assert a["score"] == pytest.approx(r["score"] * r["predicted_iou"])


def test_unreadable_and_mis_sized_images_are_reported(demo, tmp_path):
    from samhq import SamHQPredictor

    write_images(tmp_path, {"a.png": (20, 30)})
    (tmp_path / "b.png").write_bytes(b"broken")
    (tmp_path / "l.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 21, "width": 30},
                                                            {"id": 2, "file_name": "b.png"}]}))
    (tmp_path / "p.json").write_text(json.dumps({"1": [{"box": [1, 1, 5, 5]}], "2": [{"box": [1, 1, 5, 5]}]}))
    out = list(iter_prompt_results(SamHQPredictor(demo), read_prompts(tmp_path / "p.json", tmp_path / "l.json")))
    assert [(e.image_id, r, "21" in err if e.image_id == 1 else "b.png" in err)
            for e, r, err in out] == [(1, None, True), (2, None, True)]


def test_the_tiled_predictor_takes_prompt_files(demo, tmp_path):
    from samhq.tiles import TiledPredictor

    gt, dets = detection_set(tmp_path)
    entries = read_prompts(tmp_path / "dets.json", tmp_path / "gt.json", image_dir=tmp_path / "img")
    tp = TiledPredictor(demo, tile_size=128, overlap=32)  # 256-px images in 128-px tiles
    (entry, records, err), *_ = iter_prompt_results(tp, entries[:1])
    tp.set_image(tmp_path / "img" / entry.path.name)
    for p, r in zip(entry.prompts, records):
        m, s, _ = tp.predict(box=p.box, multimask_output=False)
        from samhq.masks import coco_to_mask

        assert np.array_equal(coco_to_mask(r["segmentation"]), m[0]) and r["predicted_iou"] == pytest.approx(float(s[0]))
