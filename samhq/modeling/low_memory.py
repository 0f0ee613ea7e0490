"""Low-memory inference: the image encoder's weights stay in the checkpoint file.

`load_model(path, low_memory=True)` (either generation) loads the model with its image encoder's weights
as views of the memory-mapped checkpoint (both readers map the file privately, copy-on-write:
`torch.load(mmap=True)` for zip-format `.pth`, safetensors for `.safetensors`) and, once each of the image
encoder's modules has run, hands the pages of its weights back to the operating system (Linux `madvise(MADV_DONTNEED)`). The next
embedding maps them again from the page cache, or reads the disk if the system needed the memory
meanwhile. So the process holds about one module's weights at a time instead of all of them: for ViT-H,
the fp32 weights are 2.5 GB, one transformer block's 79 MB. The file's pages in the page cache are
shared by every process that maps the same file, and the system reclaims them under memory pressure.

Limits, each refused at load with a one-line error: Linux only; CPU; the encoder in float32, and a
checkpoint whose encoder tensors are stored as float32 in a zip-format `.pth` or a `.safetensors` file
(torch's legacy format and float16 files cannot be mapped as the model's weights; `samhq convert` writes
either format). Inference only: the encoder's weights are frozen, and anything written into them in place
would be undone at the next release (the trainer refuses the `full` recipe on such a model).
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import torch
from torch import nn

_MADV_DONTNEED = 4  # Linux's value on every architecture
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def file_mappings(path) -> list[tuple[int, int]]:
    """This process's address ranges [start, end) that map `path` (read from /proc/self/maps)."""
    target = os.path.realpath(path)
    out = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].rstrip("\n") == target:
                start, end = parts[0].split("-")
                out.append((int(start, 16), int(end, 16)))
    return out


def _inner_pages(ptr: int, nbytes: int) -> tuple[int, int] | None:
    """The whole pages inside [ptr, ptr + nbytes): (address, length), or None when there is none."""
    start = -(-ptr // _PAGE) * _PAGE
    end = (ptr + nbytes) // _PAGE * _PAGE
    return (start, end - start) if end > start else None


class MappedWeights:
    """The tensors of one memory-mapped checkpoint file, and handing their pages back.

    Only pages that lie inside the file's mappings, of tensors that still hold the address they were loaded
    with, are ever released; the storages are kept alive here, so those addresses cannot be reused by
    anything else. Released pages read back unchanged from the file on the next access.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        self._ranges = file_mappings(path)
        self._spans: set[tuple[int, int]] = set()  # (address, bytes) of the tracked tensors
        self._storages = []

    def is_mapped(self, t: torch.Tensor) -> bool:
        """True when all of `t`'s bytes lie inside one of the file's mappings."""
        ptr, n = t.data_ptr(), t.numel() * t.element_size()
        return n > 0 and any(a <= ptr and ptr + n <= b for a, b in self._ranges)

    def track(self, t: torch.Tensor) -> None:
        """Remember `t` (a contiguous mapped tensor) as releasable: tensors at its address and size from now on."""
        self._storages.append(t.untyped_storage())
        self._spans.add((t.data_ptr(), t.numel() * t.element_size()))

    def release(self, tensors) -> None:
        """Hand back the pages of those `tensors` that sit at a tracked address (a copy or a replaced weight sits
        elsewhere and is left alone)."""
        for t in tensors:
            span = (t.data_ptr(), t.numel() * t.element_size())
            if span in self._spans:
                self._advise(*span)

    def release_all(self) -> None:
        for span in self._spans:
            self._advise(*span)

    def _advise(self, ptr: int, nbytes: int) -> None:
        pages = _inner_pages(ptr, nbytes)
        if pages and self._libc.madvise(ctypes.c_void_p(pages[0]), pages[1], _MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), f"madvise failed while releasing weight pages of {self.path}")


def check_supported(device, dtype) -> None:
    """Raise ValueError (one line) where low_memory cannot work: not Linux, not the CPU, or an encoder dtype
    other than float32 (converted weights are copies, so nothing would stay in the file)."""
    if not sys.platform.startswith("linux"):
        raise ValueError("low_memory needs Linux (it hands weight pages back with madvise); load without it")
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"low_memory is for the CPU (the weights stay in the memory-mapped file); got device={device}")
    if dtype is not None and dtype != torch.float32:
        raise ValueError(f"low_memory keeps the file's float32 weights, so the encoder cannot run in "
                         f"{str(dtype).replace('torch.', '')}: drop low_memory (--low-memory) or the dtype (--dtype)")


def map_state(state: dict[str, torch.Tensor], path, required_prefix: str | None = None) -> MappedWeights | None:
    """Track the tensors of `state` that are float32 views of the mapped file `path` (the default load hands their
    pages back once copied; None off Linux). With `required_prefix` (low_memory), every float tensor so named must
    be one: ValueError naming the first that is not."""
    if not sys.platform.startswith("linux"):
        return None
    weights = MappedWeights(path)
    for name, t in state.items():
        if weights.is_mapped(t) and t.dtype == torch.float32 and t.is_contiguous():
            weights.track(t)
        elif required_prefix is not None and name.startswith(required_prefix):
            if t.dtype != torch.float32:
                raise ValueError(f"{path}: low_memory needs float32 weights in the file, but {name} is "
                                 f"{str(t.dtype).replace('torch.', '')}; write a float32 copy (samhq convert) or load without it")
            raise ValueError(f"{path}: its weights cannot be memory-mapped as they are ({name}); low_memory needs a "
                             "zip-format .pth or a .safetensors file with contiguous tensors (samhq convert writes one), "
                             "or load without it")
    return weights


def install(encoder: nn.Module, weights: MappedWeights) -> None:
    """Freeze `encoder` and release the weights of each of its modules (its own and its submodules') after that
    module's forward, the encoder's last. A fast form that reads a submodule's weights without calling it (a ViT
    block's projections, `fast_paths.vit_layer`) thus releases them when the block finishes."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    for module in encoder.modules():
        weights_below = list(module.parameters())
        if weights_below:
            module.register_forward_hook(lambda m, args, out, w=weights_below: weights.release(w))
    weights.release_all()
