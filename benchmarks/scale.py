"""Scale benchmarks: Ray throughput against a plain loop, and tiled against downsized masks on thin structures.

    python benchmarks/scale.py                      # both parts, the demo model; writes benchmarks/scale.json
    python benchmarks/scale.py --part tiles --grid 8

1. Throughput (`--part ray`): automatic masks (points_per_side 16) for N synthetic images, as images
   per second: a plain loop in this process (`SamHQBatchPredictor.one`, one torch thread), then
   `samhq.distributed.run_ray` with 1 and 2 workers of one thread each on a local Ray. Ray's rate is
   given end to end (start-up included) and steady (first to last result). The records must equal
   the plain loop's (checked).
2. Thin structures (`--part tiles`): a mosaic of GRID x GRID held-out synthetic images (64 px, the
   demo model's training scale, each upscaled 4x as the model saw them in training), so the mosaic is
   GRID*256 px square. Every object is prompted with its tight box, (a) downsized: `SamHQPredictor`
   on the whole mosaic (what SAM does: long side to 256), (b) tiled: `TiledPredictor` with 256-px
   tiles, with each refinement mode, (c) each object on its own 256-px sub-image (the ideal tiling,
   aligned with the mosaic: what the demo model does at its own scale). Scores: mIoU and boundary
   IoU (band 0.02 x the diagonal of the object's own 256-px sub-image), per kind.

Numbers drift between runs on a shared machine; the machine line says where they were measured.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from samhq import SamHQModel, SamHQPredictor  # noqa: E402
from samhq.data.synthetic import SyntheticShapes  # noqa: E402
from samhq.eval.metrics import boundary_iou  # noqa: E402
from samhq.tiles import TiledPredictor  # noqa: E402

MODEL = "samhq-tiny-shapes"


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("CPU(s):"):
                info["cpus"] = int(line.split(":", 1)[1])
            if line.startswith("Flags:"):
                flags = line.split(":", 1)[1].split()
                info["avx512_bf16"] = "avx512_bf16" in flags
                info["amx"] = any(f.startswith("amx") for f in flags)
                info["avx2"] = "avx2" in flags
    except OSError:
        pass
    try:
        info["load_average"] = [round(v, 2) for v in __import__("os").getloadavg()]
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------------------------
# 1. Ray throughput


def bench_ray(n_images: int, workers: list[int]) -> dict:
    from samhq.distributed import SamHQBatchPredictor, run_ray

    folder = Path(tempfile.mkdtemp(prefix="samhq-scale-"))
    data = SyntheticShapes(n_images, 64, seed=2000)
    items = []
    for i in range(n_images):
        Image.fromarray(data[i]["image"]).resize((256, 256), Image.BILINEAR).save(folder / f"{i:03d}.png")
        items.append((f"{i:03d}", str(folder / f"{i:03d}.png")))
    options = {"points_per_side": 16}
    threads = torch.get_num_threads()
    local = SamHQBatchPredictor(MODEL, generator_options=options, threads=1)
    local.one(*items[0])  # warm-up
    t = time.perf_counter()
    plain = {k: json.loads(local.one(k, p)["records"]) for k, p in items}
    plain_s = time.perf_counter() - t
    torch.set_num_threads(threads)
    out = {"images": n_images, "image_size": 256, "points_per_side": 16,
           "plain_loop": {"seconds": plain_s, "images_per_s": n_images / plain_s}}
    for n in workers:
        arrivals, got = [], {}

        def writer(key, result, arrivals=arrivals, got=got):
            arrivals.append(time.perf_counter())
            got[key] = result["records"]

        t = time.perf_counter()
        summary = run_ray(items, writer, num_workers=n, generator_options=options, threads=1)
        total = time.perf_counter() - t
        same = got == plain
        steady = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else float("nan")
        out[f"ray_{n}_workers"] = {"seconds": total, "images_per_s": n_images / total, "steady_images_per_s": steady,
                                   "records_equal_plain_loop": same, "lost": len(summary.lost)}
        print(f"ray {n} worker(s): {total:.1f} s end to end, {steady:.2f} images/s steady, records equal: {same}", flush=True)
    print(f"plain loop: {plain_s:.1f} s, {n_images / plain_s:.2f} images/s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# 2. Tiled vs downsized on thin structures


def mosaic(grid: int, seed: int = 1000):
    """GRID x GRID held-out 64-px synthetic images, each upscaled 4x: (image, [(mask, kind, cell box)])."""
    data = SyntheticShapes(grid * grid, 64, seed=seed)
    size = 256 * grid
    image = np.zeros((size, size, 3), np.uint8)
    objects = []
    for i in range(grid * grid):
        item = data[i]
        y0, x0 = 256 * (i // grid), 256 * (i % grid)
        image[y0:y0 + 256, x0:x0 + 256] = np.asarray(Image.fromarray(item["image"]).resize((256, 256), Image.BILINEAR))
        for m, kind in zip(item["masks"], item["kinds"]):
            full = np.zeros((size, size), bool)
            full[y0:y0 + 256, x0:x0 + 256] = np.asarray(Image.fromarray(m).resize((256, 256), Image.NEAREST))
            objects.append((full, kind, (x0, y0, x0 + 256, y0 + 256)))
    return image, objects


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def score(pred, gt, cell) -> tuple[float, float]:
    x0, y0, x1, y1 = cell
    p, g = pred[y0:y1, x0:x1], gt[y0:y1, x0:x1]
    outside = pred.sum() - p.sum()  # a mask spilling out of its sub-image counts against IoU
    iou = (p & g).sum() / max(1, (p | g).sum() + outside)
    return float(iou), float(boundary_iou(g, p))


def bench_tiles(grid: int) -> dict:
    model = SamHQModel.from_pretrained(MODEL).eval()
    image, objects = mosaic(grid)
    boxes = np.stack([tight_box(m) for m, _, _ in objects])
    results = {}
    plain = SamHQPredictor(model)
    t = time.perf_counter()
    plain.set_image(image)
    masks = [plain.predict(box=b, multimask_output=False)[0][0] for b in boxes]
    results["downsized"] = (time.perf_counter() - t, masks, 1)
    # the ideal tiling: each object on its own 256-px sub-image (tiles aligned with the mosaic, no neighbours)
    t = time.perf_counter()
    masks, current = [], None
    for (g, _, cell), b in zip(objects, boxes):
        x0, y0, x1, y1 = cell
        if cell != current:
            plain.set_image(image[y0:y1, x0:x1])
            current = cell
        m = np.zeros(g.shape, bool)
        m[y0:y1, x0:x1] = plain.predict(box=b - [x0, y0, x0, y0], multimask_output=False)[0][0]
        masks.append(m)
    results["each sub-image alone"] = (time.perf_counter() - t, masks, grid * grid)
    for refine in ("box+mask", "box", None):
        tp = TiledPredictor(model, refine=refine)
        tp.set_image(image)
        t = time.perf_counter()
        regions = tp.predict_regions(boxes=boxes, multimask_output=False)
        h, w = image.shape[:2]
        masks = [r.to_full(h, w) for r in regions]
        results[f"tiled (refine={refine})"] = (time.perf_counter() - t, masks, tp.encoder_calls,
                                               sum(r.window.level > 0 for r in regions))
    out = {"grid": grid, "image_size": 256 * grid, "objects": len(objects), "modes": {}}
    for name, (seconds, masks, embeds, *coarse) in results.items():
        ious, bious = zip(*[score(m, g, cell) for m, (g, _, cell) in zip(masks, objects)])
        by_kind = {}
        for (_, kind, _), i, b in zip(objects, ious, bious):
            by_kind.setdefault(kind, []).append((i, b))
        out["modes"][name] = {
            "mIoU": float(np.mean(ious)), "mBIoU": float(np.mean(bious)), "seconds": seconds, "encoder_runs": embeds,
            "objects_on_coarse_levels": coarse[0] if coarse else None,
            "by_kind": {k: {"mIoU": float(np.mean([v[0] for v in vs])), "mBIoU": float(np.mean([v[1] for v in vs])),
                            "n": len(vs)} for k, vs in sorted(by_kind.items())},
        }
        print(f"{name:24s} mIoU {np.mean(ious):.3f}  mBIoU {np.mean(bious):.3f}  {seconds:.1f} s, {embeds} encoder runs",
              flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["ray", "tiles", "both"], default="both")
    p.add_argument("--images", type=int, default=16, help="images for the Ray part (default 16)")
    p.add_argument("--grid", type=int, nargs="+", default=[4, 8], help="mosaic sizes for the tiles part (default 4 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process (default 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "scale.json"))
    args = p.parse_args(argv)
    if args.images < 2 or min(args.grid) < 2:
        p.error("--images and --grid must be at least 2")
    torch.set_num_threads(args.threads)
    result = {"machine": machine()}
    print(json.dumps(result["machine"]), flush=True)
    if args.part in ("tiles", "both"):
        result["tiles"] = [bench_tiles(g) for g in args.grid]
    if args.part in ("ray", "both"):
        result["ray"] = bench_ray(args.images, [1, 2])
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
