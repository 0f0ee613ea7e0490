"""`samhq` command line. Each command lives in its own module with `register(subparsers)`.

A command module adds one sub-parser and sets `func=run`, where `run(args) -> int`. Errors a user
can fix (bad image, bad prompt, existing output) are raised as ValueError / FileExistsError /
CheckpointError and printed here as one line, exit code 2; nothing is written in that case.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ["segment", "everything", "info", "convert", "train", "evaluate", "export", "serve", "label_studio", "track"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samhq",
        description="SAM-HQ: segment images with prompts or automatically, convert checkpoints, train and evaluate.",
        epilog="Run `samhq COMMAND --help` for a command's options and an example.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # command not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from ..checkpoints import CheckpointError
    from ._common import command_setup

    try:
        with command_setup(args):  # --threads, limits, one-line warnings
            return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError, CheckpointError, ImportError) as e:
        print(f"samhq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
