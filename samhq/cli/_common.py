"""Helpers shared by the commands: the --model option, example epilogs, refusing to overwrite."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoints import DEMO_MODEL, demo_model_available  # noqa: F401 - re-exported for the commands


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    """--model SRC (official .pth, transformers-layout folder, .safetensors, hub id or bundled name),
    --device and --dtype (the image encoder's precision; the decoder stays float32)."""
    has_demo = demo_model_available()
    parser.add_argument(
        "--model", "-m", default=DEMO_MODEL if has_demo else None, required=not has_demo, metavar="SRC",
        help="checkpoint: official .pth, a transformers-layout folder, a .safetensors file, a hub id, or a bundled "
        "model name" + (f" (default: the bundled demo model {DEMO_MODEL})" if has_demo else ""),
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the image encoder's precision; the prompt encoder and mask decoder stay float32 "
                        "(default auto: bfloat16 on a GPU that supports it, else float32)")


class DeprecatedAlias(argparse.Action):
    """An old flag spelling (nargs=0, a switch) that sets its new option and says so on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, True)


def new_command(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """A sub-parser whose --help ends with a worked example."""
    return sub.add_parser(
        name, help=help, description=help, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def refuse_overwrite(paths, force: bool) -> None:
    """Raise FileExistsError naming the first existing output unless force is set."""
    if force:
        return
    for p in paths:
        if p is not None and Path(p).exists():
            raise FileExistsError(f"{p} already exists; pass --force to overwrite it")
