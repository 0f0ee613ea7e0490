"""`samhq segment IMAGE --point X,Y[,LABEL] --box X0,Y0,X1,Y1`: prompt to mask at full resolution.

Points and at most one box make one object. Several boxes make one object each (points cannot be
added to several boxes at once). Outputs: the binary mask PNG (0 / 255; with several objects one
file per object, `NAME_0.png`, `NAME_1.png`, ...), an overlay PNG and a JSON with each mask's
score, bounding box (x, y, width, height), area and COCO RLE. Nothing is written when any input is
bad, and existing files are kept unless --force.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

from ._common import DeprecatedAlias, add_image_args, add_model_arg, new_command, refuse_overwrite


def register(sub) -> None:
    p = new_command(
        sub, "segment", "Segment an object from point and box prompts; write its mask, an overlay and JSON.",
        "samhq segment photo.jpg --point 420,310 --point 500,200,0 --box 300,150,640,480 "
        "--out mask.png --overlay overlay.png --json result.json",
    )
    p.add_argument("image", help="image file (any format PIL reads)")
    p.add_argument("--point", action="append", default=[], metavar="X,Y[,LABEL]",
                   help="a point in pixels; LABEL 1 = object (default), 0 = background. Repeat for more points")
    p.add_argument("--box", action="append", default=[], metavar="X0,Y0,X1,Y1",
                   help="a box in pixels. Repeat for several objects (one mask each)")
    add_model_arg(p)
    p.add_argument("--multimask", action="store_true",
                   help="let SAM pick the best of its three candidate masks (good for one ambiguous click)")
    p.add_argument("--hq-token-only", action="store_true", help="return the HQ token's mask alone (else SAM + HQ)")
    p.add_argument("--hq-only", action=DeprecatedAlias, nargs=0, dest="hq_token_only", help=argparse.SUPPRESS)
    p.add_argument("--out", help="binary mask PNG (default: IMAGE_mask.png in the current folder when no output is given)")
    p.add_argument("--overlay", help="overlay PNG: the image with the mask, its outline and the prompts")
    p.add_argument("--json", help="JSON with score, bbox, area and COCO RLE per mask")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    add_image_args(p, prompts=True)
    p.set_defaults(func=run)


def _numbers(text: str, counts: tuple[int, ...], what: str, form: str) -> list[float]:
    parts = text.split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = None
    if values is None or len(values) not in counts:
        raise ValueError(f"--{what} expects {form}, got {text!r}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"--{what} {text!r} contains NaN or infinite values")
    return values


def parse_prompts(points: list[str], boxes: list[str]):
    """-> (points (K, 2), labels (K,), boxes (M, 4)) as lists; raises ValueError for malformed text."""
    pts, labels = [], []
    for text in points:
        v = _numbers(text, (2, 3), "point", "X,Y or X,Y,LABEL")
        label = 1 if len(v) == 2 else v[2]
        if label not in (0, 1):
            raise ValueError(f"--point {text!r}: LABEL must be 1 (object) or 0 (background)")
        pts.append(v[:2])
        labels.append(int(label))
    import torch

    from ..modeling.prompt_encoder import check_prompts

    bxs = [_numbers(text, (4,), "box", "X0,Y0,X1,Y1") for text in boxes]
    for b in bxs:
        check_prompts(boxes=torch.tensor([[b]]))
    if not pts and not bxs:
        raise ValueError("give at least one prompt: --point X,Y[,LABEL] or --box X0,Y0,X1,Y1")
    if pts and len(bxs) > 1:
        raise ValueError("--point can be combined with one --box only; run once per box to add points to several")
    from ..limits import check_prompt_count

    check_prompt_count(len(pts), len(bxs))
    return pts, labels, bxs


def output_paths(args, n: int) -> dict[str, list[Path]]:
    out = args.out
    if out is None and args.overlay is None and args.json is None:
        out = f"{Path(args.image).stem}_mask.png"
    paths = {"mask": [], "overlay": [], "json": []}
    if out is not None:
        out = Path(out)
        paths["mask"] = [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(n)]
    if args.overlay:
        paths["overlay"] = [Path(args.overlay)]
    if args.json:
        paths["json"] = [Path(args.json)]
    return paths


def run(args) -> int:
    import torch
    from PIL import Image

    from ..checkpoints import require_finite
    from ..image_io import check_image_size, to_rgb_array
    from ..masks import mask_bbox, mask_to_coco
    from ..pipelines import load_for_inference
    from ..predictor import SamHQPredictor
    from ..visualize import draw_masks

    pts, labels, boxes = parse_prompts(args.point, args.box)
    n = max(1, len(boxes))
    paths = output_paths(args, n)
    every = [p for group in paths.values() for p in group]
    seen = {}
    for option, group in (("--out", paths["mask"]), ("--overlay", paths["overlay"]), ("--json", paths["json"])):
        for p in group:
            key = p.resolve()
            if key in seen:
                raise ValueError(f"{seen[key]} and {option} both name {p}; give each output its own file")
            seen[key] = option
    refuse_overwrite(every, args.force)
    for p in every:
        if not p.parent.is_dir():
            raise ValueError(f"output folder {p.parent} does not exist")
    if args.json:
        mask_to_coco(np.zeros((1, 1), bool))  # fail now, before any work, when pycocotools is missing
    image = to_rgb_array(args.image, bit_depth=args.bit_depth)
    check_image_size(*image.shape[:2])

    predictor = SamHQPredictor(load_for_inference(args.model, args.device, args.dtype))
    predictor.set_image(image)
    flags = dict(multimask_output=args.multimask, hq_token_only=args.hq_token_only)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if len(boxes) <= 1:
            m, s, _ = predictor.predict(
                point_coords=np.array(pts) if pts else None, point_labels=np.array(labels) if pts else None,
                box=np.array(boxes[0]) if boxes else None, **flags)
            m, s = m[None], s[None]
        else:
            tb = predictor.transform.apply_boxes_torch(torch.tensor(boxes, dtype=torch.float), predictor.original_size)
            m, s, _ = (t.cpu().numpy() for t in predictor.predict_torch(None, None, tb.to(predictor.device), **flags))
    for w in caught:
        print(f"samhq segment: warning: {w.message}", file=sys.stderr)
    # One mask per object (plain SAM and SAM 2 give three candidates: keep the best scored; HQ-SAM 2's HQ mask
    # alone with multimask is one mask with its three SAM tokens' scores).
    require_finite(s, "scores")
    best = s.argmax(axis=1) if m.shape[1] == s.shape[1] else np.zeros(len(m), dtype=int)
    masks, scores = m[np.arange(len(m)), best], s.max(axis=1)

    results = []
    for i, (mask, score) in enumerate(zip(masks, scores)):
        prompt = {"points": pts, "labels": labels} if pts else {}
        if boxes:
            prompt["box"] = boxes[i] if len(boxes) > 1 else boxes[0]
        entry = {"score": float(score), "bbox": mask_bbox(mask), "area": int(mask.sum()), "prompt": prompt}
        if args.json:
            entry["segmentation"] = mask_to_coco(mask)
        results.append(entry)

    text = None
    if paths["json"]:  # made before any file is written: nothing is written when it cannot be
        doc = {"image": str(args.image), "height": int(image.shape[0]), "width": int(image.shape[1]),
               "model": str(args.model), "multimask": args.multimask, "hq_token_only": args.hq_token_only, "masks": results}
        text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    for path, mask in zip(paths["mask"], masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    if paths["overlay"]:
        overlay = draw_masks(image, masks, points=pts or None, labels=labels or None, boxes=boxes or None)
        Image.fromarray(overlay).save(paths["overlay"][0])
    if text is not None:
        paths["json"][0].write_text(text)
    for p in every:
        print(f"wrote {p}")
    for i, r in enumerate(results):
        print(f"mask {i}: score {r['score']:.3f}, area {r['area']} px, bbox {r['bbox']}")
    return 0
