"""One loader for both generations: `load_model(source)` returns a `SamHQModel` (SAM-HQ, SAM) or a
`SamHQ2Model` (HQ-SAM 2, SAM 2.1, SAM 2.0), whichever the checkpoint holds, and `convert` writes
either one in the other layout.

The family is read from the checkpoint (`samhq.checkpoints.checkpoint_family`: a folder's
config.json model_type, else the tensor names, e.g. `image_encoder.trunk.*` is SAM 2's Hiera), so
`--model sam2.1_hq_hiera_large.pt`, `--model sam_hq_vit_b.pth`, a transformers-layout folder of
either and hub ids (`facebook/sam2.1-hiera-large`, through huggingface_hub) all work wherever a
model is taken.
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoints import CheckpointError, checkpoint_family, resolve_source
from .model import SamHQModel, save_official
from .sam2.model import SamHQ2Model, load_sam2_model

MODEL_CLASSES = (SamHQModel, SamHQ2Model)


def is_model(obj) -> bool:
    """True for a model object of either family (as opposed to a checkpoint source)."""
    return isinstance(obj, MODEL_CLASSES)


def load_model(source, device=None, dtype=None, strict_hq: bool = False, low_memory: bool = False):
    """A model in eval mode from any checkpoint of either generation.

    source: an official `.pth` / `.pt` (SAM-HQ's `sam_hq_vit_*.pth`, SAM's, Meta's `sam2.1_hiera_*.pt`,
    SysCV's `sam2.1_hq_hiera_large.pt`), a `.safetensors` file, a transformers-layout folder (config.json +
    model.safetensors; SamHQ, Sam2 or Sam2Video), a hub id (downloaded through huggingface_hub) or a
    bundled model name. device: where the model goes (default cpu); dtype: the image encoder's
    precision (the prompt encoder and mask decoder stay float32). A checkpoint without HQ weights (plain
    SAM, SAM 2) runs with its HQ parts off (`hq_enabled=False`), or is refused with `strict_hq`.
    low_memory (CPU, float32, Linux): inference with the weights left in the
    memory-mapped file and the image encoder's pages handed back after each use, so the process holds
    about one encoder block's weights at a time (`samhq.modeling.low_memory`; ValueError where it cannot work).
    Returns a `SamHQModel` or a `SamHQ2Model`. Raises `CheckpointError` naming the file and the problem.
    """
    path = resolve_source(source)
    if checkpoint_family(path) == "sam":
        return SamHQModel.from_pretrained(path, device=device, dtype=dtype, strict_hq=strict_hq, low_memory=low_memory)
    model = load_sam2_model(path, device=device, dtype=dtype, low_memory=low_memory)
    if strict_hq and not model.hq_enabled:
        raise CheckpointError(f"{path}: a plain SAM 2 checkpoint without HQ-SAM 2 weights (strict_hq is set)")
    return model


def convert(src, dst, overwrite: bool = False) -> Path:
    """Convert a checkpoint of either generation between layouts: DST ending in .pth / .pt is the official
    format (SAM-HQ's state dict, or Meta's / SysCV's {"model": state_dict}); anything else a transformers-layout
    folder (config.json + model.safetensors). Refuses to overwrite DST unless `overwrite`."""
    model = load_model(src)
    dst = Path(dst)
    if dst.suffix in (".pth", ".pt"):
        if isinstance(model, SamHQ2Model):
            return model.save_official(dst, overwrite=overwrite)
        return save_official(model, dst, overwrite=overwrite)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; pass --force to write into it")
    return model.save_pretrained(dst)


__all__ = ["load_model", "convert", "is_model", "MODEL_CLASSES"]
