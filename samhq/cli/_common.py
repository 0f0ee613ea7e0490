"""Helpers shared by the commands: the --model option, example epilogs, refusing to overwrite."""
from __future__ import annotations

import argparse
from pathlib import Path

DEMO_MODEL = "samhq-tiny-shapes"


def demo_model_available() -> bool:
    from ..checkpoints import BUNDLED

    path = BUNDLED.get(DEMO_MODEL)
    return path is not None and path.exists()


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    """--model SRC: official .pth, seed-layout folder, .safetensors, hub id or bundled name."""
    has_demo = demo_model_available()
    parser.add_argument(
        "--model", "-m", default=DEMO_MODEL if has_demo else None, required=not has_demo, metavar="SRC",
        help="checkpoint: official .pth, a save_pretrained folder, a .safetensors file, a hub id, or a bundled "
        "model name" + (f" (default: the bundled demo model {DEMO_MODEL})" if has_demo else ""),
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


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
