"""Writers for the annotation formats labelling tools and training code read.

Plain data in, dicts / text / files out. One image is a dict:

    {"file_name": str,            # the image's path as it should appear in the output
     "height": int, "width": int,
     "name": str,                 # optional: output file stem (default: file_name's stem)
     "objects": [{"segmentation": mask, "category_id": int, "score": float}, ...]}

An object's `segmentation` is an (H, W) bool mask, an uncompressed RLE ({"size", "counts": [ints]},
`samhq.masks`), or a COCO compressed RLE ({"size", "counts": str}); an object may instead carry
`polygons` (as `mask_to_polygons` returns them: pixel-edge coordinates). `category_id` defaults to
the first category, `score` is optional. Categories are a name (one category, id 1; default
"object") or a mapping {category_id: name}.

Every polygon is in pixel-edge coordinates (pixel (i, j) covers x in [j, j+1], y in [i, i+1]): what
COCO (pycocotools), Label Studio (percent of the image) and LabelMe's canvas mean by a vertex.
Formats whose polygons cannot have holes or several parts (COCO polygons, YOLO, LabelMe, Label
Studio polygons) get them joined by zero-width cuts ("keyhole" polygons, as ultralytics joins
COCO's multi-part polygons): a pixel-centre rasterizer (pycocotools, GDAL, ours) reads them back
exactly; OpenCV's fillPoly and PIL's polygon, which also paint the outline, add the cut's pixels
and one pixel on the right and bottom edges.
"""
from __future__ import annotations

import base64
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path, PurePath

import numpy as np

from .ls_rle import mask_to_ls_rle
from .polygons import mask_to_polygons, polygons_to_mask

FORMATS = ("coco", "yolo", "labelme", "labelstudio", "geojson", "png")
LABELME_VERSION = "5.5.0"  # the LabelMe JSON layout written (shapes with description and mask keys)


# ---------------------------------------------------------------------------------------------
# Plain data in


def normalize_categories(categories="object") -> dict[int, str]:
    """A name -> {1: name}; a mapping {id: name} -> the same with int ids, sorted. ValueError when empty or malformed."""
    if isinstance(categories, str):
        if not categories.strip():
            raise ValueError("a category name must not be empty")
        return {1: categories}
    if not isinstance(categories, Mapping) or not categories:
        raise ValueError(f"categories must be a name or a non-empty mapping {{id: name}}, got {categories!r}")
    out = {}
    for k, v in categories.items():
        try:
            cid = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"category ids must be integers, got {k!r}") from None
        if cid < 0 or not isinstance(v, str) or not v.strip():
            raise ValueError(f"category {k!r}: ids must be >= 0 and names non-empty strings, got {v!r}")
        out[cid] = v
    return dict(sorted(out.items()))


def _category_id(obj: dict, categories: dict[int, str]) -> int:
    cid = obj.get("category_id")
    if cid is None:
        return next(iter(categories))
    if int(cid) not in categories:
        raise ValueError(f"category_id {cid} has no name; categories are {categories}")
    return int(cid)


def image_size(image: dict) -> tuple[int, int]:
    h, w = int(image["height"]), int(image["width"])
    if h < 1 or w < 1:
        raise ValueError(f"{image.get('file_name')}: image size {w}x{h} is empty")
    return h, w


def object_mask(obj: dict, height: int, width: int) -> np.ndarray:
    """An object's (height, width) bool mask from its segmentation (mask or RLE) or polygons."""
    seg = obj.get("segmentation")
    if seg is None:
        if "polygons" not in obj:
            raise ValueError("an object needs a 'segmentation' (mask or RLE) or 'polygons'")
        return polygons_to_mask(obj["polygons"], height, width)
    if isinstance(seg, dict):
        from ..masks import coco_to_mask, rle_to_mask

        mask = rle_to_mask(seg) if isinstance(seg.get("counts"), list) else coco_to_mask(seg)
    else:
        mask = np.asarray(seg)
        mask = mask if mask.dtype == bool else mask > 0
    if mask.shape != (height, width):
        raise ValueError(f"an object's mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}")
    return mask


def object_polygons(obj: dict, height: int, width: int, tolerance: float = 0.0, min_area: float = 0.0):
    """An object's polygons (`mask_to_polygons` layout); given polygons are used as they are (also when the
    object has a segmentation too: a caller that traced crops of a huge image passes both)."""
    if obj.get("polygons") is not None:
        return [[np.asarray(r, dtype=np.float64) for r in p] for p in obj["polygons"]]
    return mask_to_polygons(object_mask(obj, height, width), tolerance, min_area)


def keyhole(rings: list[np.ndarray]) -> np.ndarray:
    """Join rings (outer rings and holes) into one (K, 2) ring by zero-width cuts.

    Each further ring is spliced in at the pair of vertices nearest to the ring built so far:
    ... a, b, [b, b+1, ..., b-1, b], a, ... The cuts add no area, so a pixel-centre rasterizer
    (even-odd or non-zero) fills exactly the union of the outer rings minus the holes, provided
    holes run opposite to their outer rings (as `mask_to_polygons` orients them).
    """
    out = np.asarray(rings[0], dtype=np.float64)
    for ring in rings[1:]:
        ring = np.asarray(ring, dtype=np.float64)
        best = (np.inf, 0, 0)
        for s in range(0, len(ring), 256):  # chunked: (256, len(out)) distances at a time
            d = ((ring[s:s + 256, None, :] - out[None, :, :]) ** 2).sum(-1)
            k = int(d.argmin())
            if d.flat[k] < best[0]:
                best = (d.flat[k], s + k // d.shape[1], k % d.shape[1])
        _, j, i = best
        out = np.concatenate([out[:i + 1], np.roll(ring, -j, axis=0), ring[j:j + 1], out[i:]])
    return out


def _region_rings(polygons) -> list[np.ndarray]:
    """One keyhole ring per region (its holes cut in)."""
    return [keyhole(p) for p in polygons]


def _score(obj: dict):
    s = obj.get("score")
    return None if s is None else float(s)


def _stem(image: dict) -> str:
    name = image.get("name") or PurePath(str(image["file_name"])).with_suffix("").name
    return str(name)


def _flat(ring: np.ndarray, decimals: int) -> list[float]:
    return [round(float(v), decimals) for v in ring.ravel()]


# ---------------------------------------------------------------------------------------------
# COCO


def to_coco(images: list[dict], categories="object", segmentation: str = "rle", tolerance: float = 0.0,
            min_area: float = 0.0, decimals: int = 2) -> dict:
    """COCO instances JSON (https://cocodataset.org/#format-data) for all images.

    segmentation: "rle" (compressed COCO RLE, exact) or "polygons" (one polygon per region, holes
    cut in as keyholes, vertices rounded to `decimals`; `tolerance` / `min_area` simplify them).
    `area` and `bbox` (XYWH, the pixel extent: width = x_max - x_min + 1 in pixel indices) are what
    pycocotools computes from the segmentation written (`mask.area`, `mask.toBbox`); `score` is
    kept where the object has one. Image ids and annotation ids count from 1 in input order.
    Needs pycocotools (the `amg` extra) and, for polygons, rasterio and shapely (`formats`).
    """
    from ..masks import _coco_mask_api, mask_to_coco

    mask_utils = _coco_mask_api()
    cats = normalize_categories(categories)
    if segmentation not in ("rle", "polygons"):
        raise ValueError(f"COCO segmentation must be 'rle' or 'polygons', got {segmentation!r}")
    doc = {
        "info": {"description": "samhq export"},
        "images": [], "annotations": [],
        "categories": [{"id": cid, "name": name, "supercategory": name} for cid, name in cats.items()],
    }
    for image_id, image in enumerate(images, start=1):
        h, w = image_size(image)
        doc["images"].append({"id": image_id, "file_name": str(image["file_name"]), "height": h, "width": w})
        for obj in image.get("objects", []):
            seg = obj.get("segmentation")
            if segmentation == "rle":
                if isinstance(seg, dict) and isinstance(seg.get("counts"), str) and list(seg["size"]) == [h, w]:
                    coco = {"size": [h, w], "counts": seg["counts"]}  # already COCO RLE: as it is
                else:
                    coco = mask_to_coco(object_mask(obj, h, w))
                rle = {"size": coco["size"], "counts": coco["counts"].encode("ascii")}
            else:
                polys = [_flat(r, decimals) for r in _region_rings(object_polygons(obj, h, w, tolerance, min_area))]
                if not polys:
                    continue
                coco = polys
                rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
            area = int(mask_utils.area(rle))
            if area == 0:
                continue
            ann = {
                "id": len(doc["annotations"]) + 1, "image_id": image_id, "category_id": _category_id(obj, cats),
                "segmentation": coco, "area": area, "bbox": [int(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            }
            if _score(obj) is not None:
                ann["score"] = _score(obj)
            doc["annotations"].append(ann)
    return doc


# ---------------------------------------------------------------------------------------------
# YOLO segmentation


def yolo_classes(categories="object") -> dict[int, int]:
    """category_id -> YOLO class index (0, 1, ... in category-id order)."""
    return {cid: k for k, cid in enumerate(normalize_categories(categories))}


def to_yolo(image: dict, categories="object", tolerance: float = 0.0, min_area: float = 0.0, decimals: int = 6) -> str:
    """One image's YOLO segmentation label file: a line `class x1 y1 x2 y2 ...` per object.

    Coordinates are divided by the image width and height (0..1, pixel-edge frame), `decimals`
    places. An object with several regions or holes is one line: its rings joined by zero-width cuts
    (ultralytics' own COCO converter joins multi-part polygons the same way). Empty objects are
    left out. Classes: `yolo_classes(categories)`.
    """
    h, w = image_size(image)
    cats = normalize_categories(categories)
    classes = yolo_classes(cats)
    lines = []
    for obj in image.get("objects", []):
        polys = object_polygons(obj, h, w, tolerance, min_area)
        if not polys:
            continue
        ring = keyhole(_region_rings(polys)) / np.array([w, h])
        lines.append(" ".join([str(classes[_category_id(obj, cats)])] + [f"{v:.{decimals}f}" for v in ring.ravel()]))
    return "".join(line + "\n" for line in lines)


def yolo_data_yaml(categories="object", path: str = ".") -> str:
    """A YOLO dataset file: `path`, train/val image folders (images/) and the class names."""
    cats = normalize_categories(categories)
    names = "".join(f"  {k}: {json.dumps(cats[cid])}\n" for cid, k in yolo_classes(cats).items())
    return f"path: {json.dumps(str(path))}\ntrain: images\nval: images\nnc: {len(cats)}\nnames:\n{names}"


# ---------------------------------------------------------------------------------------------
# LabelMe


def to_labelme(image: dict, categories="object", tolerance: float = 0.0, min_area: float = 0.0,
               image_path: str | None = None, image_data: bytes | None = None, decimals: int = 2) -> dict:
    """LabelMe's JSON for one image: a `polygon` shape per region.

    label: the category name; an object with several regions gives each the same `group_id` (how
    LabelMe marks one instance in several shapes); holes are cut in as keyholes. `description`
    holds the score. image_path: `imagePath`, relative to the JSON file's folder (default the
    image's file_name); image_data: the image file's bytes to embed (`imageData`, base64), or None.
    """
    h, w = image_size(image)
    cats = normalize_categories(categories)
    shapes, group = [], 0
    for obj in image.get("objects", []):
        rings = _region_rings(object_polygons(obj, h, w, tolerance, min_area))
        if not rings:
            continue
        group_id = None
        if len(rings) > 1:
            group += 1
            group_id = group
        score = _score(obj)
        for ring in rings:
            shapes.append({
                "label": cats[_category_id(obj, cats)],
                "points": [[round(float(x), decimals), round(float(y), decimals)] for x, y in ring],
                "group_id": group_id, "description": "" if score is None else f"score {score:.3f}",
                "shape_type": "polygon", "flags": {}, "mask": None,
            })
    return {
        "version": LABELME_VERSION, "flags": {}, "shapes": shapes,
        "imagePath": str(image_path if image_path is not None else image["file_name"]),
        "imageData": None if image_data is None else base64.b64encode(image_data).decode("ascii"),
        "imageHeight": h, "imageWidth": w,
    }


# ---------------------------------------------------------------------------------------------
# Label Studio


def label_studio_result(mask: np.ndarray, label: str = "object", kind: str = "brush",
                        from_name: str = "label", to_name: str = "image", score: float | None = None,
                        polygons=None, tolerance: float = 0.0, min_area: float = 0.0, decimals: int = 4) -> list[dict]:
    """Label Studio result regions for one object (https://labelstud.io/guide/predictions).

    kind "brush": one `brushlabels` region, the mask in Label Studio's RLE (`ls_rle`); "polygon":
    one `polygonlabels` region per region of the mask, points in percent of the image width and
    height (pixel-edge frame), holes cut in as keyholes (`polygons`, when given, are used instead
    of tracing the mask). original_width / original_height are the mask's size.
    """
    h, w = np.shape(mask)
    base = {"from_name": from_name, "to_name": to_name, "original_width": int(w), "original_height": int(h),
            "image_rotation": 0}
    if score is not None:
        base["score"] = float(score)
    if kind == "brush":
        return [{"id": uuid.uuid4().hex[:10], "type": "brushlabels", **base,
                 "value": {"format": "rle", "rle": mask_to_ls_rle(mask), "brushlabels": [label]}}]
    if kind != "polygon":
        raise ValueError(f"Label Studio kind must be 'brush' or 'polygon', got {kind!r}")
    if polygons is None:
        polygons = mask_to_polygons(mask, tolerance, min_area)
    out = []
    for ring in _region_rings(polygons):
        pct = ring / np.array([w, h]) * 100.0
        out.append({"id": uuid.uuid4().hex[:10], "type": "polygonlabels", **base,
                    "value": {"points": [[round(float(x), decimals), round(float(y), decimals)] for x, y in pct],
                              "closed": True, "polygonlabels": [label]}})
    return out


def to_label_studio(images: list[dict], categories="object", kind: str = "brush", from_name: str = "label",
                    to_name: str = "image", data_key: str = "image", image_urls: list[str] | None = None,
                    model_version: str = "samhq", tolerance: float = 0.0, min_area: float = 0.0) -> list[dict]:
    """Label Studio tasks with predictions (pre-annotations), importable as a JSON file.

    Each task is {"data": {data_key: url}, "predictions": [{"model_version", "score", "result"}]},
    the result as `label_studio_result` makes it; the prediction's score is the mean object score.
    image_urls: the URL Label Studio loads each image from (e.g. "/data/local-files/?d=photos/a.jpg"
    or "/data/upload/1/a.jpg"); default the image's file_name. The project's labelling config must
    have an <Image name=to_name value="$data_key"/> and a BrushLabels / PolygonLabels named
    from_name with the category names as labels: `label_studio_config` writes one.
    """
    cats = normalize_categories(categories)
    if image_urls is not None and len(image_urls) != len(images):
        raise ValueError(f"{len(image_urls)} image URLs for {len(images)} images")
    tasks = []
    for k, image in enumerate(images):
        h, w = image_size(image)
        result, scores = [], []
        for obj in image.get("objects", []):
            mask = object_mask(obj, h, w)
            if not mask.any():
                continue
            score = _score(obj)
            scores += [score] if score is not None else []
            polys = object_polygons(obj, h, w, tolerance, min_area) if kind == "polygon" else None
            result += label_studio_result(mask, cats[_category_id(obj, cats)], kind, from_name, to_name, score, polys)
        prediction = {"model_version": model_version, "result": result}
        if scores:
            prediction["score"] = float(np.mean(scores))
        url = image_urls[k] if image_urls is not None else str(image["file_name"])
        tasks.append({"data": {data_key: url}, "predictions": [prediction]})
    return tasks


def label_studio_config(categories="object", kind: str = "brush", from_name: str = "label", to_name: str = "image",
                        data_key: str = "image", prompts: bool = True) -> str:
    """A Label Studio labelling config for samhq: the image, the mask labels and, with `prompts`,
    smart KeyPointLabels and RectangleLabels (the ML backend's clicks and boxes) with the same labels.

    Each Label carries its category id (`category`), which Label Studio's COCO export uses."""
    from xml.sax.saxutils import quoteattr

    labels = "".join(f'    <Label value={quoteattr(n)} category="{cid}"/>\n'
                     for cid, n in normalize_categories(categories).items())
    tag = {"brush": "BrushLabels", "polygon": "PolygonLabels"}.get(kind)
    if tag is None:
        raise ValueError(f"Label Studio kind must be 'brush' or 'polygon', got {kind!r}")
    parts = [f'<View>\n  <Image name="{to_name}" value="${data_key}" zoom="true"/>\n',
             f'  <{tag} name="{from_name}" toName="{to_name}">\n{labels}  </{tag}>\n']
    if prompts:
        parts.append(f'  <KeyPointLabels name="{from_name}_click" toName="{to_name}" smart="true">\n'
                     f'{labels}  </KeyPointLabels>\n')
        parts.append(f'  <RectangleLabels name="{from_name}_box" toName="{to_name}" smart="true">\n'
                     f'{labels}  </RectangleLabels>\n')
    return "".join(parts) + "</View>\n"


# ---------------------------------------------------------------------------------------------
# GeoJSON


def _affine(transform):
    if transform is None:
        return None
    t = [float(v) for v in list(transform)[:6]]
    if len(t) != 6 or not all(math.isfinite(v) for v in t) or t[0] * t[4] - t[1] * t[3] == 0:
        raise ValueError(f"transform must be an invertible affine (a, b, c, d, e, f) as affine.Affine orders it, "
                         f"got {transform!r}")
    return t


def _crs_member(crs) -> dict | None:
    if crs is None:
        return None
    text = crs.to_string() if hasattr(crs, "to_string") else str(crs)
    if text.upper().startswith("EPSG:"):
        text = f"urn:ogc:def:crs:EPSG::{text.split(':', 1)[1]}"
    return {"type": "name", "properties": {"name": text}}


def to_geojson(image: dict, categories="object", transform=None, crs=None, tolerance: float = 0.0,
               min_area: float = 0.0, decimals: int | None = None) -> dict:
    """A GeoJSON FeatureCollection (RFC 7946) for one image: one Feature per object.

    Geometry: a Polygon, or a MultiPolygon for several regions, with real holes; rings closed and
    exterior rings counter-clockwise in the output frame (RFC 7946 section 3.1.6). Properties: id
    (1, 2, ... in input order), category_id, category, score.
    transform: None for pixel-edge coordinates (x right, y down), or an affine map from pixel
    (column, row) to map coordinates, x' = a*x + b*y + c, y' = d*x + e*y + f: an `affine.Affine`
    (rasterio's `dataset.transform`) or its first six numbers. crs: written as the GeoJSON 2008
    `crs` member ("EPSG:32633" becomes urn:ogc:def:crs:EPSG::32633), which GDAL / QGIS read; RFC
    7946 readers (GDAL too) take coordinates without it as WGS 84 longitude/latitude, so a
    pixel-coordinate file opens in a GIS as degrees, upside down (y points down). tolerance is in
    pixels, before the transform; decimals rounds the output coordinates (None: full precision).
    """
    from shapely.geometry import MultiPolygon, Polygon, mapping
    from shapely.geometry.polygon import orient

    h, w = image_size(image)
    cats = normalize_categories(categories)
    t = _affine(transform)
    features = []
    for k, obj in enumerate(image.get("objects", []), start=1):
        polys = []
        for p in object_polygons(obj, h, w, tolerance, min_area):
            rings = [np.asarray(r, dtype=np.float64) for r in p]
            if t is not None:
                rings = [np.stack([t[0] * r[:, 0] + t[1] * r[:, 1] + t[2], t[3] * r[:, 0] + t[4] * r[:, 1] + t[5]], 1)
                         for r in rings]
            if decimals is not None:
                rings = [np.round(r, decimals) for r in rings]
            polys.append(orient(Polygon(rings[0], rings[1:]), sign=1.0))
        if not polys:
            continue
        cid = _category_id(obj, cats)
        features.append({
            "type": "Feature", "id": k,
            "geometry": mapping(polys[0] if len(polys) == 1 else MultiPolygon(polys)),
            "properties": {"id": k, "category_id": cid, "category": cats[cid], "score": _score(obj)},
        })
    doc = {"type": "FeatureCollection", "features": features}
    if crs is not None:
        doc["crs"] = _crs_member(crs)
    return json.loads(json.dumps(doc))  # tuples -> lists, plain JSON types


# ---------------------------------------------------------------------------------------------
# Files


def parse_formats(text) -> list[str]:
    """'coco,yolo' (or a list) -> ['coco', 'yolo']; 'labelstudio' also spelt label-studio / label_studio."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        f = item.strip().lower().replace("-", "").replace("_", "")
        if not f:
            continue
        if f not in FORMATS:
            raise ValueError(f"unknown format {item.strip()!r}; choose from {', '.join(FORMATS)}")
        if f not in out:
            out.append(f)
    if not out:
        raise ValueError(f"no format given; choose from {', '.join(FORMATS)}")
    return out


def split_output_formats(text) -> tuple[list[str], list[str]]:
    """A `samhq segment` / `samhq everything` --format list -> (their own outputs, `write_formats` formats).

    'json' (samhq's COCO-style file) and 'png' (mask PNGs and the overlay) are written by the commands
    themselves, 'both' is 'json,png'; every other name must be one of FORMATS other than png.
    E.g. 'both,coco,yolo' -> (['json', 'png'], ['coco', 'yolo']).
    """
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    own = []
    for t in items:
        for o in (("json", "png") if t == "both" else (t,) if t in ("json", "png") else ()):
            if o not in own:
                own.append(o)
    rest = [t for t in items if t not in ("json", "png", "both")]
    if not own and not rest:
        raise ValueError(f"no format given; choose from json, png, both, {', '.join(f for f in FORMATS if f != 'png')}")
    return own, (parse_formats(rest) if rest else [])


def _png_bytes(mask: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask).astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def _image_file(image: dict, image_root) -> Path | None:
    p = Path(str(image["file_name"]))
    roots = [Path(image_root) / p, Path(image_root) / p.name] if image_root else []
    for cand in ([p] if p.is_absolute() else roots + [p]):
        if cand.is_file():
            return cand
    return None


def _relative_to(path: Path, root) -> Path:
    if root is None or not path.is_absolute():
        return path
    try:
        return path.relative_to(Path(root).resolve())
    except ValueError:
        return path


# A file's contents: str (UTF-8 text), bytes, or a dict {name: bytes} for a folder of files (replaced as a whole).
FileData = "str | bytes | dict[str, bytes]"


def image_files(image: dict, formats, categories="object", *, out_dir=None, tolerance: float = 0.0, min_area: float = 0.0,
                image_root=None, embed_images: bool = False) -> dict[str, FileData]:
    """One image's own files of `formats` (relative path -> contents; the layout of `write_formats`):
    yolo/labels/NAME.txt, labelme/NAME.json, geojson/NAME.geojson, NAME_masks/ (png). Formats made of
    all images together (coco, labelstudio, yolo's data.yaml) are `dataset_files`'. out_dir: where the
    files will be written (LabelMe's imagePath is made relative to it when the image is found), or None.
    """
    fmts = parse_formats(formats)
    cats = normalize_categories(categories)
    stem = _stem(image)
    out: dict[str, FileData] = {}
    if "yolo" in fmts:
        out[f"yolo/labels/{stem}.txt"] = to_yolo(image, cats, tolerance, min_area)
    if "labelme" in fmts:
        src = _image_file(image, image_root)
        rel = str(image["file_name"])
        if src is not None and out_dir is not None:
            rel = os.path.relpath(src.resolve(), (Path(out_dir) / "labelme" / stem).parent.resolve())
        data = src.read_bytes() if (embed_images and src is not None) else None
        doc = to_labelme(image, cats, tolerance, min_area, image_path=rel, image_data=data)
        out[f"labelme/{stem}.json"] = json.dumps(doc, indent=1)
    if "geojson" in fmts:
        out[f"geojson/{stem}.geojson"] = json.dumps(to_geojson(image, cats, tolerance=tolerance, min_area=min_area))
    if "png" in fmts:
        h, w = image_size(image)
        out[f"{stem}_masks"] = {f"{i:03d}.png": _png_bytes(object_mask(o, h, w)) for i, o in enumerate(image.get("objects", []))}
    return out


def dataset_files(images: list[dict], formats, categories="object", *, out_dir=None, tolerance: float = 0.0,
                  min_area: float = 0.0, coco_segmentation: str = "rle", label_studio_kind: str = "brush",
                  image_url_prefix: str | None = None, image_root=None) -> dict[str, FileData]:
    """The files of `formats` made of all images together (relative path -> contents): coco/instances.json,
    yolo/data.yaml (its `path` is out_dir resolved, or "." when None), label_studio/tasks.json and config.xml."""
    fmts = parse_formats(formats)
    cats = normalize_categories(categories)
    out: dict[str, FileData] = {}
    if "coco" in fmts:
        out["coco/instances.json"] = json.dumps(to_coco(images, cats, coco_segmentation, tolerance, min_area))
    if "yolo" in fmts:
        out["yolo/data.yaml"] = yolo_data_yaml(cats, (Path(out_dir) / "yolo").resolve() if out_dir is not None else ".")
    if "labelstudio" in fmts:
        urls = None
        if image_url_prefix is not None:
            urls = [image_url_prefix + _relative_to(Path(str(im["file_name"])), image_root).as_posix() for im in images]
        tasks = to_label_studio(images, cats, label_studio_kind, image_urls=urls, tolerance=tolerance, min_area=min_area)
        out["label_studio/tasks.json"] = json.dumps(tasks)
        out["label_studio/config.xml"] = label_studio_config(cats, label_studio_kind)
    return out


def format_paths(images: list[dict], out_dir, formats) -> dict[str, list[Path]]:
    """The files `write_formats` writes, per format (folders for png)."""
    out = Path(out_dir)
    stems = [_stem(im) for im in images]
    paths = {
        "coco": [out / "coco" / "instances.json"],
        "yolo": [out / "yolo" / "data.yaml"] + [out / "yolo" / "labels" / f"{s}.txt" for s in stems],
        "labelme": [out / "labelme" / f"{s}.json" for s in stems],
        "labelstudio": [out / "label_studio" / "tasks.json", out / "label_studio" / "config.xml"],
        "geojson": [out / "geojson" / f"{s}.geojson" for s in stems],
        "png": [out / f"{s}_masks" for s in stems],
    }
    return {f: paths[f] for f in parse_formats(formats)}


def write_file_data(path: Path, data) -> None:
    """Write one `FileData` (text, bytes, or a folder's {name: bytes}) at path, which must not exist."""
    if isinstance(data, dict):
        path.mkdir(parents=True)
        for name, blob in data.items():
            (path / name).write_bytes(blob)
    elif isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")


def _atomic_write(path: Path, data) -> None:
    """Write `FileData` under a temporary name and rename it into place (a folder is replaced as a whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    write_file_data(tmp, data)
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def link_yolo_images(images: list[dict], out_dir, image_root=None) -> None:
    """yolo/images/NAME.ext links to the images that exist (a copy where links fail; files already there are
    kept), so a YOLO folder trains as it is."""
    ydir = Path(out_dir) / "yolo"
    for image in images:
        src = _image_file(image, image_root)
        if src is None:
            continue
        link = ydir / "images" / f"{_stem(image)}{src.suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() and not link.is_symlink():
            continue  # a copy of the user's: kept
        if link.is_symlink():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(src.resolve(), link.parent.resolve()))
        except OSError:  # no symlinks here (some Windows set-ups): copy
            shutil.copyfile(src, link)


def write_formats(images: list[dict], out_dir, formats, categories="object", *, tolerance: float = 0.0,
                  min_area: float = 0.0, coco_segmentation: str = "rle", label_studio_kind: str = "brush",
                  image_url_prefix: str | None = None, image_root=None, embed_images: bool = False,
                  overwrite: bool = False) -> list[Path]:
    """Write `images` (see the module docstring) in each of `formats` under out_dir; return the paths.

    formats: a list or comma-separated text of coco, yolo, labelme, labelstudio, geojson, png.
    Layout (NAME: the image's `name`, default its file stem):
        coco/instances.json                 all images (`to_coco`, segmentation `coco_segmentation`)
        yolo/data.yaml, yolo/labels/NAME.txt   (`to_yolo`); yolo/images/NAME.ext links to the images
                                            that exist (a copy where links fail; files already
                                            there are kept), so the folder trains as it is
        labelme/NAME.json                   (`to_labelme`), imagePath relative to labelme/
        label_studio/tasks.json, config.xml (`to_label_studio` with `label_studio_kind`, its config)
        geojson/NAME.geojson                pixel coordinates (`to_geojson`)
        NAME_masks/NNN.png                  one 0/255 PNG per object, as `samhq everything` writes
    (`dataset_files` and `image_files` give the same files as data, for callers that write them their
    own way: the commands' staged writes, the server's downloads.)
    image_root: the folder images with relative file_names are looked for in (as root / file_name,
        then root / its base name, then file_name from the current folder).
    image_url_prefix: Label Studio image URLs are prefix + file_name (relative to image_root),
        e.g. "/data/local-files/?d=photos/"; default the file_name itself.
    embed_images: put each image's bytes in the LabelMe JSON (imageData).
    Nothing is written when any output exists and overwrite is False (FileExistsError naming it);
    each file is written under a temporary name and renamed when complete.
    """
    fmts = parse_formats(formats)
    cats = normalize_categories(categories)
    stems = [_stem(im) for im in images]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        raise ValueError(f"several images would write the same outputs: {sorted(dup)[:3]}; give them distinct 'name's")
    paths = format_paths(images, out_dir, fmts)
    if not overwrite:
        for p in (p for group in paths.values() for p in group):
            if p.exists():
                raise FileExistsError(f"{p} already exists; pass --force (overwrite=True) to replace it")
    out = Path(out_dir)
    written: list[Path] = []
    options = dict(out_dir=out, tolerance=tolerance, min_area=min_area, image_root=image_root)
    files = dataset_files(images, fmts, cats, coco_segmentation=coco_segmentation, label_studio_kind=label_studio_kind,
                          image_url_prefix=image_url_prefix, **options)
    for image in images:
        files.update(image_files(image, fmts, cats, embed_images=embed_images, **options))
    for rel, data in files.items():
        _atomic_write(out / rel, data)
        written.append(out / rel)
    if "yolo" in fmts:
        link_yolo_images(images, out, image_root)
    return written
