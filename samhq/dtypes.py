"""Precision names: which dtype the image encoder runs in, and whether the hardware runs bfloat16 fast."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def bf16_supported() -> bool:
    """True when the CPU has native bfloat16 matrix units (AVX512-BF16 / AMX), as oneDNN reports.

    Without them PyTorch runs bf16 matmuls on a slow reference path, often far slower than fp32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype, device=None) -> torch.dtype:
    """The image encoder's precision. None or "float32": float32 (the default: exact, what the parity tests
    pin). "auto": bfloat16 where the hardware runs it fast (a CUDA GPU that supports it, a CPU with
    AVX512-BF16 / AMX units, `bf16_supported`), else float32. Or a torch dtype / its name (float32,
    bfloat16, float16; fp32, bf16, fp16). device: where the model runs (default cpu). Raises ValueError
    for other names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        dev = torch.device(device or "cpu")
        if dev.type == "cuda":
            fast = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        else:
            fast = dev.type == "cpu" and bf16_supported()
        return torch.bfloat16 if fast else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


__all__ = ["DTYPES", "bf16_supported", "resolve_dtype"]
