"""Readers: samhq's own output folders (the input of `samhq export masks`), and documented readers
for the formats whose own loaders cannot be used here (YOLO: ultralytics pulls its own torch;
LabelMe: its package imports Qt).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .polygons import polygons_to_mask

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
FORMAT_FOLDERS = ("coco", "yolo", "labelme", "label_studio", "geojson")  # what write_formats makes


def _samhq_doc(doc) -> str | None:
    """'everything', 'segment' or None for a JSON document samhq did not write."""
    if not isinstance(doc, dict):
        return None
    if {"images", "annotations"} <= doc.keys() and str(doc.get("info", {}).get("description", "")).startswith("samhq everything"):
        return "everything"
    if {"image", "height", "width", "masks"} <= doc.keys():
        return "segment"
    return None


def image_from_samhq_doc(doc, name: str) -> tuple[dict | None, dict[int, str]]:
    """One JSON document samhq wrote -> (the `samhq.formats.writers` image dict named `name`, its categories),
    or (None, {}) for a document samhq did not write. `samhq everything`'s NAME.json: masks as COCO RLE,
    score = predicted_iou; `samhq segment --json` / `segment --prompts`' NAME.json: its masks with their
    score and category_id. ValueError for a segment document without segmentations."""
    kind = _samhq_doc(doc)
    if kind == "everything":
        info = doc["images"][0]
        objects = [{"segmentation": a["segmentation"], "category_id": a.get("category_id", 1),
                    "score": a.get("predicted_iou", a.get("score"))} for a in doc["annotations"]]
        cats = {int(c["id"]): str(c["name"]) for c in doc.get("categories", [])}
        return {"file_name": info["file_name"], "height": int(info["height"]), "width": int(info["width"]),
                "name": name, "objects": objects}, cats
    if kind == "segment":
        if any("segmentation" not in m for m in doc["masks"]):
            raise ValueError("no masks' segmentation (an older samhq segment --json); rerun samhq segment")
        objects = [{"segmentation": m["segmentation"], "score": m.get("score"),
                    **({"category_id": m["category_id"]} if "category_id" in m else {})} for m in doc["masks"]]
        return {"file_name": doc["image"], "height": int(doc["height"]), "width": int(doc["width"]),
                "name": name, "objects": objects}, {}
    return None, {}


def _find_image(images_dir, name: str) -> Path | None:
    if images_dir is None:
        return None
    for suffix in IMAGE_SUFFIXES:
        for cand in (Path(images_dir) / f"{name}{suffix}", Path(images_dir) / f"{name}{suffix.upper()}"):
            if cand.is_file():
                return cand
    return None


def read_samhq_outputs(src_dir, images_dir=None) -> tuple[list[dict], dict[int, str]]:
    """Read a folder `samhq everything` or `samhq segment --json` wrote -> (images, categories).

    images: the `samhq.formats.writers` layout, one per document, sorted by name:
      - NAME.json from `samhq everything` (COCO-style; masks as COCO RLE; score = predicted_iou);
      - a JSON from `samhq segment --json` (masks need its `segmentation`, written since --json
        holds COCO RLE);
      - a NAME_masks/ folder of 0/255 PNGs (NNN.png) without a NAME.json: its masks, with the image
        found as NAME.* in images_dir (file_name NAME when not found; sizes from the PNGs).
    Folders `write_formats` makes (coco/, yolo/, labelme/, label_studio/, geojson/) and JSON files
    samhq did not write are skipped. categories: the documents' categories (default {1: "object"}).
    Raises ValueError when src_dir is missing or holds no samhq outputs.
    """
    from PIL import Image

    src = Path(src_dir)
    if not src.is_dir():
        raise ValueError(f"{src} is not a folder of samhq outputs (NAME.json, NAME_masks/)")
    images, categories, names = [], {}, set()
    for path in sorted(src.rglob("*.json")):
        rel = path.relative_to(src)
        if rel.parts[0] in FORMAT_FOLDERS and len(rel.parts) > 1:
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        name = rel.with_suffix("").as_posix()
        try:
            image, cats = image_from_samhq_doc(doc, name)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if image is None:
            continue
        categories.update(cats)
        images.append(image)
        names.add(name)
    for folder in sorted(src.rglob("*_masks")):
        name = folder.relative_to(src).as_posix()[: -len("_masks")]
        if not folder.is_dir() or name in names or folder.relative_to(src).parts[0] in FORMAT_FOLDERS:
            continue
        pngs = sorted(p for p in folder.iterdir() if re.fullmatch(r"\d+\.png", p.name))
        masks = [np.asarray(Image.open(p).convert("L")) > 127 for p in pngs]
        if not masks:
            continue
        if len({m.shape for m in masks}) > 1:
            raise ValueError(f"{folder}: the mask PNGs differ in size")
        image = _find_image(images_dir, name)
        images.append({"file_name": str(image) if image else name, "height": masks[0].shape[0],
                       "width": masks[0].shape[1], "name": name, "objects": [{"segmentation": m} for m in masks]})
        names.add(name)
    if not images:
        raise ValueError(f"no samhq outputs in {src}: expected NAME.json from samhq everything / segment --json, "
                         "or NAME_masks/ folders")
    images.sort(key=lambda im: im["name"])
    return images, dict(sorted(categories.items())) or {1: "object"}


def read_yolo(text: str, height: int, width: int, num_classes: int | None = None) -> list[tuple[int, np.ndarray]]:
    """Read a YOLO segmentation label file -> [(class index, (height, width) bool mask), ...].

    The format (ultralytics' dataset docs): one object per line, `class x1 y1 x2 y2 ...`, the class a
    0-based integer and at least three x, y pairs normalised by the image width and height. Blank
    lines are skipped. The polygon is filled by the pixel-centre rule (`polygons_to_mask`), which
    reads back exactly what `to_yolo` wrote; ultralytics itself fills with OpenCV's fillPoly, which
    also paints the outline (one pixel more on the right and bottom, and the cuts joining parts).
    Raises ValueError naming the line for a malformed one.
    """
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls = int(parts[0])
            xy = np.array([float(v) for v in parts[1:]], dtype=np.float64)
        except ValueError:
            raise ValueError(f"line {n}: expected `class x1 y1 x2 y2 ...` with an integer class, got {line[:60]!r}") from None
        if cls < 0 or (num_classes is not None and cls >= num_classes):
            raise ValueError(f"line {n}: class {cls} is not in 0..{(num_classes or 1) - 1}")
        if len(xy) < 6 or len(xy) % 2:
            raise ValueError(f"line {n}: a polygon needs an even number (>= 6) of coordinates, got {len(xy)}")
        if not np.isfinite(xy).all() or xy.min() < 0 or xy.max() > 1:
            raise ValueError(f"line {n}: coordinates must be normalised to 0..1")
        ring = xy.reshape(-1, 2) * np.array([width, height])
        out.append((cls, polygons_to_mask([[ring]], height, width)))
    return out


def read_labelme(doc: dict) -> list[tuple[str, np.ndarray]]:
    """Read a LabelMe JSON document's polygon shapes -> [(label, (H, W) bool mask), ...].

    Follows LabelMe's file layout (labelme's `_label_file`: `shapes` with label, points [[x, y],
    ...], shape_type, group_id; imageHeight / imageWidth) and its instance rule (labelme2coco):
    shapes with the same label and the same non-null group_id are one instance, every other shape
    is its own. Polygons are filled by the pixel-centre rule; LabelMe's own `shape_to_mask`
    (PIL's polygon with outline) reads pixel-edge polygons one pixel larger on the right and bottom.
    Shapes other than polygons raise ValueError, as does a malformed document.
    """
    try:
        h, w = int(doc["imageHeight"]), int(doc["imageWidth"])
        shapes = doc["shapes"]
    except (KeyError, TypeError, ValueError):
        raise ValueError("a LabelMe document needs imageHeight, imageWidth and shapes") from None
    groups: dict = {}
    for k, s in enumerate(shapes):
        if not isinstance(s.get("label"), str) or s.get("shape_type", "polygon") != "polygon":
            raise ValueError(f"shape {k}: only polygon shapes with a string label are read, got {s.get('shape_type')!r}")
        pts = np.asarray(s.get("points"), dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3:
            raise ValueError(f"shape {k}: points must be 3 or more [x, y] pairs")
        key = (s["label"], s["group_id"]) if s.get("group_id") is not None else (s["label"], ("shape", k))
        groups.setdefault(key, []).append([pts])
    return [(label, polygons_to_mask(polys, h, w)) for (label, _), polys in groups.items()]
