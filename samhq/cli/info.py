"""`samhq info SRC`: what a checkpoint is."""
from __future__ import annotations

import json

from ._common import new_command


def register(sub) -> None:
    p = new_command(sub, "info", "Print a checkpoint's variant, parameter count, image size and dtype.",
                    "samhq info sam_hq_vit_b.pth")
    p.add_argument("src", help="official .pth, transformers-layout folder (config.json + model.safetensors), .safetensors file, hub id or bundled name")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)


def describe(src) -> dict:
    from ..checkpoints import infer_config, read_checkpoint, validate_checkpoint

    state, config, fmt = read_checkpoint(src)
    config = config or infer_config(state, str(src))
    validate_checkpoint(state, config, str(src))  # what loading it would refuse, said here too
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values()})
    hq = any(k.startswith("mask_decoder.hq_token") for k in state)
    return {
        "source": str(src),
        "format": fmt,
        "variant": config.variant or "custom",
        "hq": hq,
        # the prompt encoder's positional embedding is the shared one under a second name
        "parameters": sum(t.numel() for k, t in state.items() if not k.startswith("prompt_encoder.shared_embedding.")),
        "image_size": config.vision_config.image_size,
        "dtype": ",".join(dtypes),
    }


def run(args) -> int:
    info = describe(args.src)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>11}: {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:>11}: {v}")
    return 0
