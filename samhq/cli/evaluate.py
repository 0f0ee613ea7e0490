"""`samhq evaluate [SRC] DATASET`: mIoU and mBIoU of a model's HQ and SAM-token outputs on a dataset; J&F of a SAM 2
video model on a DAVIS-style video dataset (`samhq.eval.davis`); `samhq evaluate --coco-ap GT.json RESULTS.json`:
COCO mask AP of results (e.g. from `samhq segment --prompts`)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ._common import DEMO_MODEL, add_image_args, add_model_arg, new_command, refuse_overwrite

DATASET_HELP = """\
DATASET is one of:
  DIR                 a folder with im/ and gt/ sub-folders (DIS5K layout: im/x.jpg + gt/x.png)
  DIR --masks MDIR    images in DIR, masks of the same name in MDIR (may be DIR itself: x.jpg + x.png)
  FILE.json           COCO instance annotations; images from --images (default: the JSON's folder)
  synthetic:N[:SIZE[:SEED]]   N synthetic fine-structure images, SIZE px square (default 256), SEED (default 0)
  DAVIS_DIR           a video dataset with JPEGImages/ and Annotations/ (DAVIS 2016/2017 layout): a SAM 2 video
                      model tracks each sequence from its first-frame masks; J, F and J&F as the DAVIS benchmark

With --coco-ap GT.json RESULTS.json no model or dataset is given: the COCO results (masks as RLE,
with scores) are scored against the COCO ground truth with pycocotools' COCOeval (AP, AP50, AP75,
APs, APm, APl): the paper's COCO protocol when RESULTS come from a detector's boxes, the "oracle
box" AP when they come from the ground truth's own boxes.
"""


def register(sub) -> None:
    p = new_command(sub, "evaluate", "Score a model's HQ and SAM-token masks (mIoU, boundary mIoU) on a dataset.",
                    "samhq evaluate synthetic:250:256:1000 --prompt both --json results.json")
    p.description += "\n\n" + DATASET_HELP
    p.add_argument("src", nargs="?", metavar="SRC", help="the model (or --model): official .pth, transformers-layout folder, "
                   ".safetensors file, hub id or bundled name")
    p.add_argument("dataset", nargs="?", metavar="DATASET", help="the dataset, see above")
    p.add_argument("--coco-ap", nargs=2, metavar=("GT.json", "RESULTS.json"),
                   help="COCO AP of a results file against a COCO ground truth (no model or dataset)")
    p.add_argument("--iou-type", choices=["segm", "bbox"], default="segm",
                   help="with --coco-ap: mask AP (segm, default) or box AP of the results' bbox fields")
    add_model_arg(p, low_memory=True)
    for action in p._actions:  # a positional SRC may stand in for --model
        if action.dest == "model":
            action.required = False
    p.add_argument("--prompt", choices=["box", "point", "both"], default="box",
                   help="box: the mask's tight box; point: its deepest interior pixel; both (default: box)")
    p.add_argument("--sam-output", choices=["single", "best"], default="single",
                   help="SAM token to score: single (token 0, as SAM-HQ's evaluation) or best of the 3 multimask "
                        "tokens by predicted IoU (default: single)")
    p.add_argument("--masks", metavar="DIR", help="mask folder for an image folder DATASET")
    p.add_argument("--images", metavar="DIR", help="image folder for a COCO JSON DATASET")
    p.add_argument("--max-images", type=int, metavar="N", help="evaluate only the first N images")
    p.add_argument("--dilation-ratio", type=float, default=0.02,
                   help="boundary band width as a fraction of the image diagonal (default: 0.02)")
    p.add_argument("--json", metavar="PATH", help="write the summary and per-object scores as JSON")
    p.add_argument("--summary-only", action="store_true", help="--json holds only the means (overall and per kind)")
    p.add_argument("--csv", metavar="PATH", help="write per-object scores as CSV")
    p.add_argument("--force", action="store_true", help="overwrite existing --json / --csv files")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--sequences", metavar="A,B,...", help="DAVIS: evaluate only these sequences")
    p.add_argument("--results", metavar="DIR", help="DAVIS: also write the predicted label maps (DIR/SEQ/FRAME.png)")
    add_image_args(p, bit_depth=False)  # --max-pixels for the dataset's images
    p.set_defaults(func=run)


def open_dataset(spec: str, masks=None, images=None):
    """A dataset from the command line's DATASET (see DATASET_HELP)."""
    m = re.fullmatch(r"synthetic:(\d+)(?::(\d+))?(?::(\d+))?", spec)
    if m:
        from ..data.synthetic import SyntheticShapes

        n, size, seed = int(m[1]), int(m[2] or 256), int(m[3] or 0)
        if n < 1 or size < 16:
            raise ValueError(f"synthetic dataset needs N >= 1 images of SIZE >= 16 px, got {spec}")
        return SyntheticShapes(n, (size, size), seed=seed)
    if spec.startswith("synthetic"):
        raise ValueError(f"bad synthetic dataset {spec!r}: write synthetic:N[:SIZE[:SEED]], e.g. synthetic:100:256:0")
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"dataset not found: {spec} (a folder, a COCO .json file, or synthetic:N[:SIZE[:SEED]])")
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ValueError(f"{spec}: a dataset file must be COCO instance JSON (.json)")
        from ..data.datasets import CocoInstances

        return CocoInstances(path, image_dir=images)
    from ..data.datasets import MaskFolder

    return MaskFolder(path, masks=masks)


def weights_digest(model) -> str:
    """First 16 hex digits of a SHA-256 over every weight, so a results file names the exact weights."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_coco_ap(args) -> int:
    from ..eval.coco_ap import coco_ap, format_ap

    if args.src is not None or args.dataset is not None:
        raise ValueError("--coco-ap scores a results file: give no model or dataset "
                         "(samhq evaluate --coco-ap GT.json RESULTS.json)")
    refuse_overwrite([args.json, args.csv], args.force)
    if args.csv:
        raise ValueError("--csv is for per-object scores of a model on a dataset; with --coco-ap use --json")
    gt, results = args.coco_ap
    result = coco_ap(gt, results, iou_type=args.iou_type)
    print(f"COCO {'mask' if args.iou_type == 'segm' else 'box'} AP of {results} against {gt} (pycocotools COCOeval, %):")
    print(format_ap(result))
    if args.json:
        Path(args.json).write_text(json.dumps({"ground_truth": gt, "results": results, "iou_type": args.iou_type, **result},
                                              indent=2))
        print(f"wrote {args.json}")
    return 0


def run(args) -> int:
    from ..eval.evaluate import evaluate
    from ..pipelines import load_for_inference

    if args.coco_ap:
        return run_coco_ap(args)
    if args.dataset is None:
        if args.src is None:
            raise ValueError("give a DATASET (samhq evaluate [SRC] DATASET), or --coco-ap GT.json RESULTS.json")
        args.src, args.dataset = None, args.src  # `samhq evaluate DATASET` with the default --model

    if args.src is not None and args.model not in (None, DEMO_MODEL) and args.model != args.src:
        raise ValueError(f"two models given ({args.src} and --model {args.model}); give one")
    model_src, spec = args.src or args.model, args.dataset
    if model_src is None:
        raise ValueError("no model given: samhq evaluate SRC DATASET, or --model SRC")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be at least 1, got {args.max_images}")
    refuse_overwrite([args.json, args.csv], args.force)
    from ..eval.davis import is_davis_folder

    if is_davis_folder(spec):
        return run_davis(args, model_src)
    dataset = open_dataset(spec, args.masks, args.images)
    if len(dataset) == 0:
        skipped = getattr(dataset, "skipped", [])
        why = f"; {len(skipped)} skipped, first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise ValueError(f"dataset {spec} has no usable images{why}")
    model = load_for_inference(model_src, args.device, args.dtype, low_memory=args.low_memory)
    result = evaluate(model, dataset, prompt=args.prompt, sam_output=args.sam_output, max_images=args.max_images,
                      dilation_ratio=args.dilation_ratio, progress=not args.quiet and sys.stderr.isatty())
    result.settings.update(model=str(model_src), weights_sha256=weights_digest(model), dataset=spec)
    print(f"{model_src} on {spec}: {result.images} images, "
          f"{len({(r['index'], r['object']) for r in result.records})} objects")
    print(result.table())
    if result.skipped:
        name, reason = result.skipped[0]
        print(f"skipped {len(result.skipped)} unreadable files or annotations (first: {name}: {reason})")
    if args.json:
        print(f"wrote {result.save_json(args.json, per_object=not args.summary_only, overwrite=True)}")
    if args.csv:
        print(f"wrote {result.save_csv(args.csv, overwrite=True)}")
    return 0


def run_davis(args, model_src) -> int:
    """J&F of a SAM 2 video model on a DAVIS-style folder (semi-supervised: first-frame masks as prompts)."""
    from ..dtypes import resolve_dtype
    from ..eval.davis import evaluate_davis
    from ..video import SamHQ2VideoPredictor

    if args.results:
        refuse_overwrite([args.results], args.force)
    sequences = [s for s in args.sequences.split(",") if s] if args.sequences else None
    predictor = SamHQ2VideoPredictor.from_pretrained(model_src, device=args.device, dtype=resolve_dtype(args.dtype, args.device))
    result = evaluate_davis(predictor, args.dataset, sequences, progress=not args.quiet and sys.stderr.isatty(),
                            results_dir=args.results)
    result.settings.update(model=str(model_src), weights_sha256=weights_digest(predictor.model))
    print(f"{model_src} on {args.dataset}:")
    print(result.table())
    if args.json:
        print(f"wrote {result.save_json(args.json, overwrite=True)}")
    if args.csv:
        print(f"wrote {result.save_csv(args.csv, overwrite=True)}")
    return 0
