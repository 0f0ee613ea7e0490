"""Import the official `segment_anything_hq` package as a test oracle.

The official code imports torchvision (resize, batched_nms) and timm (TinyViT helpers), neither
of which has a CPU build usable here. This module registers small stand-ins for exactly those
names before importing it. They live in the tests only; the library never uses them.
"""
import contextlib
import math
import sys
import types

import numpy as np
import torch
from PIL import Image


def _resize(img, size):
    # torchvision's resize on a PIL image with a (h, w) size is PIL's bilinear resize.
    h, w = size
    return img.resize((w, h), Image.BILINEAR)


def _to_pil_image(arr):
    return Image.fromarray(np.asarray(arr))


def _box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _nms(boxes, scores, thresh):
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = boxes.double()
    keep = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    area = _box_area(boxes)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        lt = torch.maximum(boxes[i, :2], boxes[:, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        iou = inter / (area[i] + area - inter)
        suppressed |= iou > thresh
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)  # on the boxes' device, as torchvision's


def _batched_nms(boxes, scores, idxs, iou_threshold):
    # same signature as torchvision.ops.boxes.batched_nms (the official generator passes iou_threshold=)
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return _nms(boxes + offsets[:, None], scores, iou_threshold)


def _trunc_normal_(t, std=1.0, **kw):
    return torch.nn.init.trunc_normal_(t, std=std)


class _DropPath(torch.nn.Module):
    def __init__(self, drop_prob=None):
        super().__init__()

    def forward(self, x):
        return x


def _stand_ins() -> dict:
    mods = {}
    for name in [
        "torchvision", "torchvision.ops", "torchvision.ops.boxes", "torchvision.transforms",
        "torchvision.transforms.functional", "timm", "timm.models", "timm.models.layers",
        "timm.models.registry",
    ]:
        mods[name] = types.ModuleType(name)
    mods["torchvision.ops.boxes"].batched_nms = _batched_nms
    mods["torchvision.ops.boxes"].box_area = _box_area
    mods["torchvision.transforms.functional"].resize = _resize
    mods["torchvision.transforms.functional"].to_pil_image = _to_pil_image
    mods["timm.models.layers"].DropPath = _DropPath
    mods["timm.models.layers"].to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    mods["timm.models.layers"].trunc_normal_ = _trunc_normal_
    mods["timm.models.registry"].register_model = lambda fn: fn
    return mods


def load_official():
    """Return the `segment_anything_hq` module, or None when it is not installed."""
    try:
        import importlib.util

        if importlib.util.find_spec("segment_anything_hq") is None:
            return None
    except ValueError:
        return None
    if "segment_anything_hq" in sys.modules:
        return sys.modules["segment_anything_hq"]
    with stand_ins_while_importing(_stand_ins()):
        import segment_anything_hq
    return segment_anything_hq


@contextlib.contextmanager
def stand_ins_while_importing(mods: dict):
    """Put stand-in modules {name: module} into sys.modules for the duration of an import, then restore what was there.

    A reference binds the names when it imports, so the stand-ins need be visible only then; afterwards other
    libraries (transformers) still see that the real torchvision and timm are absent."""
    saved = {name: sys.modules.get(name) for name in mods}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def perturb_(module, seed=0, scale=0.05):
    """Give every parameter and buffer a non-trivial random value (BN stats kept positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or name in ("pixel_mean", "pixel_std"):
                continue
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
            if name.endswith("running_var"):
                t.copy_(1.0 + noise.abs() * 0.5)
            elif name.endswith(("weight",)) and t.ndim == 1:  # norms: keep near one
                t.copy_(1.0 + noise * 0.2)
            else:
                fan = t[0].numel() if t.ndim > 1 else 1
                t.copy_(noise * max(scale, 1.0 / math.sqrt(fan)) if t.ndim > 1 else noise * scale)
    return module


def official_from_ours(model):
    """An official `Sam` with our model's architecture (any ViT config or vit_tiny) and its weights.

    Used to compare whole pipelines (predictor, post-processing) on configs the official registry
    has no builder for, such as small test ViTs with a smaller image size.
    """
    from functools import partial

    from samhq.checkpoints import ours_to_official
    from samhq.config import SamHQTinyViTConfig

    sah = load_official()
    cfg = model.config
    v, p, d = cfg.vision_config, cfg.prompt_encoder_config, cfg.mask_decoder_config
    m = sah.modeling
    if isinstance(v, SamHQTinyViTConfig):
        official = sah.sam_model_registry["vit_tiny"]()
    else:
        grid = v.image_size // v.patch_size
        official = m.Sam(
            image_encoder=m.ImageEncoderViT(
                img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.hidden_size, depth=v.num_hidden_layers,
                num_heads=v.num_attention_heads, mlp_ratio=v.mlp_dim / v.hidden_size, out_chans=v.output_channels,
                qkv_bias=v.qkv_bias, norm_layer=partial(torch.nn.LayerNorm, eps=v.layer_norm_eps),
                use_abs_pos=v.use_abs_pos, use_rel_pos=v.use_rel_pos, window_size=v.window_size,
                global_attn_indexes=v.global_attn_indexes,
            ),
            prompt_encoder=m.PromptEncoder(
                embed_dim=p.hidden_size, image_embedding_size=(grid, grid),
                input_image_size=(p.image_size, p.image_size), mask_in_chans=p.mask_input_channels,
            ),
            mask_decoder=m.MaskDecoderHQ(
                num_multimask_outputs=d.num_multimask_outputs,
                transformer=m.TwoWayTransformer(depth=d.num_hidden_layers, embedding_dim=d.hidden_size,
                                                mlp_dim=d.mlp_dim, num_heads=d.num_attention_heads),
                transformer_dim=d.hidden_size, iou_head_depth=d.iou_head_depth,
                iou_head_hidden_dim=d.iou_head_hidden_dim, vit_dim=d.vit_dim,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    result = official.load_state_dict(ours_to_official(model.state_dict()), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(".head." in k or "norm_head" in k for k in result.missing_keys), result.missing_keys
    return official.eval()  # eval() also refreshes TinyViT's cached attention biases


def official_like(model):
    """An official `Sam` (ViT encoder, HQ decoder) with the shape of our `model`'s config, holding its weights.

    Lets parity tests run on small configs (narrow ViT, image_size 256) the official registry has no
    builder for. Returns None when the official package is not installed.
    """
    from functools import partial

    from samhq.checkpoints import ours_to_official

    sah = load_official()
    if sah is None:
        return None
    m = sah.modeling
    v, p, d = model.config.vision_config, model.config.prompt_encoder_config, model.config.mask_decoder_config
    grid = v.image_size // v.patch_size
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.hidden_size, depth=v.num_hidden_layers,
            num_heads=v.num_attention_heads, mlp_ratio=v.mlp_ratio, out_chans=v.output_channels, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_abs_pos=v.use_abs_pos, use_rel_pos=v.use_rel_pos,
            window_size=v.window_size, global_attn_indexes=tuple(v.global_attn_indexes),
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=p.hidden_size, image_embedding_size=(grid, grid), input_image_size=(v.image_size, v.image_size),
            mask_in_chans=p.mask_input_channels,
        ),
        mask_decoder=m.MaskDecoderHQ(
            num_multimask_outputs=d.num_multimask_outputs,
            transformer=m.TwoWayTransformer(depth=d.num_hidden_layers, embedding_dim=d.hidden_size, mlp_dim=d.mlp_dim,
                                            num_heads=d.num_attention_heads),
            transformer_dim=d.hidden_size, iou_head_depth=d.iou_head_depth, iou_head_hidden_dim=d.iou_head_hidden_dim,
            vit_dim=d.vit_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.load_state_dict(ours_to_official(model.state_dict()))
    return sam.eval()
