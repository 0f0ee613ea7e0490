"""COCO mask AP with pycocotools' COCOeval: the protocol of SAM-HQ's COCO table.

The paper scores SAM-HQ on COCO by prompting it with a detector's boxes and evaluating the masks
with COCO's instance-segmentation AP (`iouType="segm"`); prompting with the ground-truth boxes
instead (`samhq segment --prompts GT.json`) gives the "oracle box" AP. pycocotools computes
everything: IoU thresholds 0.50:0.05:0.95, 101 recall points, at most 100 detections per image,
areas small < 32^2 <= medium < 96^2 <= large (COCO's definitions).

    from samhq.eval.coco_ap import coco_ap
    coco_ap("instances_val2017.json", "segm_results.json")   # {"AP": ..., "AP50": ..., ...}
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _coco_api():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError("COCO AP needs pycocotools: pip install 'samhq[amg]' (or pip install pycocotools)") from None
    return COCO, COCOeval, mask_utils


def _load(src, what: str):
    if isinstance(src, (str, Path)):
        try:
            return json.loads(Path(src).read_text())
        except FileNotFoundError:
            raise ValueError(f"{what} not found: {src}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{src}: not valid JSON ({e})") from None
    return src


def _ground_truth(gt: dict, name: str, mask_utils):
    """A COCO object for a ground-truth dict, filling what COCOeval needs and files often leave out."""
    COCO, _, _ = _coco_api()
    if not isinstance(gt, dict) or not isinstance(gt.get("images"), list) or not isinstance(gt.get("annotations"), list):
        raise ValueError(f"{name}: a COCO ground truth needs \"images\" and \"annotations\" lists")
    sizes = {im.get("id"): (im.get("height"), im.get("width")) for im in gt["images"] if isinstance(im, dict)}
    anns = []
    for i, a in enumerate(gt["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a:
            raise ValueError(f"{name}: annotations[{i}] needs an \"image_id\"")
        if a["image_id"] not in sizes:
            raise ValueError(f"{name}: annotations[{i}] refers to image_id {a['image_id']}, which is not in \"images\"")
        a = dict(a, id=a.get("id", i + 1), iscrowd=a.get("iscrowd", 0))
        if "area" not in a and "segmentation" in a:
            h, w = sizes[a["image_id"]]
            seg = a["segmentation"]
            rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg, list) or isinstance(seg.get("counts"), list) else seg
            a["area"] = float(mask_utils.area(mask_utils.merge(rle) if isinstance(rle, list) else rle))
        anns.append(a)
    gt = dict(gt, annotations=anns, categories=gt.get("categories") or
              [{"id": c} for c in sorted({a.get("category_id", 1) for a in anns})])
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_ap(gt, results, iou_type: str = "segm", image_ids=None) -> dict:
    """COCO AP of results against a ground truth, with pycocotools' COCOeval.

    gt: a COCO annotation file (path) or dict; results: a COCO results file (path) or list of
    records ({"image_id", "category_id", "score", "segmentation"} for "segm", "bbox" for "bbox").
    iou_type "segm" (mask AP, default) or "bbox". image_ids: evaluate only these images (default:
    all images of gt). Returns {"AP", "AP50", "AP75", "APs", "APm", "APl"} as fractions in [0, 1]
    (-1 where COCOeval has nothing to score, e.g. no large objects) plus "stats", COCOeval's 12
    numbers. Raises ValueError for unreadable files, results on images not in gt and empty results.
    """
    COCO, COCOeval, mask_utils = _coco_api()
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    gt_name = str(gt) if isinstance(gt, (str, Path)) else "ground truth"
    res_name = str(results) if isinstance(results, (str, Path)) else "results"
    coco_gt = _ground_truth(_load(gt, "ground-truth file"), gt_name, mask_utils)
    res = _load(results, "results file")
    if isinstance(res, dict) and "annotations" in res:
        res = res["annotations"]  # a COCO-style document of results
    if not isinstance(res, list):
        raise ValueError(f"{res_name}: COCO results are a list of {{image_id, category_id, score, {iou_type}}}")
    if not res:
        raise ValueError(f"{res_name} has no results; nothing to evaluate")
    key = "segmentation" if iou_type == "segm" else "bbox"
    for i, r in enumerate(res):
        if not isinstance(r, dict) or not {"image_id", "category_id", "score", key} <= r.keys():
            raise ValueError(f"{res_name}: entry {i} needs image_id, category_id, score and {key}")
        if r["image_id"] not in coco_gt.imgs:
            raise ValueError(f"{res_name}: entry {i} is for image_id {r['image_id']!r}, which is not in {gt_name}")
    res = [dict(r) for r in res]  # loadRes writes into the records
    if iou_type == "segm":
        for r in res:
            seg = r["segmentation"]
            if isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE -> compressed
                r["segmentation"] = mask_utils.frPyObjects(seg, *seg["size"])
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(res)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(v) for v in ev.stats]
    return {**dict(zip(METRICS, stats[:6])), "stats": stats}


def format_ap(result: dict) -> str:
    """A two-line table of the six headline numbers, in percent as papers give them (- for -1)."""
    head = " ".join(f"{m:>6}" for m in METRICS)
    row = " ".join(f"{100 * result[m]:6.1f}" if result[m] >= 0 else f"{'-':>6}" for m in METRICS)
    return f"{head}\n{row}"
