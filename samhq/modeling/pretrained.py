"""Building a model from a checkpoint: `from_pretrained`'s body.

The file is read by `samhq.checkpoints` (state dict in our naming, and the config when the file
carries one; otherwise the config is inferred from the tensor shapes). The model is built on the meta
device, the state dict is checked against it (missing, unexpected and mis-shaped tensors are one
`CheckpointError`), and the weights are loaded.
"""
from __future__ import annotations

import warnings

import torch

from ..checkpoints import CheckpointError, infer_config, read_checkpoint, short_list, validate_checkpoint
from ..dtypes import resolve_dtype
from . import low_memory as low_memory_weights
from .mask_decoder import is_hq_parameter


def load_pretrained(model_class, source, device=None, dtype=None, strict_hq: bool = False, low_memory: bool = False):
    """A `model_class` (SamHQModel or SamHQVisionModel) in eval mode with the weights of `source`.

    device: where the model goes (default cpu); dtype: the image encoder's dtype, a torch dtype or a name
    `samhq.dtypes.resolve_dtype` takes ("auto", "bfloat16", ...; default float32; the prompt encoder and
    mask decoder always stay float32). A plain SAM checkpoint loads with a
    warning and `hq_enabled = False`, unless strict_hq. low_memory: the weights stay in the memory-mapped
    file and the image encoder's pages are handed back after use (`samhq.modeling.low_memory`; CPU, float32,
    inference only; ValueError where that cannot work).
    """
    dtype = resolve_dtype(dtype, device)
    if low_memory:
        low_memory_weights.check_supported(device, dtype)
    state, config, where = read_checkpoint(source)
    where = where.split(":", 1)[1]
    mapped = low_memory_weights.map_state(state, where, "vision_encoder." if low_memory else None)
    if config is None:
        config = infer_config(state, where)
    # before anything is built: dtypes, finite values, config vs tensors (a mapped tensor's pages go back once read)
    validate_checkpoint(state, config, where, after_each=(lambda t: mapped.release([t])) if mapped else None)
    with torch.device("meta"):
        model = model_class(config)
    vision_only = not hasattr(model, "mask_decoder")
    if vision_only:
        state = {k: v for k, v in state.items() if k.startswith("vision_encoder.")}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    hq_missing = [k for k in missing if is_hq_parameter(k)]
    plain_sam = not vision_only and hq_missing and len(hq_missing) == len(missing) and not strict_hq
    if plain_sam:
        hq_all = [k for k in expected if is_hq_parameter(k)]
        if len(hq_missing) != len(hq_all):
            raise CheckpointError(f"{where}: some HQ weights are present and some missing: {short_list(hq_missing)}")
        warnings.warn(
            f"{where} is a plain SAM checkpoint without SAM-HQ weights; running as SAM (the HQ branch is off)",
            stacklevel=3,
        )
        missing = []
    if missing or unexpected:
        variant = config.variant or "custom"
        raise CheckpointError(
            f"{where}: does not match the {variant} model: missing keys {short_list(missing)}; "
            f"unexpected keys {short_list(unexpected)}"
        )
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
           if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{where}: tensor shapes disagree with the {config.variant or 'custom'} config: {short_list(bad)}")
    model.to_empty(device="cpu")
    if plain_sam:
        model.hq_enabled = False
        state = {**{k: torch.zeros_like(v) for k, v in model.state_dict().items() if is_hq_parameter(k)}, **state}
    load_weights(model, state, mapped, low_memory)
    for m in model.modules():
        if hasattr(m, "init_buffers"):
            m.init_buffers()
    model = model.eval().to(device=device or "cpu", dtype=torch.float32)
    if dtype is not None and dtype != torch.float32:  # low precision where the time is; the small decoder stays fp32
        model.vision_encoder.to(dtype)
    return model


def load_weights(model, state: dict, mapped, low_memory: bool) -> None:
    """Put `state` (keys and shapes checked) into `model` (materialised with `to_empty`), floating-point tensors as
    float32 (a float32 tensor, mapped or not, is used as it is); both generations' loaders end here. With
    low_memory the image encoder's mapped tensors become its weights and their pages are handed back after each
    use (`low_memory.install`); the rest, small and what fine-tuning changes, are copied. Otherwise everything is
    copied (`_copy_weights`)."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if not low_memory:
        _copy_weights(model, state, mapped)
        return
    model.load_state_dict({k: v if k.startswith("vision_encoder.") else v.clone() for k, v in state.items()}, assign=True)
    low_memory_weights.install(model.vision_encoder, mapped)
    model.low_memory = True


def _copy_weights(model, state: dict, mapped, chunk_bytes: int = 1 << 26) -> None:
    """Copy `state` (keys and shapes already checked) into the model about 64 MB at a time, handing each chunk's file
    pages back once copied (`mapped`), so the file and the model are not both resident: loading ViT-H's 2.5 GB takes
    2.5 GB, not twice that."""
    expected = model.state_dict()
    if set(expected) != set(state):  # as load_state_dict(strict=True) would, which the chunks cannot be
        raise CheckpointError(f"weights do not match the model: missing {short_list(k for k in expected if k not in state)}; "
                              f"unexpected {short_list(k for k in state if k not in expected)}")
    chunk, size = {}, 0
    for i, (k, v) in enumerate(state.items()):
        chunk[k] = v
        size += v.numel() * v.element_size()
        if size >= chunk_bytes or i == len(state) - 1:
            model.load_state_dict(chunk, strict=False)
            if mapped is not None:
                mapped.release(chunk.values())
            chunk, size = {}, 0
