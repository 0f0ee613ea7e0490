"""What one input may cost, checked before the expensive work, and how many CPU threads to use.

| limit               | default                     | Python                                 | command line                     |
|---------------------|-----------------------------|----------------------------------------|----------------------------------|
| `max_pixels`        | 64,000,000 (64 MP)          | `samhq.limits.configure(max_pixels=N)` | `--max-pixels N`                 |
| `max_prompts`       | 256 points + boxes per call | `configure(max_prompts=N)`             | `--max-prompts N`                |
| `max_upload_bytes`  | 100 MiB per upload          | `create_app(limits=Limits(...))`       | `samhq serve --max-upload-mb N`  |
| `max_request_bytes` | 1 MiB per JSON request      | `create_app(limits=Limits(...))`       | `samhq serve --max-request-kb N` |
| `max_config_value`  | 16384                       | `configure(max_config_value=N)`        | -                                |
| `max_tiled_pixels`  | 4,000,000,000               | `configure(max_tiled_pixels=N)`        | `--max-tiled-pixels N`           |

Command line: `--max-pixels N` in segment, everything, serve, evaluate and train; `--max-prompts N` in
segment and serve; `--max-tiled-pixels N` with --tiles.

- `max_pixels` (width x height of one image) is checked on the size an encoded file *declares*,
  before a pixel is decoded, so a 20 KB PNG that declares 30000x30000 pixels costs nothing. It
  also bounds arrays, tensors and PIL images. Huge images are the tiled mode's (`samhq.tiles`):
  the message says so (`image_too_large` is the one place it is made).
- `max_tiled_pixels` bounds an image the tiled mode decodes whole into memory (a path or bytes it
  cannot read in windows, or an array); `samhq.geo.RasterSource` reads TIFFs window by window and
  needs no such bound.
- `max_prompts` bounds the points plus boxes of one request or one predictor call: every point
  is a token the decoder attends over, every box a full-size mask.
- `max_upload_bytes` and `max_request_bytes` bound request bodies of `samhq serve`: the body is
  read as it streams and refused (HTTP 413) as soon as it passes the limit.
- `max_config_value` bounds every integer in a checkpoint's `config.json` (layers, widths, image
  size) that its tensors cannot confirm (see `samhq.checkpoints.validate_checkpoint`).

The process-wide limits are `get_limits()`; `configure(**changes)` replaces them (the command line
does so from its options). Over a limit, `LimitError` (a `ValueError`) says what was too large, the
limit, and how to raise it.

Threads: `available_cpus()` is what this process may really use: the CPUs of its affinity mask,
capped by a cgroup (v2 `cpu.max`, v1 `cpu.cfs_quota_us`) CPU quota, as containers and shared
servers set. `set_threads(n)` sets torch's thread count to `n`, or by default to `OMP_NUM_THREADS`
when set (torchrun sets it per process) and else to `available_cpus()`.

Memory: importing samhq calls `tune_malloc()`, which makes glibc reuse freed large blocks instead of
page-faulting fresh ones (`SAMHQ_MALLOC_TUNING=0` turns it off); `glibc_malloc()` restores glibc's behaviour
for a block of code (the ONNX engines run in one).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    """Explicit limits on inputs (see the module docstring for each one's meaning and option)."""

    max_pixels: int = 64_000_000
    max_prompts: int = 256
    max_upload_bytes: int = 100 * 2**20
    max_request_bytes: int = 2**20
    max_config_value: int = 16384
    max_tiled_pixels: int = 4_000_000_000

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {f.name} must be a positive integer, got {value!r}")

    def replace(self, **changes) -> "Limits":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            known = ", ".join(f.name for f in dataclasses.fields(self))
            raise TypeError(f"unknown limit(s) {', '.join(sorted(unknown))}; known: {known}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# How to raise each limit, named in every LimitError.
HOW_TO_RAISE = {
    "max_pixels": "--max-pixels N on the command line, or max_pixels=N in Python (samhq.limits.configure, "
                  "create_app(limits=...))",
    "max_prompts": "--max-prompts N on the command line, or max_prompts=N in Python (samhq.limits.configure, "
                   "create_app(limits=...))",
    "max_upload_bytes": "samhq serve --max-upload-mb N, or create_app(limits=Limits(max_upload_bytes=N))",
    "max_request_bytes": "samhq serve --max-request-kb N, or create_app(limits=Limits(max_request_bytes=N))",
    "max_config_value": "samhq.limits.configure(max_config_value=N) in Python",
    "max_tiled_pixels": "--max-tiled-pixels N on the command line, samhq.limits.configure(max_tiled_pixels=N) in "
                        "Python, or read the image in windows (samhq.geo.RasterSource for TIFF and GeoTIFF)",
}

_current = Limits()


def get_limits() -> Limits:
    """The process-wide limits."""
    return _current


def configure(limits: Limits | None = None, **changes) -> Limits:
    """Replace the process-wide limits (with `limits`, or the current ones with `changes` applied); returns the previous."""
    global _current
    previous = _current
    _current = (limits or _current).replace(**changes)
    return previous


class LimitError(ValueError):
    """An input over one of the limits. `limit` is the field's name (e.g. "max_pixels"), `value` what was asked."""

    http_status = 413

    def __init__(self, message: str, limit: str, value: int, maximum: int):
        super().__init__(f"{message}; raise the limit with {HOW_TO_RAISE[limit]}")
        self.limit, self.value, self.maximum = limit, value, maximum


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} MP"


def image_too_large(width: int | None, height: int | None, maximum: int, pixels: int | None = None) -> LimitError:
    """The error for an image over `max_pixels` (width and height, or only its pixel count when that is
    all that is known). The one place this message is made: when tiled processing exists, this is
    where it should point to it."""
    if width is not None and height is not None:
        pixels, size = width * height, f"{width}x{height} pixels ({_mp(width * height)})"
    else:
        size = f"{_mp(pixels)}" if pixels else "larger than PIL's own limit"
    return LimitError(f"image is {size}, over the limit of {_mp(maximum)} (max_pixels) for whole-image segmentation; "
                      "segment it in tiles at its own resolution with --tiles (samhq segment, everything, serve; "
                      "samhq.tiles.TiledPredictor in Python)", "max_pixels", pixels or 0, maximum)


def tiled_limits(limits: Limits | None = None) -> Limits:
    """The limits for decoding an image whole in tiled mode: max_pixels raised to max_tiled_pixels."""
    limits = limits or _current
    return limits.replace(max_pixels=max(limits.max_pixels, limits.max_tiled_pixels))


def as_tiled_error(error: LimitError) -> LimitError:
    """A max_pixels error raised while decoding an image under `tiled_limits` as the max_tiled_pixels error it is."""
    if error.limit != "max_pixels":
        return error
    return LimitError(f"image is {_mp(error.value) if error.value else 'larger than PIL allows'}, over the limit of "
                      f"{_mp(error.maximum)} (max_tiled_pixels) for an image decoded whole in tiled mode",
                      "max_tiled_pixels", error.value, error.maximum)


def check_pixels(width: int, height: int, limits: Limits | None = None) -> None:
    """Raise `image_too_large` when width x height is over `max_pixels`."""
    maximum = (limits or _current).max_pixels
    if width * height > maximum:
        raise image_too_large(width, height, maximum)


def check_prompt_count(num_points: int, num_boxes: int = 0, limits: Limits | None = None) -> None:
    """Raise LimitError when one request's points plus boxes are over `max_prompts`."""
    maximum = (limits or _current).max_prompts
    if num_points + num_boxes > maximum:
        raise LimitError(f"{num_points} points and {num_boxes} boxes in one request, over the limit of {maximum} "
                         "prompts (max_prompts)", "max_prompts", num_points + num_boxes, maximum)


def check_body_size(num_bytes: int, maximum: int, limit: str) -> None:
    """Raise LimitError when a request body is over `maximum` bytes (limit: "max_upload_bytes" or "max_request_bytes")."""
    if num_bytes > maximum:
        raise LimitError(f"the request body is over the limit of {_bytes(maximum)} ({limit})", limit, num_bytes, maximum)


def _bytes(n: int) -> str:
    return f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n / 2**10:.3g} KiB"


# ---------------------------------------------------------------------------------------------
# CPU threads


def cgroup_cpu_quota(root: str | os.PathLike = "/sys/fs/cgroup", self_cgroup: str | os.PathLike = "/proc/self/cgroup"):
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when there is none.

    cgroup v2: `cpu.max` ("QUOTA PERIOD" or "max PERIOD") in the process's cgroup and each parent;
    cgroup v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none) of the `cpu` controller. The
    smallest quota on the way to the root wins, as the kernel enforces each.
    """
    root = Path(root)
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2 unified hierarchy
            for d in _up(root, path):
                q = _read_quota_v2(d / "cpu.max")
                if q is not None:
                    quotas.append(q)
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    for d in _up(mount, path):
                        q = _read_quota_v1(d)
                        if q is not None:
                            quotas.append(q)
                    break
    return min(quotas) if quotas else None


def _up(base: Path, path: str):
    """base/path and its parents up to base (a container may see only part of the host's path)."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    for n in range(len(parts), -1, -1):
        d = base.joinpath(*parts[:n])
        if d.is_dir():
            yield d


def _read_quota_v2(file: Path):
    try:
        quota, period = file.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _read_quota_v1(folder: Path):
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (rounded down, at least 1)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def default_threads() -> int:
    """`OMP_NUM_THREADS` when set to a positive integer, else `available_cpus()`."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return available_cpus()


def set_threads(threads: int | None = None) -> int:
    """Set torch's CPU thread count to `threads` (default: `default_threads()`); returns the count set."""
    import torch

    if threads is None:
        threads = default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)
    return threads


# glibc's mallopt parameters (malloc.h), the threshold samhq sets, and glibc's own largest dynamic one.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 1 << 30
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
malloc_tuned = False  # whether tune_malloc has set the thresholds in this process
_tuned_threshold = 0
_untuned_lock = threading.Lock()
_untuned_depth = 0


def tune_malloc(threshold: int = MALLOC_MMAP_THRESHOLD) -> bool:
    """Let glibc's malloc keep freed blocks below `threshold` bytes for reuse; True when it was set.

    glibc serves blocks above its mmap threshold (at most 32 MiB by default) with fresh mappings and
    gives them back on free, so every large activation an encoder allocates is page-faulted in again,
    page by page: 400,000 faults (1.6 GB) per ViT-B image embedding, 4% of its time, and 340,000 faults
    (1.3 s of system time) for 64 points of automatic masks. With both the mmap and the trim threshold
    at `threshold` and 2 x `threshold` (capped at 2 GiB; mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), freed blocks are
    reused; peak memory was unchanged (ViT-H embedding: 3.25 GB against 3.31 GB), but the process keeps
    its high-water mark instead of returning it to the system between images. onnxruntime allocates in a pattern
    the tuned heap serves badly (64 ViT-B box prompts: 8.2 GB peak against 4.8 GB untuned), so samhq's ONNX engines,
    OpenVINO's too (not measured), run with glibc's behaviour (`glibc_malloc`: 4.6 GB).

    Importing samhq calls this. Nothing is changed (False) where the C library is not glibc, when
    `SAMHQ_MALLOC_TUNING=0`, or when the user set glibc's own variables (`MALLOC_MMAP_THRESHOLD_`,
    `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_`, or `glibc.malloc.*` in `GLIBC_TUNABLES`).
    """
    import platform

    if os.environ.get("SAMHQ_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(k in os.environ for k in _MALLOC_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    global malloc_tuned, _tuned_threshold
    mmap = min(int(threshold), 2**31 - 1)  # mallopt takes C ints
    try:
        malloc_tuned = _set_thresholds(mmap)
    except (OSError, AttributeError):
        return False
    _tuned_threshold = mmap if malloc_tuned else 0
    return malloc_tuned


def _set_thresholds(mmap: int) -> bool:
    """mallopt: the mmap threshold `mmap` bytes and the trim threshold twice that (as glibc pairs them)."""
    mallopt = _libc().mallopt
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap) and mallopt(_M_TRIM_THRESHOLD, min(2 * mmap, 2**31 - 1)))


@contextlib.contextmanager
def glibc_malloc():
    """Within this block, glibc's own large-block behaviour where `tune_malloc` changed it: blocks over 32 MiB
    (glibc's largest dynamic mmap threshold) are mapped fresh and unmapped on free; on leaving, samhq's
    thresholds come back and the heap's free memory is handed back (`release_free_memory`). For runtimes whose
    allocation pattern the tuned heap serves badly (samhq's ONNX engines). Nested and concurrent blocks keep
    glibc's behaviour until the last one leaves. Does nothing when malloc is not tuned."""
    global _untuned_depth
    if not malloc_tuned:
        yield
        return
    with _untuned_lock:
        _untuned_depth += 1
        if _untuned_depth == 1:
            _set_thresholds(_GLIBC_MMAP_THRESHOLD_MAX)
    try:
        yield
    finally:
        with _untuned_lock:
            _untuned_depth -= 1
            if _untuned_depth == 0:
                _set_thresholds(_tuned_threshold)
                release_free_memory()


def release_free_memory() -> None:
    """Give the free parts of glibc's heap back to the system (malloc_trim) when `tune_malloc` is in effect."""
    if malloc_tuned:
        _libc().malloc_trim(0)


@functools.cache
def _libc():
    """glibc, loaded once (release_free_memory runs after every ONNX engine call)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc
