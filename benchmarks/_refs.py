"""Loading the reference implementations for the benchmark, with the same weights as samhq.

The official `segment_anything_hq` needs torchvision / timm stand-ins to import; those live in
tests/official_ref.py and are used from there (never in the library).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from official_ref import load_official, perturb_  # noqa: E402

OFFICIAL_NAME = {"vit_b": "vit_b", "vit_l": "vit_l", "vit_h": "vit_h", "vit_tiny": "vit_tiny"}


def official_module():
    sah = load_official()
    if sah is None:
        raise ImportError("segment-anything-hq is not installed (pip install --no-deps segment-anything-hq==0.3)")
    return sah


def official_model(variant: str, checkpoint: str | Path | None):
    """The official Sam model; weights from our official-format .pth (None: leave them to the caller)."""
    sah = official_module()
    model = sah.sam_model_registry[OFFICIAL_NAME[variant]]()
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=False)
    return model.eval()  # eval() after loading: refreshes TinyViT's cached attention biases


def transformers_model(seed_dir: str | Path):
    from transformers import SamHQModel

    return SamHQModel.from_pretrained(seed_dir).eval()


def fill_random_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministic random values for every float parameter and buffer, cheaply (for models built on
    the meta device and then `to_empty`). Norm weights near one, others scaled by 1/sqrt(fan-in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                raise RuntimeError(f"fill_random_: non-float buffer {name} cannot be filled at random")
            if name.endswith("pixel_mean"):
                t.copy_(torch.tensor([123.675, 116.28, 103.53]).view_as(t))
            elif name.endswith("pixel_std"):
                t.copy_(torch.tensor([58.395, 57.12, 57.375]).view_as(t))
            elif t.ndim == 1 and name.endswith("weight"):
                t.normal_(1.0, 0.05, generator=g)
            else:
                fan = t[0].numel() if t.ndim > 1 else 1
                t.normal_(0.0, 1.0 / math.sqrt(max(fan, 1)), generator=g)
    return module


def on_meta(build):
    """build() on the meta device, then real (uninitialised) CPU storage: no time spent initialising."""
    with torch.device("meta"):
        model = build()
    return model.to_empty(device="cpu")


__all__ = ["official_model", "official_module", "transformers_model", "fill_random_", "on_meta", "perturb_"]
