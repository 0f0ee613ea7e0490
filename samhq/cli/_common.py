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


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    """--model SRC (official .pth, transformers-layout folder, .safetensors, hub id or bundled name),
    --device and --dtype (the image encoder's precision; the decoder stays float32)."""
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


@contextlib.contextmanager
def command_setup(args):
    """Apply a run's shared options (threads, limits) and print warnings as one line each; undone afterwards."""
    import torch

    from .. import limits

    for option in ("threads", "max_pixels", "max_prompts"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    threads = torch.get_num_threads()
    previous = limits.configure(**{k: getattr(args, k, None) for k in ("max_pixels", "max_prompts")})
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
