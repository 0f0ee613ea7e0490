"""`samhq info SRC`: what a checkpoint is."""
from __future__ import annotations

import json

from ._common import new_command


def register(sub) -> None:
    p = new_command(sub, "info", "Print a checkpoint's family (SAM-HQ or HQ-SAM 2 / SAM 2), variant, parameter count, "
                    "image size and dtype.", "samhq info sam_hq_vit_b.pth   # or sam2.1_hq_hiera_large.pt")
    p.add_argument("src", help="official .pth / .pt (SAM-HQ, SAM, HQ-SAM 2, SAM 2.1), transformers-layout folder "
                   "(config.json + model.safetensors), .safetensors file, hub id or bundled name")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)


def describe(src) -> dict:
    """What a checkpoint of either generation is: family ("sam" for SAM-HQ / SAM, "sam2" for HQ-SAM 2 / SAM 2),
    layout and file, variant, HQ weights or not, parameter count, image size, dtypes. Checks what loading it
    would refuse (wrong dtypes, NaN, config vs tensors, missing or unexpected tensors) and raises the same error."""
    from ..checkpoints import checkpoint_family, resolve_source

    path = resolve_source(src)
    if checkpoint_family(path) == "sam2":
        return _describe_sam2(src, path)
    from ..checkpoints import infer_config, read_checkpoint, validate_checkpoint

    state, config, fmt = read_checkpoint(path)
    config = config or infer_config(state, str(src))
    validate_checkpoint(state, config, str(src))  # what loading it would refuse, said here too
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values()})
    hq = any(k.startswith("mask_decoder.hq_token") for k in state)
    return {
        "source": str(src),
        "family": "sam",
        "format": fmt,
        "variant": config.variant or "custom",
        "hq": hq,
        # the prompt encoder's positional embedding is the shared one under a second name
        "parameters": sum(t.numel() for k, t in state.items() if not k.startswith("prompt_encoder.shared_embedding.")),
        "image_size": config.vision_config.image_size,
        "dtype": ",".join(dtypes),
    }


def _describe_sam2(src, path) -> dict:
    import torch

    from .. import checkpoints_sam2 as ckpt
    from ..checkpoints import check_tensors
    from ..modeling.sam2.model import SamHQ2Model

    read = ckpt.read_checkpoint(path)
    config = read.config or ckpt.infer_config(read.state, str(read.path))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SamHQ2Model(config).state_dict().items()}
    hq = ckpt.check_state(read.state, expected, str(read.path), config.variant or "custom")
    check_tensors(read.state, str(read.path))
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in read.state.values()})
    return {
        "source": str(src),
        "family": "sam2",
        "format": f"{read.layout}:{read.path}",
        "variant": config.variant or "custom",
        "hq": hq,
        "parameters": sum(t.numel() for k, t in read.state.items() if k != ckpt.TIED[1]),
        "video_tensors": sum(t.numel() for t in read.video_state.values()),
        "image_size": config.image_size,
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
