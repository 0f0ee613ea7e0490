"""Draw the README figure: a few held-out synthetic objects with the prompt, the SAM-token mask and the HQ mask.

    python examples/make_figure.py --out docs/demo_figure.png

Objects are not picked by score: the first object of each listed kind in the held-out set
(SyntheticShapes(num_images, size, seed=1000)), in dataset order. Columns: image with the prompt,
ground truth, SAM-token mask, HQ mask, each cropped around the object and scaled up (nearest) so
single pixels stay visible; the masks' IoU / boundary IoU are printed above them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from samhq import SamHQModel
from samhq.data.synthetic import SyntheticShapes
from samhq.eval.evaluate import box_prompt, point_prompt, predict_tokens
from samhq.eval.metrics import boundary_iou, erode, mask_iou
from samhq.predictor import SamHQPredictor

TILE, HEADER, GAP = 224, 18, 6
COLOURS = {"gt": (255, 200, 0), "sam": (60, 140, 255), "hq": (40, 220, 90)}


def find_objects(data, kinds):
    """(index, object) of the first object of each kind, in dataset order."""
    found = {}
    for i in range(len(data)):
        for j, k in enumerate(data[i]["kinds"]):
            if k in kinds and k not in found:
                found[k] = (i, j)
        if len(found) == len(kinds):
            break
    return [found[k] for k in kinds if k in found]


def crop_box(mask, margin=0.2, min_fraction=0.375):
    """A square crop (x0, y0, x1, y1) around the mask, at least min_fraction of the image side, clipped to the image."""
    h, w = mask.shape
    x0, y0, x1, y1 = box_prompt(mask)
    side = max(x1 - x0, y1 - y0, min_fraction * min(h, w)) * (1 + 2 * margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    x0, y0 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    return x0, y0, int(min(w, x0 + side)), int(min(h, y0 + side))


def overlay(image, mask, colour):
    """Image dimmed, mask filled at 50% and its 1-px edge in full colour: (H, W, 3) uint8."""
    out = image.astype(np.float32) * 0.6
    c = np.array(colour, np.float32)
    out[mask] = 0.5 * out[mask] + 0.5 * c
    out[mask & ~erode(mask, 1)] = c
    return out.clip(0, 255).astype(np.uint8)


def tile(arr, crop, label):
    x0, y0, x1, y1 = crop
    im = Image.fromarray(arr[y0:y1, x0:x1]).resize((TILE, TILE), Image.NEAREST)
    canvas = Image.new("RGB", (TILE, TILE + HEADER), "white")
    canvas.paste(im, (0, HEADER))
    ImageDraw.Draw(canvas).text((3, 3), label, fill="black")
    return canvas


def draw_prompt(image, prompt, xy, crop):
    """The image crop with the prompt drawn (scaled into tile coordinates after the crop)."""
    x0, y0, x1, y1 = crop
    t = tile(image, crop, f"{prompt} prompt")
    d = ImageDraw.Draw(t)
    s = TILE / (x1 - x0)
    if prompt == "box":
        bx0, by0, bx1, by1 = xy
        d.rectangle([(bx0 - x0) * s, HEADER + (by0 - y0) * s, (bx1 + 1 - x0) * s, HEADER + (by1 + 1 - y0) * s],
                    outline=(255, 40, 40), width=2)
    else:
        px, py = (xy[0] + 0.5 - x0) * s, HEADER + (xy[1] + 0.5 - y0) * s
        d.ellipse([px - 5, py - 5, px + 5, py + 5], fill=(255, 40, 40), outline="white", width=2)
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="samhq-tiny-shapes")
    p.add_argument("--size", type=int, default=64, help="synthetic image size (the held-out set's: 64)")
    p.add_argument("--num-images", type=int, default=250)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--kinds", default="wire,ring,comb,lattice,branch,holes")
    p.add_argument("--prompt", choices=["box", "point"], default="box")
    p.add_argument("--out", default="docs/demo_figure.png")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and not a.force:
        print(f"{out} already exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    data = SyntheticShapes(a.num_images, a.size, seed=a.seed)
    predictor = SamHQPredictor(SamHQModel.from_pretrained(a.model).eval())
    rows = []
    for i, j in find_objects(data, a.kinds.split(",")):
        item = data[i]
        gt = item["masks"][j]
        xy = box_prompt(gt) if a.prompt == "box" else point_prompt(gt)
        predictor.set_image(item["image"])
        pred = predict_tokens(predictor, a.prompt, xy[None])
        crop = crop_box(gt)
        tiles = [draw_prompt(item["image"], a.prompt, xy, crop),
                 tile(overlay(item["image"], gt, COLOURS["gt"]), crop, f"ground truth ({item['kinds'][j]})")]
        labels = []
        for key, name in (("sam", "SAM"), ("hq", "HQ")):
            m = pred[key][0]
            labels.append(f"{name} IoU {mask_iou(gt, m):.2f} BIoU {boundary_iou(gt, m):.2f}")
            tiles.append(tile(overlay(item["image"], m, COLOURS[key]), crop, labels[-1]))
        rows.append(tiles)
        print(f"image {i} object {j} ({item['kinds'][j]}): " + ", ".join(labels))
    if not rows:
        print("no object of the requested kinds in the dataset", file=sys.stderr)
        return 2
    cols = len(rows[0])
    fig = Image.new("RGB", (cols * TILE + (cols - 1) * GAP, len(rows) * (TILE + HEADER) + (len(rows) - 1) * GAP), "white")
    for r, tiles in enumerate(rows):
        for c, t in enumerate(tiles):
            fig.paste(t, (c * (TILE + GAP), r * (TILE + HEADER + GAP)))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.save(out, optimize=True)
    print(f"wrote {out} ({fig.width}x{fig.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
