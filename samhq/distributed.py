"""Many images on many machines with Ray Data: automatic masks or masks for file prompts, records back to one writer.

Ray Data's batch-inference pattern: a dataset of image rows, `map_batches` over a pool of actors,
each loading the model once in `__init__`. `SamHQBatchPredictor` is that callable class, for users
building their own pipelines:

    import ray
    from samhq.distributed import SamHQBatchPredictor
    ds = ray.data.from_items([{"key": "a", "path": "/data/a.jpg"}, ...])
    ds = ds.map_batches(SamHQBatchPredictor, fn_constructor_kwargs={"model": "sam_hq_vit_b.pth"},
                        batch_size=1, concurrency=4, num_gpus=1)
    for row in ds.iter_rows(): ...   # key, ok, error, height, width, records (a JSON list)

`run_ray` runs a whole job that way and hands every finished image to a `writer` callback on the
driver, so only the driver writes outputs (an output lock held by the caller still means something,
and the workers need no shared disk for outputs). Images already done (`done(key)` is true) are not
sent; a worker that dies is restarted and its batch retried (Ray's actor restarts and task
retries); a result arriving twice is written once; an image that cannot be read is reported to
`on_error` and skipped. The workers read images by path, so every node must see the input files
(a shared or synced folder); or give arrays.

Ray is the `ray` extra (pip install 'samhq[ray]'); nothing else in samhq imports it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

MODES = ("everything", "prompts")


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError("running on Ray needs Ray Data: pip install 'samhq[ray]'") from None
    return ray


def _everything_record(r: dict) -> dict:
    """A generator record made JSON-ready: COCO compressed RLE, plain floats."""
    from .masks import rle_to_coco

    seg = r["segmentation"]
    out = {k: v for k, v in r.items() if k != "segmentation"}
    out["segmentation"] = rle_to_coco(seg) if isinstance(seg.get("counts"), list) else seg
    return out


class SamHQBatchPredictor:
    """A callable class for `ray.data.Dataset.map_batches`: image batches in, per-image records out.

    model: a checkpoint source (path, bundled name, hub id; every node must be able to load it) or a
    `SamHQModel`; mode: "everything" (automatic masks, `SamHQAutomaticMaskGenerator` with
    `generator_options`) or "prompts" (masks for each row's prompts, `samhq.prompt_files.segment_prompts`
    with `prompt_options`); tiles: None, or `{"tile_size": ..., "overlap": ...}` to segment each image
    in tiles (`samhq.tiles`); threads: torch's thread count in this worker, set explicitly so that
    workers compute exactly what a local run with the same count does; device ("cpu", "cuda") and
    dtype (the image encoder's precision: None / "float32" (default), "auto", "bfloat16", ...) as
    `samhq.pipelines.load_for_inference`
    takes them, so a worker loads the model exactly as a local run does; hq_token_only for everything mode
    (prompt mode takes it in prompt_options); bit_depth and limits (a dict of `samhq.limits.Limits`
    fields, e.g. {"max_pixels": N}) for reading images as a local run with the same options does (with
    tiles an image may have up to `max_tiled_pixels`).

    A batch is a dict of columns: "key" (str, the image's name in the output), and "path" (str) or
    "image" ((H, W, 3) uint8 arrays); in "prompts" mode also "image_id" (a number, or JSON text of a
    number, a string or null; null: the key is used) and "prompts" (a JSON list of prompt dicts as
    `samhq.prompt_files.parse_prompt` reads them: {"box": [x0, y0, x1, y1]} and/or {"points": [...],
    "labels": [...]}, with "score", "category_id", "id"). The result has one row per image: key, ok
    (bool), error (str, "" when ok), height, width, and records: a JSON list of the records
    (automatic-mask records with COCO RLE segmentations, or COCO results records).
    An image that cannot be read or segmented gives ok=False and the error (the worker goes on); a
    worker process that dies is restarted by Ray and its batch retried.
    """

    def __init__(self, model="samhq-tiny-shapes", mode: str = "everything", generator_options: dict | None = None,
                 prompt_options: dict | None = None, tiles: dict | None = None, threads: int = 1, device: str | None = None,
                 dtype=None, hq_token_only: bool = False, bit_depth: str = "dtype", limits: dict | None = None) -> None:
        import torch

        from .limits import get_limits, tiled_limits
        from .pipelines import load_for_inference

        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        self.mode, self.prompt_options = mode, dict(prompt_options or {})
        self.hq_token_only, self.bit_depth = bool(hq_token_only), bit_depth
        self.limits = get_limits().replace(**(limits or {}))
        self.tiled = bool(tiles)
        if tiles:
            self.limits = tiled_limits(self.limits)
        self.model = load_for_inference(model, device, dtype)
        if mode == "everything":
            options = dict(generator_options or {}, output_mode="uncompressed_rle")
            if tiles:
                from .tiles import TiledMaskGenerator

                self.engine = TiledMaskGenerator(self.model, **tiles, **options)
            else:
                from .automatic import SamHQAutomaticMaskGenerator

                self.engine = SamHQAutomaticMaskGenerator(self.model, **options)
        else:
            if tiles:
                from .tiles import TiledPredictor

                self.engine = TiledPredictor(self.model, **tiles)
            else:
                from .predictor import SamHQPredictor

                self.engine = SamHQPredictor(self.model)

    def one(self, key: str, image, image_id=None, prompts: str | list | None = None) -> dict:
        """One image (a path or an array) -> one result row (see the class docstring)."""
        from .image_io import to_rgb_array
        from .limits import LimitError, as_tiled_error

        try:
            try:
                rgb = to_rgb_array(image, bit_depth=self.bit_depth, limits=self.limits)
            except LimitError as e:
                raise as_tiled_error(e) if self.tiled else e from None
            if self.mode == "everything":
                records = [_everything_record(r) for r in self.engine.generate(rgb, hq_token_only=self.hq_token_only)]
            else:
                from .prompt_files import parse_prompt, segment_prompts

                items = json.loads(prompts) if isinstance(prompts, str) else (prompts or [])
                parsed = [parse_prompt(p, f"{key}[{j}]") for j, p in enumerate(items)]
                records = segment_prompts(self.engine, rgb, parsed, image_id if image_id is not None else key,
                                          **self.prompt_options)
        except Exception as e:  # noqa: BLE001 - one image's failure is reported, the worker goes on
            message = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
            return {"key": key, "ok": False, "error": message, "height": 0, "width": 0, "records": "[]"}
        return {"key": key, "ok": True, "error": "", "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
                "records": json.dumps(records)}

    def __call__(self, batch: dict) -> dict:
        keys = [str(k) for k in batch["key"]]
        images = batch["image"] if "image" in batch else [str(p) for p in batch["path"]]
        ids = [_image_id(i) for i in batch.get("image_id", [None] * len(keys))]
        prompts = batch.get("prompts", [None] * len(keys))
        rows = [self.one(k, im, i, None if p is None else str(p)) for k, im, i, p in zip(keys, images, ids, prompts)]
        return {name: [r[name] for r in rows] for name in ("key", "ok", "error", "height", "width", "records")}


def _image_id(v):
    """An image_id column value: JSON text (what run_ray sends: an int, a str or null) or a plain number."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (str, bytes)):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v.decode() if isinstance(v, bytes) else v
    return v


@dataclass
class RayRunSummary:
    """What `run_ray` did: keys written, skipped (already done), failed (key, error), lost (never came back)."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    duplicates: int = 0
    seconds: float = 0.0


def run_ray(images, writer: Callable[[str, dict], None], *, done: Callable[[str], bool] | None = None,
            on_error: Callable[[str, str], None] | None = None, mode: str = "everything", model="samhq-tiny-shapes",
            prompts: dict | None = None, generator_options: dict | None = None, prompt_options: dict | None = None,
            tiles: dict | None = None, num_workers: int = 1, gpus_per_worker: float = 0, cpus_per_worker: float = 1,
            threads: int = 1, address: str | None = None, batch_size: int = 1, progress: bool = False,
            predictor_cls: type = SamHQBatchPredictor, device: str | None = None, dtype=None,
            hq_token_only: bool = False, bit_depth: str = "dtype", limits: dict | None = None) -> RayRunSummary:
    """Run a whole job as a Ray Data pipeline; the driver alone writes, through `writer`.

    images: (key, path) pairs (key: the image's output name, unique) or (key, (H, W, 3) array) pairs.
    writer(key, result): called on the driver once per finished image, as results arrive; result is
        {"height", "width", "records": [...]} (see `SamHQBatchPredictor`). It must write atomically
        (the CLI's temporary-file-and-rename does) so a killed driver leaves nothing half-written.
    done(key): true for images already written, which are not sent (resuming a run).
    on_error(key, message): called for images that could not be read or segmented (default: ignored;
        they are in the summary's `failed`).
    mode, model, generator_options, prompt_options, tiles, dtype, hq_token_only, bit_depth, limits: as
        `SamHQBatchPredictor`; in "prompts" mode prompts maps each key to (image_id, [prompt dicts]).
        device: the workers' torch device (default "cuda" with gpus_per_worker, else the CPU).
    num_workers actors with gpus_per_worker GPUs and cpus_per_worker CPUs each, threads torch threads
        each (the same count as a local run gives the same masks). address: None starts a local Ray
        (shut down at the end); "auto" or HOST:PORT joins a running cluster (`ray start --head`).
    batch_size images per call; progress: Ray Data's progress bars and worker logs; predictor_cls: a
    subclass of `SamHQBatchPredictor` to run instead (extra pre- or post-processing).
    A worker that dies is restarted and its batch retried (Ray Data's defaults for actor pools:
    unlimited restarts and retries), so an image whose decoding kills the process would be retried
    for ever; one that raises is reported and skipped. Returns a `RayRunSummary`; `lost` lists images
    that never came back (none unless Ray gave up).
    """
    ray = _ray()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if num_workers < 1 or batch_size < 1 or threads < 1:
        raise ValueError("num_workers, batch_size and threads must be at least 1")
    if mode == "prompts" and prompts is None:
        raise ValueError("mode='prompts' needs prompts: {key: (image_id, [prompt dicts])}")
    start = time.time()
    summary = RayRunSummary()
    images = list(images)
    if len({isinstance(im, np.ndarray) for _, im in images}) > 1:
        raise ValueError("give all images as paths or all as arrays, not a mix")
    rows, seen = [], set()
    for key, image in images:
        key = str(key)
        if key in seen:
            raise ValueError(f"two images share the output name {key!r}; names must be unique")
        seen.add(key)
        if done is not None and done(key):
            summary.skipped.append(key)
            continue
        row = {"key": key}
        if isinstance(image, np.ndarray):
            row["image"] = image
        else:
            row["path"] = str(image)
        if mode == "prompts":
            image_id, items = prompts.get(key, (None, []))
            row["image_id"] = json.dumps(image_id)
            row["prompts"] = json.dumps(items)
        rows.append(row)
    if not rows:
        summary.seconds = time.time() - start
        return summary
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=progress)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(
            predictor_cls, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=num_workers),
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None,
            fn_constructor_kwargs=dict(model=model, mode=mode, generator_options=generator_options,
                                       prompt_options=prompt_options, tiles=tiles, threads=threads,
                                       device=device or ("cuda" if gpus_per_worker else None), dtype=dtype,
                                       hq_token_only=hq_token_only, bit_depth=bit_depth, limits=limits),
        )
        written = set()
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
            for key, ok, error, h, w, records in zip(batch["key"], batch["ok"], batch["error"], batch["height"],
                                                     batch["width"], batch["records"]):
                key = str(key)
                if key in written:
                    summary.duplicates += 1
                    continue
                written.add(key)
                if bool(ok):
                    writer(key, {"height": int(h), "width": int(w), "records": json.loads(str(records))})
                    summary.written.append(key)
                else:
                    summary.failed.append((key, str(error)))
                    if on_error is not None:
                        on_error(key, str(error))
        summary.lost = [r["key"] for r in rows if r["key"] not in written]
    finally:
        if started:
            ray.shutdown()
    summary.seconds = time.time() - start
    return summary
