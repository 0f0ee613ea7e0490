"""Do the fast modes give the fp32 masks? The demo model on the held-out synthetic set.

For every object of `SyntheticShapes(num_images, 64, seed=1000)` (the README's held-out set), one
box prompt (its tight box) and one point prompt (its deepest pixel), decoded by the fp32 eager
predictor and by each mode: bf16 (`from_pretrained(..., dtype=torch.bfloat16)`), int8 and the
onnxruntime engine. Both the default output (best SAM mask + HQ mask) and the HQ mask alone are
compared, as thresholded masks at the original size: per-mask IoU (two empty masks agree).

The performance issue's goal for a fast mode: mean IoU >= 0.99, and at least 95% of the masks larger
than 1% of the image (by the fp32 mask's area) at IoU >= 0.98 (`meets_target`). `meets_floor` is the
stricter check that every mask is at IoU >= 0.98.

    python benchmarks/agreement.py                  # all 250 images; writes benchmarks/agreement.json
    python benchmarks/agreement.py --num-images 20 --modes onnxruntime
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from run import mask_ious  # noqa: E402

from samhq import SamHQModel  # noqa: E402
from samhq.data.synthetic import SyntheticShapes  # noqa: E402
from samhq.eval.evaluate import box_prompt, point_prompt  # noqa: E402
from samhq.fast import quantize_int8  # noqa: E402
from samhq.predictor import SamHQPredictor  # noqa: E402

MODES = ("bf16", "int8", "onnxruntime")
FLOOR = 0.98
MEAN_TARGET, LARGE_SHARE, LARGE_AREA = 0.99, 0.95, 0.01  # issue 17: mean IoU; share at FLOOR of masks over 1% of the image


def predictor(mode: str, model_name: str, tmp: Path):
    if mode == "fp32":
        return SamHQPredictor(SamHQModel.from_pretrained(model_name))
    if mode == "bf16":
        return SamHQPredictor(SamHQModel.from_pretrained(model_name, dtype=torch.bfloat16))
    if mode == "int8":
        return SamHQPredictor(quantize_int8(SamHQModel.from_pretrained(model_name)))
    if mode == "onnxruntime":
        from samhq.predictor import OnnxPredictor

        return OnnxPredictor.from_model(SamHQModel.from_pretrained(model_name), tmp / "onnx")
    raise ValueError(f"unknown mode {mode!r}; known: fp32, {', '.join(MODES)}")


def masks_of(p, image: np.ndarray, gts: list[np.ndarray]) -> np.ndarray:
    """(objects, 2 prompts, 2 outputs, H, W) bool: box / point x default / HQ-only."""
    p.set_image(image)
    out = []
    for gt in gts:
        per = []
        for prompt in ({"box": box_prompt(gt)}, {"point_coords": point_prompt(gt)[None], "point_labels": np.array([1])}):
            per.append([p.predict(**prompt, multimask_output=False, hq_token_only=hq)[0][0] for hq in (False, True)])
        out.append(per)
    return np.asarray(out, dtype=bool)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="samhq-tiny-shapes")
    ap.add_argument("--num-images", type=int, default=250)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "agreement.json"))
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        ap.error(f"--modes takes a comma-separated list of {', '.join(MODES)}; got {args.modes!r}")
    if args.num_images < 1:
        ap.error(f"--num-images must be at least 1, got {args.num_images}")
    data = SyntheticShapes(args.num_images, 64, seed=1000)
    report = {"model": args.model, "dataset": f"synthetic:{args.num_images}:64:1000", "floor": FLOOR,
              "target": {"mean_iou": MEAN_TARGET, "large_share_at_floor": LARGE_SHARE, "large_area": LARGE_AREA}, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        preds = {m: predictor(m, args.model, Path(tmp)) for m in ["fp32", *modes]}
        scores, diffs, areas = {m: [] for m in modes}, {m: [] for m in modes}, []
        t0 = time.perf_counter()
        for i in range(len(data)):
            item = data[i]
            ref = masks_of(preds["fp32"], item["image"], item["masks"])
            areas.append(ref.reshape(len(ref), 4, -1).mean(-1))  # fraction of the image, per fp32 mask
            for m in modes:
                got = masks_of(preds[m], item["image"], item["masks"]).reshape(-1, *ref.shape[-2:])
                scores[m].append(mask_ious(got, ref.reshape(got.shape)).reshape(-1, 4))
                diffs[m].append((got != ref.reshape(got.shape)).reshape(len(got), -1).sum(1).reshape(-1, 4))
        large = np.concatenate(areas) > LARGE_AREA
        for m in modes:
            s = np.concatenate(scores[m])  # (objects, 4): box default, box HQ, point default, point HQ
            d = np.concatenate(diffs[m])
            share = float((s[large] >= FLOOR).mean()) if large.any() else 1.0
            report["modes"][m] = {
                "masks": int(s.size), "min_iou": float(s.min()), "mean_iou": float(s.mean()),
                "below_floor": int((s < FLOOR).sum()), "meets_floor": bool(s.min() >= FLOOR),
                "max_pixels_differing": int(d.max()),
                "median_pixels_differing_below_floor": float(np.median(d[s < FLOOR])) if (s < FLOOR).any() else 0.0,
                "large_masks": int(large.sum()), "large_share_at_floor": share,
                "meets_target": bool(s.mean() >= MEAN_TARGET and share >= LARGE_SHARE),
            }
            r = report["modes"][m]
            print(f"{m:12s} {r['masks']} masks  min IoU {r['min_iou']:.4f}  mean {r['mean_iou']:.4f}  "
                  f"below {FLOOR}: {r['below_floor']} (median {r['median_pixels_differing_below_floor']:g} pixels differ; "
                  f"at most {r['max_pixels_differing']}); masks over 1% of the image at IoU >= {FLOOR}: "
                  f"{share:.1%} of {r['large_masks']}; target {'met' if r['meets_target'] else 'not met'}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
