"""Prompts from files: a detector's boxes, a COCO file's boxes, or per-image points and boxes, turned into masks.

The paper's COCO results are exactly this: boxes from a detector, one mask each from SAM-HQ, scored
with COCO mask AP (`samhq.eval.coco_ap`). Three prompt files are read (JSON, recognised by shape):

1. COCO detection results: a list of {"image_id", "bbox": [x, y, width, height], "score",
   "category_id"} (what detectors and `COCO.loadRes` use);
2. a COCO annotation file (a dict with "annotations"): each non-crowd annotation's bbox becomes a
   prompt with score 1 (the "oracle box" protocol); its own "images" list maps ids to files;
3. per-image prompts: {"FILE": [PROMPT, ...], ...} where FILE is an image's path relative to the
   image folder (or a COCO file_name, or an image id), and a PROMPT is {"box": [x0, y0, x1, y1]},
   {"points": [[x, y], ...], "labels": [1, 0, ...]} (labels default to 1), or both, optionally
   with "score", "category_id" and "id".

Coordinates are image pixels (x right, y down). Images come from a folder (a COCO image id matches
a file whose stem is that number, e.g. 000000397133.jpg for id 397133) or from a COCO `images` list
(file_name under an image folder). A malformed file raises `PromptFileError` (a ValueError) with one
line naming the file and the entry.

`segment_prompts` turns one image's prompts into COCO results records (RLE segmentation, the
prompt's score and category_id, optionally times the predicted IoU); `iter_prompt_results` does it
for every image, for a caller that writes results as they come (the CLI, `samhq.distributed`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .image_io import to_rgb_array
from .masks import crop_to_rle, mask_bbox, mask_to_coco, rle_to_coco

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


class PromptFileError(ValueError):
    """A prompt or image-list file that cannot be used; the message names the file and the entry."""


@dataclass
class FilePrompt:
    """One prompt of a file: box (4,) x0, y0, x1, y1 and/or points (N, 2) with labels (N,), in image pixels.

    score and category_id are carried to the result (a detector's); id is the entry's own id when it
    has one; entry says where it came from, for messages.
    """

    box: np.ndarray | None
    points: np.ndarray | None
    labels: np.ndarray | None
    score: float
    category_id: int
    id: int | None
    entry: str


@dataclass
class ImageEntry:
    """An image to segment: path, name (its path relative to the image folder, the output name), COCO image_id
    (None when the images are a folder and the id is not a number), height and width when a COCO list gives them."""

    path: Path
    name: str
    image_id: int | str | None
    height: int | None = None
    width: int | None = None
    prompts: list[FilePrompt] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading


def _load_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PromptFileError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptFileError(f"{path}: not valid JSON ({e})") from None


def _numbers(value, n: int | None, where: str, what: str) -> np.ndarray:
    arr = None
    if isinstance(value, (list, tuple)):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            arr = None
    if arr is None or (n is not None and arr.shape != (n,)) or not np.isfinite(arr).all():
        raise PromptFileError(f"{where}: {what}, got {json.dumps(value)[:80]}")
    return arr


def list_images(images, image_dir=None) -> list[ImageEntry]:
    """The images prompts refer to: a folder (searched recursively) or a COCO JSON file with an "images" list.

    For a COCO list, files are `image_dir / file_name` (default: the JSON's folder); ids, heights and
    widths come from the list. For a folder, an image's id is its stem as an integer when it is one.
    """
    images = Path(images)
    if images.is_dir():
        files = sorted(p for p in images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PromptFileError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {images}")
        out = []
        for p in files:
            stem = p.stem
            out.append(ImageEntry(p, p.relative_to(images).as_posix(), int(stem) if stem.isdigit() else None))
        return out
    data = _load_json(images, "image list")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PromptFileError(f"{images}: a COCO image list needs an \"images\" list of {{id, file_name}}")
    root = Path(image_dir) if image_dir is not None else images.parent
    out, seen = [], set()
    for i, info in enumerate(data["images"]):
        where = f"{images}: images[{i}]"
        if not isinstance(info, dict) or "id" not in info or not isinstance(info.get("file_name"), str):
            raise PromptFileError(f"{where}: needs \"id\" and \"file_name\"")
        if info["id"] in seen:
            raise PromptFileError(f"{where}: image id {info['id']} appears twice")
        seen.add(info["id"])
        h, w = info.get("height"), info.get("width")
        out.append(ImageEntry(root / info["file_name"], info["file_name"], info["id"],
                              int(h) if h is not None else None, int(w) if w is not None else None))
    return out


def _box_prompt(ann: dict, where: str, score_required: bool) -> FilePrompt:
    x, y, w, h = _numbers(ann.get("bbox"), 4, where, "bbox must be [x, y, width, height] (4 numbers)")
    if w < 0 or h < 0:
        raise PromptFileError(f"{where}: bbox width and height must be >= 0, got [{x:g}, {y:g}, {w:g}, {h:g}]")
    if score_required and "score" not in ann:
        raise PromptFileError(f"{where}: a detection needs a \"score\"")
    score = ann.get("score", 1.0)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise PromptFileError(f"{where}: score must be a number, got {score!r}")
    cat = ann.get("category_id", 1)
    if isinstance(cat, bool) or not isinstance(cat, int):
        raise PromptFileError(f"{where}: category_id must be an integer, got {cat!r}")
    return FilePrompt(np.array([x, y, x + w, y + h]), None, None, float(score), cat, ann.get("id"), where)


def parse_prompt(p, where: str) -> FilePrompt:
    """One per-image prompt dict ({"box": [x0, y0, x1, y1]} and/or {"points": [[x, y], ...], "labels": [...]},
    optional "score", "category_id", "id") -> FilePrompt; PromptFileError naming `where` when malformed."""
    if not isinstance(p, dict) or not ({"box", "points"} & p.keys()):
        raise PromptFileError(f"{where}: a prompt is {{\"box\": [x0, y0, x1, y1]}} "
                              "and/or {\"points\": [[x, y], ...], \"labels\": [...]}")
    box = pts = labels = None
    if "box" in p:
        box = _numbers(p["box"], 4, where, "box must be [x0, y0, x1, y1] (4 numbers)")
        if box[2] < box[0] or box[3] < box[1]:
            raise PromptFileError(f"{where}: box [{', '.join(f'{v:g}' for v in box)}] must have x1 >= x0 and y1 >= y0")
    if "points" in p:
        pts = _numbers(p["points"], None, where, "points must be [[x, y], ...]")
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
            raise PromptFileError(f"{where}: points must be a non-empty list of [x, y] pairs, got {json.dumps(p['points'])[:80]}")
        labels = np.ones(len(pts)) if "labels" not in p else _numbers(p["labels"], len(pts), where,
                                                                        f"labels must be {len(pts)} numbers, one per point")
        if not np.isin(labels, (0, 1)).all():
            raise PromptFileError(f"{where}: labels must be 1 (foreground) or 0 (background), got {labels.tolist()}")
    score = p.get("score", 1.0)
    cat = p.get("category_id", 1)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise PromptFileError(f"{where}: score must be a number, got {score!r}")
    if isinstance(cat, bool) or not isinstance(cat, int):
        raise PromptFileError(f"{where}: category_id must be an integer, got {cat!r}")
    return FilePrompt(box, pts, labels, float(score), cat, p.get("id"), where)


def read_prompts(path, images=None, image_dir=None) -> list[ImageEntry]:
    """The images that have prompts, each with its prompts, in image order.

    path: the prompt file (see the module docstring). images: a folder or a COCO JSON with an
    "images" list; may be omitted for a COCO annotation file (its own list is used). image_dir: where
    a COCO list's files are (default: that JSON's folder). Raises PromptFileError naming the file and
    entry for malformed entries, prompts for images that are not in `images`, and unknown formats.
    """
    path = Path(path)
    data = _load_json(path, "prompt file")
    if images is None:
        if not (isinstance(data, dict) and "annotations" in data):
            raise PromptFileError(f"{path}: give the images (a folder or a COCO JSON with an \"images\" list)")
        images = path
    entries = list_images(images, image_dir)
    by_id = {e.image_id: e for e in entries if e.image_id is not None}
    by_name = {e.name: e for e in entries}

    def image_for(key, where):
        e = by_id.get(key)
        if e is None and isinstance(key, str):
            e = by_name.get(key) or (by_id.get(int(key)) if key.isdigit() else None)
        if e is None:
            raise PromptFileError(f"{where}: image {key!r} is not among the images of {images}")
        return e

    if isinstance(data, list):  # COCO detection results
        for i, det in enumerate(data):
            where = f"{path}: entry {i}"
            if not isinstance(det, dict) or "image_id" not in det:
                raise PromptFileError(f"{where}: a detection is "
                                      "{\"image_id\", \"bbox\": [x, y, w, h], \"score\", \"category_id\"}")
            where += f" (image_id {det['image_id']})"
            image_for(det["image_id"], where).prompts.append(_box_prompt(det, where, score_required=True))
    elif isinstance(data, dict) and "annotations" in data:  # a COCO annotation file: its boxes
        if not isinstance(data["annotations"], list):
            raise PromptFileError(f"{path}: \"annotations\" must be a list")
        for i, ann in enumerate(data["annotations"]):
            where = f"{path}: annotations[{i}]"
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise PromptFileError(f"{where}: an annotation needs \"image_id\" and \"bbox\"")
            if ann.get("iscrowd", 0):
                continue  # crowd regions are not objects (COCO's evaluation ignores them)
            where += f" (image_id {ann['image_id']})"
            image_for(ann["image_id"], where).prompts.append(_box_prompt(ann, where, score_required=False))
    elif isinstance(data, dict):  # per-image prompts
        for key, prompts in data.items():
            where = f"{path}: {key!r}"
            entry = image_for(key, where)
            if not isinstance(prompts, list):
                raise PromptFileError(f"{where}: the value must be a list of prompts")
            for j, p in enumerate(prompts):
                entry.prompts.append(parse_prompt(p, f"{where}[{j}]"))
    else:
        raise PromptFileError(f"{path}: not a prompt file (a COCO results list, a COCO annotation file, or {{file: [prompts]}})")
    return [e for e in entries if e.prompts]


# ---------------------------------------------------------------------------------------------
# Segmenting


def _decode(predictor, prompts: list[FilePrompt], multimask_output, hq_token_only: bool, batch_size: int):
    """One (mask, x0, y0, predicted IoU) per prompt for an image already set on the predictor: the mask is
    the whole image's (x0 = y0 = 0) for a `SamHQPredictor`, a crop at column x0, row y0 for a tiled one
    (its `predict_regions`: no full-size mask of a huge image is made)."""
    from .predictor import SamHQPredictor

    out = [None] * len(prompts)
    tiled = hasattr(predictor, "predict_regions")
    boxes_only = [i for i, p in enumerate(prompts) if p.points is None]
    if (tiled or isinstance(predictor, SamHQPredictor)) and boxes_only:  # many boxes: decoded in batches
        mm = False if multimask_output is None else multimask_output
        for s in range(0, len(boxes_only), batch_size):
            idx = boxes_only[s:s + batch_size]
            boxes = np.stack([prompts[i].box for i in idx])
            if tiled:
                for i, r in zip(idx, predictor.predict_regions(boxes=boxes, multimask_output=mm, hq_token_only=hq_token_only)):
                    out[i] = (r.mask, r.box[0], r.box[1], float(r.score))
                continue
            b = torch.as_tensor(boxes, dtype=torch.float, device=predictor.device)
            b = predictor.transform.apply_boxes_torch(b, predictor.original_size)
            m, sc, _ = predictor.predict_torch(None, None, b, None, mm, False, hq_token_only, return_low_res=False)
            for k, i in enumerate(idx):
                out[i] = (m[k, 0].cpu().numpy(), 0, 0, float(sc[k, 0]))
    for i, p in enumerate(prompts):
        if out[i] is not None:
            continue
        mm = (p.box is None) if multimask_output is None else multimask_output  # SAM's advice: one mask for a box
        if tiled:
            (r,) = predictor.predict_regions(None if p.points is None else p.points[None],
                                             None if p.labels is None else p.labels[None],
                                             None if p.box is None else p.box[None], None, mm, hq_token_only)
            out[i] = (r.mask, r.box[0], r.box[1], float(r.score))
            continue
        m, sc, _ = predictor.predict(point_coords=p.points, point_labels=p.labels, box=p.box, multimask_output=mm,
                                     hq_token_only=hq_token_only, return_low_res=False)
        out[i] = (np.asarray(m[0]), 0, 0, float(sc[0]))
    return out


def segment_prompts(predictor, image, prompts: list[FilePrompt], image_id, multiply_iou: bool = False,
                    multimask_output: bool | None = None, hq_token_only: bool = False, batch_size: int = 64,
                    set_image_options: dict | None = None) -> list[dict]:
    """Masks for one image's prompts as COCO results records.

    predictor: a `SamHQPredictor` (boxes decoded in batches of batch_size) or a `samhq.tiles.TiledPredictor`
    (huge images: masks are made as crops). image: anything `set_image` takes; set_image_options
    go with it (e.g. a tiled predictor's embedding `store`). multimask_output None: one mask for a prompt
    with a box, the best of SAM's three for points alone (SAM's advice). Each record: image_id,
    category_id and score from the prompt (score times the predicted IoU with multiply_iou),
    segmentation (COCO compressed RLE, counts a str), bbox [x, y, width, height] and area of the
    mask, predicted_iou, and prompt_box ([x, y, width, height]) / prompt_points where given.
    """
    predictor.set_image(image, **(set_image_options or {}))
    height, width = predictor.original_size
    out = []
    for p, (m, x0, y0, iou) in zip(prompts, _decode(predictor, prompts, multimask_output, hq_token_only, batch_size)):
        if m.shape == (height, width):
            segmentation = mask_to_coco(m)
        else:
            segmentation = rle_to_coco(crop_to_rle(m, int(x0), int(y0), height, width))
        bbox = mask_bbox(m)
        if bbox[2]:
            bbox = [bbox[0] + int(x0), bbox[1] + int(y0), bbox[2], bbox[3]]
        rec = {"image_id": image_id, "category_id": p.category_id, "segmentation": segmentation,
               "score": p.score * iou if multiply_iou else p.score, "bbox": bbox, "area": int(m.sum()),
               "predicted_iou": iou}
        if p.box is not None:
            x0, y0, x1, y1 = (float(v) for v in p.box)
            rec["prompt_box"] = [x0, y0, x1 - x0, y1 - y0]
        if p.points is not None:
            rec["prompt_points"] = p.points.tolist()
            rec["prompt_labels"] = [int(v) for v in p.labels]
        if p.id is not None:
            rec["prompt_id"] = p.id
        out.append(rec)
    return out


def prompt_dict(p: FilePrompt) -> dict:
    """A FilePrompt as the JSON dict `parse_prompt` reads back (what `samhq.distributed` sends to its workers)."""
    d = {"score": p.score, "category_id": p.category_id}
    if p.box is not None:
        d["box"] = [float(v) for v in p.box]
    if p.points is not None:
        d["points"] = p.points.tolist()
        d["labels"] = [int(v) for v in p.labels]
    if p.id is not None:
        d["id"] = p.id
    return d


def check_entry_size(entry: ImageEntry, height: int, width: int) -> None:
    """ValueError when the image is not the size its COCO list says."""
    if (entry.height is not None and entry.height != height) or (entry.width is not None and entry.width != width):
        raise ValueError(f"{entry.path} is {width}x{height} but the image list says {entry.width}x{entry.height}")


def read_entry_image(entry: ImageEntry, bit_depth: str = "dtype") -> np.ndarray:
    """The entry's image as (H, W, 3) uint8 (`samhq.image_io.to_rgb_array` with bit_depth); ValueError when
    unreadable or not the size its COCO list says."""
    image = to_rgb_array(entry.path, bit_depth=bit_depth)
    check_entry_size(entry, *image.shape[:2])
    return image


def iter_prompt_results(predictor, entries: list[ImageEntry], **options):
    """For each entry: (entry, records, None), or (entry, None, error message) for an unreadable image.

    options go to `segment_prompts`. Records use the entry's image_id, or its name when it has none.
    """
    for entry in entries:
        try:
            image = read_entry_image(entry)
        except (ValueError, TypeError, OSError) as e:
            yield entry, None, str(e)
            continue
        image_id = entry.image_id if entry.image_id is not None else entry.name
        yield entry, segment_prompts(predictor, image, entry.prompts, image_id, **options), None
