"""Helpers shared by the commands: the --model option, example epilogs, refusing to overwrite, and
the options every command shares (--threads) or every image-reading command shares (--bit-depth,
--max-pixels, --max-prompts), applied once per run by `command_setup`."""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

from ..checkpoints import DEMO_MODEL, demo_model_available  # noqa: F401 - re-exported for the commands


def add_model_arg(parser: argparse.ArgumentParser, low_memory: bool = False) -> None:
    """--model SRC (official .pth, transformers-layout folder, .safetensors, hub id or bundled name),
    --device and --dtype (the image encoder's precision; the decoder stays float32); with low_memory also
    --low-memory (samhq.modeling.low_memory)."""
    has_demo = demo_model_available()
    parser.add_argument(
        "--model", "-m", default=DEMO_MODEL if has_demo else None, required=not has_demo, metavar="SRC",
        help="checkpoint of SAM-HQ / SAM or HQ-SAM 2 / SAM 2.1 (detected): official .pth / .pt, a transformers-layout "
        "folder, a .safetensors file, a hub id, or a bundled model name"
        + (f" (default: the bundled demo model {DEMO_MODEL})" if has_demo else ""),
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the image encoder's precision; the prompt encoder and mask decoder stay float32 "
                        "(default float32, exact; auto: bfloat16 on a GPU or a CPU with BF16 units, else float32)")
    if low_memory:
        parser.add_argument("--low-memory", action="store_true",
                            help="leave the weights in the memory-mapped checkpoint and hand the image encoder's pages "
                                 "back after each use: the process holds about one encoder block's weights at a time "
                                 "(ViT-H: 1.1 GB instead of 3.3 GB per image) in the same time; a zip-format .pth / .pt or "
                                 ".safetensors checkpoint, CPU, float32, Linux")


class DeprecatedAlias(argparse.Action):
    """An old flag spelling (nargs=0, a switch) that sets its new option and says so on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, True)


def new_command(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """A sub-parser whose --help ends with a worked example; every command gets --threads."""
    p = sub.add_parser(
        name, help=help, description=help, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the CPUs this process may use: "
                        "its CPU affinity capped by a container's cgroup CPU quota)")
    return p


def add_image_args(parser: argparse.ArgumentParser, prompts: bool = False, bit_depth: bool = True) -> None:
    """--max-pixels, --bit-depth (and --max-prompts) for commands that read images (and prompts)."""
    from ..image_io import BIT_DEPTH_MODES
    from ..limits import Limits

    if bit_depth:
        parser.add_argument("--bit-depth", choices=BIT_DEPTH_MODES, default="dtype",
                            help="images with more than 8 bits (16-bit microscopy, satellite): scale by the type's "
                                 "range (dtype, default), by the image's own min/max, or by its 1st-99.8th percentiles")
    parser.add_argument("--max-pixels", type=int, metavar="N",
                        help=f"refuse images over N pixels, checked before decoding (default {Limits.max_pixels:,})")
    if prompts:
        parser.add_argument("--max-prompts", type=int, metavar="N",
                            help=f"refuse more than N points + boxes at once (default {Limits.max_prompts})")


def add_format_args(parser: argparse.ArgumentParser, default: str | None, what: str) -> None:
    """--format LIST (the command's own files and the annotation formats), --category(ies), polygon options."""
    parser.add_argument(
        "--format", "-f", default=default, metavar="LIST",
        help=f"comma-separated outputs: json ({what}), png (mask PNGs and an overlay), both (= json,png); "
             "coco, yolo, labelme, labelstudio, geojson (samhq export masks' layout); geotiff, gpkg (with --tiles, for "
             "georeferenced rasters; geojson is then in WGS 84)" + (f" (default {default})" if default else ""))
    parser.add_argument("--category", metavar="NAME",
                        help='the class name of every mask in coco, yolo, labelme, labelstudio, geojson (default "object")')
    parser.add_argument("--categories", metavar="ID=NAME,...|FILE",
                        help="class names by category_id (prompt files' category_id): '1=cat,2=dog', or a JSON file "
                             "mapping ids to names or holding COCO categories (default: the prompt file's own categories)")
    parser.add_argument("--tolerance", type=float, default=0.0, metavar="PX",
                        help="polygon simplification in pixels for yolo, labelme, geojson, gpkg (default 0: exact)")
    parser.add_argument("--min-area", type=float, default=0.0, metavar="PX2",
                        help="drop polygon parts and holes smaller than this many square pixels (default 0)")


def add_tile_args(parser: argparse.ArgumentParser, store: bool = False, refine: bool = False, server: bool = False) -> None:
    """--tiles and its options: huge images at native resolution (samhq.tiles)."""
    from ..limits import Limits

    if server:
        g = parser.add_argument_group("large uploads in tiles (samhq.tiles)")
        g.add_argument("--tiles", action="store_true",
                       help="segment uploads larger than a tile in overlapping tiles at their own resolution (tiles are "
                            "embedded as clicks need them) instead of shrinking them to the model input")
    else:
        g = parser.add_argument_group("huge images in tiles (samhq.tiles; GeoTIFF / BigTIFF read in windows with samhq.geo)")
        g.add_argument("--tiles", action="store_true",
                       help="embed the image in overlapping tiles at its own resolution instead of shrinking it to the "
                            "model input; .tif/.tiff/.vrt/.jp2/.img rasters are read window by window (the geo extra)")
    g.add_argument("--tile-size", type=int, metavar="N", help="tile side in image pixels (default: the model's input size)")
    g.add_argument("--overlap", type=int, metavar="N", help="pixels shared by neighbouring tiles (default: a quarter tile)")
    if store:
        g.add_argument("--tile-store", metavar="DIR",
                       help="keep the tile embeddings on disk, DIR/NAME.zarr per image (the tiles extra): a later run "
                            "prompts the image without embedding it again")
    if refine:
        g.add_argument("--refine", choices=["box", "box+mask", "none"], default="box",
                       help="refine masks found on a coarse pyramid level at native resolution (default box)")
    g.add_argument("--max-tiled-pixels", type=int, metavar="N",
                   help=f"refuse images over N pixels that must be decoded whole in tiled mode (default "
                        f"{Limits.max_tiled_pixels:,}; rasters read in windows are not bounded)")


def tile_options(args) -> dict | None:
    """The TiledPredictor / TiledMaskGenerator options of --tiles (None without it); ValueError for bad sizes."""
    if not getattr(args, "tiles", False):
        for option in ("tile_size", "overlap", "tile_store"):
            if getattr(args, option, None) is not None:
                raise ValueError(f"--{option.replace('_', '-')} needs --tiles")
        return None
    options = {}
    if args.tile_size is not None:
        if args.tile_size < 32:
            raise ValueError(f"--tile-size must be at least 32 pixels, got {args.tile_size}")
        options["tile_size"] = args.tile_size
    if args.overlap is not None:
        options["overlap"] = args.overlap
    return options


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    """--ray [ADDRESS], --num-workers, --gpus-per-worker: the run as a Ray Data job (samhq.distributed)."""
    g = parser.add_argument_group("many images on a Ray cluster (samhq.distributed; the ray extra)")
    g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray: without ADDRESS a local Ray is started; 'auto' or HOST:PORT joins a running cluster "
                        "(ray start --head). Workers read the images by path, so every node must see them; this "
                        "process alone writes --out")
    g.add_argument("--num-workers", type=int, default=1, metavar="N", help="Ray actors, each loading the model once (default 1)")
    g.add_argument("--gpus-per-worker", type=float, default=0, metavar="G", help="GPUs per actor (default 0: CPU)")


def ray_options(args) -> dict | None:
    """run_ray's cluster options from --ray (None without it)."""
    if args.ray is None:
        for option, default in (("num_workers", 1), ("gpus_per_worker", 0)):
            if getattr(args, option) != default:
                raise ValueError(f"--{option.replace('_', '-')} needs --ray")
        return None
    if args.num_workers < 1 or args.gpus_per_worker < 0:
        raise ValueError("--num-workers must be at least 1 and --gpus-per-worker at least 0")
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError("--ray needs Ray Data: pip install 'samhq[ray]'") from None
    return {"address": None if args.ray == "local" else args.ray, "num_workers": args.num_workers,
            "gpus_per_worker": args.gpus_per_worker}


@contextlib.contextmanager
def command_setup(args):
    """Apply a run's shared options (threads, limits) and print warnings as one line each; undone afterwards."""
    import torch

    from .. import limits

    for option in ("threads", "max_pixels", "max_prompts", "max_tiled_pixels"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    threads = torch.get_num_threads()
    previous = limits.configure(**{k: getattr(args, k, None) for k in ("max_pixels", "max_prompts", "max_tiled_pixels")})
    show = warnings.showwarning
    warnings.showwarning = lambda message, *a, **k: print(f"samhq {args.command}: warning: {message}", file=sys.stderr)
    try:
        limits.set_threads(getattr(args, "threads", None))
        yield
    finally:
        warnings.showwarning = show
        limits.configure(previous)
        torch.set_num_threads(threads)


def refuse_overwrite(paths, force: bool) -> None:
    """Raise FileExistsError naming the first existing output unless force is set."""
    if force:
        return
    for p in paths:
        if p is not None and Path(p).exists():
            raise FileExistsError(f"{p} already exists; pass --force to overwrite it")


RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")


def open_tiled_source(path, bit_depth: str = "dtype"):
    """An image for tiled mode: a raster (.tif, .tiff, .vrt, ...) as a `samhq.geo.RasterSource` read window by
    window when rasterio is installed (16-bit bands scaled by their type's range), anything else decoded
    whole by `samhq.image_io` under `max_tiled_pixels` as a `samhq.tiles.ArraySource`."""
    from pathlib import Path

    from ..image_io import to_rgb_array
    from ..limits import LimitError, as_tiled_error, tiled_limits
    from ..tiles import ArraySource

    if Path(path).suffix.lower() in RASTER_SUFFIXES:
        try:
            import rasterio  # noqa: F401
        except ImportError:
            pass
        else:
            from ..geo import RasterSource

            return RasterSource(path)
    try:
        return ArraySource(to_rgb_array(path, bit_depth=bit_depth, limits=tiled_limits()))
    except LimitError as e:
        raise as_tiled_error(e) from None


def whole_image(source):
    """A tiled-mode image whole, (H, W, 3) uint8 (for an overlay): a raster read in windows is read whole,
    under `max_tiled_pixels`."""
    from ..limits import LimitError, as_tiled_error, check_pixels, tiled_limits

    if getattr(source, "rgb", None) is not None:
        return source.rgb
    h, w = source.shape
    try:
        check_pixels(w, h, tiled_limits())
    except LimitError as e:
        raise as_tiled_error(e) from None
    return source.read((0, 0, w, h))
