"""`samhq everything INPUT --out DIR`: automatic masks for one image, a folder of images or a list of paths.

Per image NAME (its path relative to the input folder, without the suffix) it writes
  DIR/NAME.json           COCO-style: image info and one annotation per mask (COCO RLE, bbox, area, scores)
  DIR/NAME_masks/NNN.png  one 0/255 PNG per mask            (--format png or both)
  DIR/NAME_overlay.png    the image with every mask in its own colour  (--format png or both)
Every file is written to a temporary name and renamed when complete, so an interrupted run leaves
nothing half-written; a rerun skips images whose outputs all exist. Existing outputs are only
replaced with --force. Unreadable images are reported and skipped; the exit code is 1 when any failed.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ._common import add_model_arg, new_command

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def register(sub) -> None:
    p = new_command(
        sub, "everything", "Segment everything: automatic masks for an image, a folder (recursive) or a list of paths.",
        "samhq everything photos/ --out masks/ --format both --points-per-side 32",
    )
    p.add_argument("input", help="an image, a folder (searched recursively) or a .txt file with one image path per line")
    p.add_argument("--out", "-o", required=True, help="output folder")
    add_model_arg(p)
    p.add_argument("--format", choices=["json", "png", "both"], default="json",
                   help="json: COCO-style masks; png: mask PNGs and an overlay; both (default: json)")
    p.add_argument("--points-per-side", type=int, default=32, help="prompt grid size (default 32)")
    p.add_argument("--points-per-batch", type=int, default=64, help="prompts per decoder call (default 64)")
    p.add_argument("--pred-iou-thresh", type=float, default=0.88, help="minimum predicted IoU (default 0.88)")
    p.add_argument("--stability-thresh", type=float, default=0.95, help="minimum stability score (default 0.95)")
    p.add_argument("--box-nms-thresh", type=float, default=0.7, help="box IoU above which duplicates are dropped (default 0.7)")
    p.add_argument("--crop-layers", type=int, default=0, help="extra layers of image crops (default 0)")
    p.add_argument("--min-region-area", type=int, default=0, help="fill holes / drop islands below this many pixels (default 0)")
    p.add_argument("--hq-token-only", action="store_true", help="use the HQ mask alone instead of SAM mask + HQ mask")
    p.add_argument("--force", action="store_true", help="recompute and overwrite existing outputs")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


def list_images(src) -> list[tuple[Path, str]]:
    """(image path, output name) pairs for an image file, a folder (recursive) or a .txt list of paths."""
    src = Path(src)
    if not src.exists():
        raise ValueError(f"input not found: {src}")
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        pairs = [(p, p.relative_to(src).with_suffix("").as_posix()) for p in files]
        if not pairs:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {src}")
    elif src.suffix.lower() == ".txt":
        lines = [s.strip() for s in src.read_text().splitlines()]
        paths = [Path(s) if Path(s).is_absolute() else src.parent / s for s in lines if s and not s.startswith("#")]
        if not paths:
            raise ValueError(f"{src} lists no image paths (one path per line expected)")
        pairs = []
        for p in paths:
            try:
                name = p.resolve().relative_to(src.parent.resolve()).with_suffix("").as_posix()
            except ValueError:  # outside the list's folder
                name = p.stem
            pairs.append((p, name))
    else:
        pairs = [(src, src.stem)]
    seen = {}
    for path, name in pairs:
        if name in seen:
            raise ValueError(f"{seen[name]} and {path} would write the same outputs ({name}.*); rename one")
        seen[name] = path
    return pairs


def outputs(out_dir: Path, name: str, fmt: str) -> dict[str, Path]:
    files = {}
    if fmt in ("json", "both"):
        files["json"] = out_dir / f"{name}.json"
    if fmt in ("png", "both"):
        files["masks"] = out_dir / f"{name}_masks"
        files["overlay"] = out_dir / f"{name}_overlay.png"
    return files


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename onto path (a folder is replaced as a whole)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    write(tmp)
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def coco_json(image_path: Path, height: int, width: int, records: list[dict], settings: dict) -> dict:
    """COCO-style document: one image and its mask annotations (segmentation as COCO RLE)."""
    from ..masks import rle_to_coco

    anns = []
    for i, r in enumerate(records):
        anns.append({
            "id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
            "segmentation": rle_to_coco(r["segmentation"]), "area": r["area"], "bbox": r["bbox"],
            "predicted_iou": r["predicted_iou"], "stability_score": r["stability_score"],
            "point_coords": r["point_coords"], "crop_box": r["crop_box"],
        })
    return {
        "images": [{"id": 1, "file_name": str(image_path), "height": height, "width": width}],
        "categories": [{"id": 1, "name": "object"}],
        "annotations": anns,
        "info": {"description": "samhq everything", **settings},
    }


def _progress(items):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, unit="image", desc="samhq everything", disable=None)  # None: no bar when stderr is not a terminal


# ---------------------------------------------------------------------------------------------


def run(args) -> int:
    from PIL import Image

    from ..automatic import SamHQAutomaticMaskGenerator
    from ..image_io import to_rgb_array
    from ..masks import rle_to_mask
    from ..pipelines import load_for_inference
    from ..visualize import draw_masks

    images = list_images(args.input)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a folder")
    todo, skipped = [], 0
    for path, name in images:
        files = outputs(out_dir, name, args.format)
        if not args.force and all(p.exists() for p in files.values()):
            skipped += 1
        else:
            todo.append((path, name, files))
    settings = {
        "model": str(args.model), "points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
        "stability_score_thresh": args.stability_thresh, "box_nms_thresh": args.box_nms_thresh,
        "crop_n_layers": args.crop_layers, "min_mask_region_area": args.min_region_area, "hq_token_only": args.hq_token_only,
    }
    done = failed = n_masks = 0
    start = time.time()
    if todo:
        model = load_for_inference(args.model, args.device, args.dtype)
        generator = SamHQAutomaticMaskGenerator(
            model, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_thresh,
            box_nms_thresh=args.box_nms_thresh, crop_n_layers=args.crop_layers,
            min_mask_region_area=args.min_region_area, output_mode="uncompressed_rle",
        )
        for path, name, files in _progress(todo):
            try:
                image = to_rgb_array(path)
                records = generator.generate(image, hq_token_only=args.hq_token_only)
            except (ValueError, TypeError, OSError) as e:
                failed += 1
                print(f"samhq everything: skipped {path}: {e}", file=sys.stderr)
                continue
            todo_files = {k: p for k, p in files.items() if args.force or not p.exists()}
            if "json" in todo_files:
                doc = coco_json(path, image.shape[0], image.shape[1], records, settings)
                _atomic_write(todo_files["json"], lambda t: t.write_text(json.dumps(doc)))
            if "masks" in todo_files or "overlay" in todo_files:
                masks = [rle_to_mask(r["segmentation"]) for r in records]
                if "masks" in todo_files:
                    _atomic_write(todo_files["masks"], lambda t: _write_mask_pngs(t, masks))
                if "overlay" in todo_files:
                    # larger masks first, so the small ones stay visible on top
                    pic = Image.fromarray(draw_masks(image, sorted(masks, key=lambda m: -int(m.sum()))))
                    _atomic_write(todo_files["overlay"], lambda t: pic.save(t, format="PNG"))
            done += 1
            n_masks += len(records)
    print(f"samhq everything: {done} images done, {skipped} skipped (already done), {failed} failed, "
          f"{n_masks} masks written to {out_dir} in {time.time() - start:.1f}s")
    return 1 if failed else 0


def _write_mask_pngs(folder: Path, masks: list[np.ndarray]) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, m in enumerate(masks):
        Image.fromarray(m.astype(np.uint8) * 255).save(folder / f"{i:03d}.png")
