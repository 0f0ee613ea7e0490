"""Opt-in fast modes for CPU inference: bfloat16, int8 dynamic quantization, torch.compile.

    model = SamHQModel.from_pretrained("sam_hq_vit_b.pth")
    fast = optimize(model, "int8")        # or "bf16", "compile", "fp32" (unchanged)

Each mode keeps the plain fp32 path's masks within a tolerance the tests state
(tests/test_fast.py): bf16 mask IoU >= 0.95 per mask on random weights, int8 lower (its cost is
reported by the benchmark). Post-processing (upscaling, thresholding) always runs in float32.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .dtypes import bf16_supported

MODES = ("fp32", "bf16", "int8", "compile")


def to_bfloat16(model: nn.Module, warn: bool = True) -> nn.Module:
    """Cast `model`'s image encoder to bfloat16 in place (as `from_pretrained(..., dtype=torch.bfloat16)`).

    The encoder is where the time is; the prompt encoder and mask decoder (4 M parameters, a few
    percent of the time) stay fp32, which keeps the masks much closer to fp32's: one bf16 rounding
    in the decoder's attention flips boundary pixels of small masks.
    """
    if warn and not bf16_supported():
        warnings.warn(
            "this CPU has no native bfloat16 units: bf16 inference will be slower than fp32 here", stacklevel=2
        )
    model.vision_encoder.to(torch.bfloat16)
    return model


def quantize_int8(model: nn.Module, encoder: bool = True, decoder: bool = False) -> nn.Module:
    """A copy of `model` with the chosen parts' nn.Linear layers dynamically quantized to int8.

    Weights are int8 per tensor, activations are quantized on the fly; convolutions, attention
    products and norms stay fp32. Only the image encoder by default: that is where the time is,
    and the small decoder keeps its fp32 precision. CPU only; the model must be fp32.
    """
    if not (encoder or decoder):
        raise ValueError("quantize_int8: choose at least one of encoder and decoder")
    dtypes = {getattr(model, "encoder_dtype", torch.float32), getattr(model, "dtype", torch.float32)}
    if dtypes != {torch.float32}:
        raise ValueError(f"int8 quantization needs an fp32 model, got {sorted(map(str, dtypes))}; load it without dtype=")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise ImportError("this torch build has no torch.ao.quantization.quantize_dynamic; int8 mode is unavailable") from None
    model = copy.deepcopy(model).cpu().eval()
    parts = ([model.vision_encoder] if encoder else []) + (
        [model.prompt_encoder, model.mask_decoder] if decoder else []
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes of torch.ao and quantized tensors
        for part in parts:
            quantize_dynamic(part, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def compile_encoder(model: nn.Module, **options) -> nn.Module:
    """Wrap the image encoder in `torch.compile` (in place); the first call compiles (tens of seconds)."""
    model.vision_encoder = torch.compile(model.vision_encoder, **options)
    return model


def optimize(model: nn.Module, mode: str = "fp32") -> nn.Module:
    """Return `model` prepared for one of `MODES`; "int8" returns a copy, the others change it in place."""
    if mode not in MODES:
        raise ValueError(f"unknown fast mode {mode!r}; choose one of {', '.join(MODES)}")
    model.eval()
    if mode == "bf16":
        return to_bfloat16(model)
    if mode == "int8":
        return quantize_int8(model)
    if mode == "compile":
        return compile_encoder(model)
    return model
