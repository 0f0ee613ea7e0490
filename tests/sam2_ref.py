"""Meta's `sam2` package (PyPI sam2==1.1.0) as a test oracle, and small SAM 2 models built with it.

sam2 imports torchvision (transforms Resize/Normalize/ToTensor; ops batched_nms/box_area), which
has no CPU build usable with our CPU torch. This module registers small stand-ins for exactly those
names while sam2 imports (they live in the tests only). Its `SAM2Transforms` scripts
`nn.Sequential(Resize, Normalize)` with `torch.jit.script`; the stand-ins are plain modules with
typed forwards, so that works unchanged.

The HQ-SAM 2 sources (SysCV/sam-hq's `sam-hq2/`) are not on PyPI and their package is also named
`sam2`. `load_official_hq()` loads their `mask_hq_decoder.py`, `sam2_hq_base.py` and
`sam2_image_predictor.py` by path (from $SAMHQ2_OFFICIAL, the `sam-hq2` directory) on top of the
installed `sam2`, whose other modules they share unchanged.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from official_ref import _batched_nms, _box_area, stand_ins_while_importing


class ToTensor:
    """torchvision's ToTensor for an HWC uint8 array or a PIL image: CHW float in [0, 1]."""

    def __call__(self, pic):
        arr = np.asarray(pic)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div(255)


class Resize(nn.Module):
    """torchvision's Resize((h, w)) on a float CHW tensor: bilinear with antialias (its tensor default)."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = [int(size[0]), int(size[1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]


class Normalize(nn.Module):
    """torchvision's Normalize(mean, std) on a CHW tensor."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _stand_ins() -> dict:
    mods = {name: types.ModuleType(name) for name in
            ["torchvision", "torchvision.ops", "torchvision.ops.boxes", "torchvision.transforms"]}
    mods["torchvision.ops.boxes"].batched_nms = _batched_nms
    mods["torchvision.ops.boxes"].box_area = _box_area
    mods["torchvision.transforms"].Resize = Resize
    mods["torchvision.transforms"].Normalize = Normalize
    mods["torchvision.transforms"].ToTensor = ToTensor
    return mods


def load_sam2():
    """The `sam2` package with its image predictor and generator imported, or None when it (or hydra) is missing."""
    try:
        if importlib.util.find_spec("sam2") is None or importlib.util.find_spec("hydra") is None:
            return None
    except ValueError:
        return None
    if "sam2.sam2_image_predictor" in sys.modules:
        return sys.modules["sam2"]
    with stand_ins_while_importing(_stand_ins()):
        import sam2
        import sam2.automatic_mask_generator  # noqa: F401
        import sam2.build_sam  # noqa: F401
        import sam2.sam2_image_predictor  # noqa: F401
    return sam2


def build_sam2_image_model(hiera: dict, image_size: int = 1024, d_model: int = 256, base_class=None, **base_kwargs):
    """A `SAM2Base` (or `base_class`, e.g. HQ-SAM 2's SAM2HQBase) from sam2's own classes, without video modules.

    hiera: Hiera's keyword arguments (embed_dim, num_heads, stages, global_att_blocks, window_spec,
    window_pos_embed_bkg_spatial_size). Everything else is SAM 2.1's image configuration, with
    Meta's image-predictor overrides (dynamic multimask via stability, delta 0.05, thresh 0.98).
    """
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine
    from sam2.modeling.sam2_base import SAM2Base

    trunk = Hiera(**hiera)
    neck = FpnNeck(position_encoding=PositionEmbeddingSine(num_pos_feats=d_model, normalize=True, temperature=10000),
                   d_model=d_model, backbone_channel_list=trunk.channel_list, fpn_top_down_levels=[2, 3],
                   fpn_interp_model="nearest")
    kwargs = dict(
        image_size=image_size, directly_add_no_mem_embed=True, use_high_res_features_in_sam=True,
        multimask_output_in_sam=True, iou_prediction_use_sigmoid=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True, use_obj_ptrs_in_encoder=False,
        sam_mask_decoder_extra_args=dict(dynamic_multimask_via_stability=True, dynamic_multimask_stability_delta=0.05,
                                         dynamic_multimask_stability_thresh=0.98),
    )
    kwargs.update(base_kwargs)
    base = base_class or SAM2Base
    return base(ImageEncoder(trunk=trunk, neck=neck, scalp=1), memory_attention=None, memory_encoder=None, **kwargs).eval()


def load_official_hq():
    """SysCV's HQ-SAM 2 modules from $SAMHQ2_OFFICIAL (the `sam-hq2` directory): (MaskDecoderHQ, SAM2HQBase,
    SAM2ImagePredictor), or None when the variable is unset, or the files or `sam2` are missing."""
    root = os.environ.get("SAMHQ2_OFFICIAL")
    if not root or load_sam2() is None:
        return None
    files = {name: Path(root) / "sam2" / rel for name, rel in [
        ("sam2.modeling.sam.mask_hq_decoder", "modeling/sam/mask_hq_decoder.py"),
        ("sam2.modeling.sam2_hq_base", "modeling/sam2_hq_base.py"),
        ("samhq2_official_image_predictor", "sam2_image_predictor.py"),
    ]}
    if not all(p.is_file() for p in files.values()):
        return None
    loaded = {}
    for name, path in files.items():
        if name in sys.modules:
            loaded[name] = sys.modules[name]
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        loaded[name] = module
    return (loaded["sam2.modeling.sam.mask_hq_decoder"].MaskDecoderHQ, loaded["sam2.modeling.sam2_hq_base"].SAM2HQBase,
            loaded["samhq2_official_image_predictor"].SAM2ImagePredictor)


# Small test models: each Hiera size's structure (stages, heads, windows, global blocks, position
# embedding) at a narrow width and a 256-pixel input (16 x 16 image embedding, 64 x 64 masks).
SMALL_IMAGE_SIZE = 256


def small_hiera(variant: str) -> dict:
    """Hiera keyword arguments of a SAM 2.1 preset with the width cut to 8 channels per head."""
    from samhq.config_sam2 import SAM2_VARIANTS

    preset = dict(SAM2_VARIANTS[variant])
    preset["embed_dim"] = 8 * preset["num_heads"]
    return preset


def our_config(hiera: dict, image_size: int = SMALL_IMAGE_SIZE, **decoder):
    """The SamHQ2Config matching `build_sam2_image_model(hiera, image_size)`."""
    from samhq.config_sam2 import SamHQ2Config, SamHQ2HieraConfig, SamHQ2MaskDecoderConfig, SamHQ2PromptEncoderConfig

    return SamHQ2Config(vision_config=SamHQ2HieraConfig(**hiera, image_size=image_size),
                        prompt_encoder_config=SamHQ2PromptEncoderConfig(image_size=image_size),
                        mask_decoder_config=SamHQ2MaskDecoderConfig(**decoder))


def save_official(ref, directory, config=None, extra=None) -> Path:
    """Write `ref`'s state dict (+ `extra` tensors) as an official `.pt` in `directory`, with our config.json when given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {**ref.state_dict(), **(extra or {})}}, directory / "model.pt")
    if config is not None:
        config.to_json_file(directory / "config.json")
    return directory


def official_hq_tensors(dim: int = 256, seed: int = 5) -> dict:
    """Random HQ-SAM 2 tensors under the official names, shaped as sam-hq2's MaskDecoderHQ makes them."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "sam_mask_decoder.hf_token.weight": (1, dim),
        "sam_mask_decoder.hf_mlp.layers.0.weight": (dim, dim), "sam_mask_decoder.hf_mlp.layers.0.bias": (dim,),
        "sam_mask_decoder.hf_mlp.layers.1.weight": (dim, dim), "sam_mask_decoder.hf_mlp.layers.1.bias": (dim,),
        "sam_mask_decoder.hf_mlp.layers.2.weight": (dim // 8, dim), "sam_mask_decoder.hf_mlp.layers.2.bias": (dim // 8,),
        "sam_mask_decoder.embedding_maskfeature.0.weight": (dim // 4, dim // 8, 3, 3),
        "sam_mask_decoder.embedding_maskfeature.0.bias": (dim // 4,),
        "sam_mask_decoder.embedding_maskfeature.1.weight": (dim // 4,),
        "sam_mask_decoder.embedding_maskfeature.1.bias": (dim // 4,),
        "sam_mask_decoder.embedding_maskfeature.3.weight": (dim // 8, dim // 4, 3, 3),
        "sam_mask_decoder.embedding_maskfeature.3.bias": (dim // 8,),
    }
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if name.endswith("maskfeature.1.weight"):
            t = 1 + 0.2 * t
        elif len(shape) > 1:
            t = t / (torch.tensor(shape[1:]).prod().sqrt())
        else:
            t = 0.05 * t
        out[name] = t
    return out


# Shared by the SAM 2 tests: tolerance, error measure, inputs, preprocessing and prompts.
TOL = 1e-4


def rel_err(a, b, floor=1e-12):
    """max |a - b| / max |b|; `floor` bounds the denominator below (IoU and object scores live on a unit scale)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(floor)).item()


def random_image(h, w, seed):
    """A random RGB uint8 image (h, w, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def our_pixels(image: np.ndarray, size: int) -> torch.Tensor:
    """SAM 2's preprocessing, restated: to [0, 1], square bilinear resize with antialias, ImageNet mean/std."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def prompts(size):
    """Named prompts in the `size`-pixel input frame.

    points/labels (P, N, 2)/(P, N), boxes (P, 4), masks (P, 1, size/4, size/4).
    """
    s = size / 256  # prompts are drawn in a 256-pixel frame and scaled to the input frame
    g = torch.Generator().manual_seed(4)
    pts = torch.tensor([[[30.0, 60.0], [150.0, 140.0], [230.0, 10.0]]]) * s
    box = torch.tensor([[15.0, 20.0, 175.0, 205.0]]) * s
    mask = torch.randn(1, 1, size // 4, size // 4, generator=g) * 4
    many = torch.tensor([[[30.0, 60.0], [200.0, 40.0]], [[150.0, 140.0], [10.0, 250.0]], [[90.0, 90.0], [120.0, 30.0]]]) * s
    return {
        "points": dict(points=(pts, torch.tensor([[1, 0, 1]]))),
        "one_point": dict(points=(pts[:, :1], torch.tensor([[1]]))),
        "box": dict(boxes=box),
        "box_and_point": dict(points=(pts[:, 1:2], torch.tensor([[0]])), boxes=box),
        "mask_and_point": dict(points=(pts[:, :1], torch.tensor([[1]])), masks=mask),
        "mask_only": dict(masks=mask),
        "three_prompts": dict(points=(many, torch.tensor([[1, 0], [1, 1], [1, 0]]))),
        "three_boxes": dict(boxes=torch.cat([box, box * 0.5, box * 0.5 + 60 * s])),
    }


class _CpuLinspace:
    """`torch` as sam2's hieradet module sees it, except that linspace runs on the CPU (Hiera calls .item() on it)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def linspace(*args, **kwargs):
        return torch.linspace(*args, **{**kwargs, "device": "cpu"})


def meta_state(config_name: str) -> dict:
    """The state dict (meta tensors: names and shapes) of Meta's full model from one of sam2's YAML configs,
    e.g. "configs/sam2.1/sam2.1_hiera_l.yaml", with its video modules, built on the meta device."""
    from hydra import compose
    from hydra.utils import instantiate
    from sam2.modeling.backbones import hieradet

    cfg = compose(config_name=config_name)
    saved, hieradet.torch = hieradet.torch, _CpuLinspace()
    try:
        with torch.device("meta"):
            model = instantiate(cfg.model, _recursive_=True)
    finally:
        hieradet.torch = saved
    return model.state_dict()


def small_model(variant: str = "hiera_t", hq: bool = True, image_size: int = SMALL_IMAGE_SIZE, seed: int = 1, **decoder):
    """Our `SamHQ2Model` at a small config (`small_hiera(variant)`, `image_size` px), every weight perturbed, in eval
    mode; `hq=False` turns the HQ parts off as a plain SAM 2 checkpoint does. Needs no `sam2`."""
    from samhq.modeling.sam2 import SamHQ2Model

    from official_ref import perturb_

    model = perturb_(SamHQ2Model(our_config(small_hiera(variant), image_size, **decoder)), seed=seed).eval()
    model.hq_enabled = hq
    return model


def connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Test stand-in for sam2's CUDA `get_connected_components` (8-connectivity), with scipy: mask (N, 1, H, W)
    -> labels (0 = outside every component) and each pixel's component area (0 outside), both int32 (N, 1, H, W)."""
    from scipy import ndimage

    m = mask.cpu().numpy().astype(bool)
    labels, areas = np.zeros(m.shape, np.int32), np.zeros(m.shape, np.int32)
    for i in range(m.shape[0]):
        lab, n = ndimage.label(m[i, 0], structure=np.ones((3, 3), bool))
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        sizes[0] = 0
        labels[i, 0], areas[i, 0] = lab, sizes[lab]
    return torch.from_numpy(labels).to(mask.device), torch.from_numpy(areas).to(mask.device)


def meta_pair(tmp, variant: str = "hiera_t", image_size: int = SMALL_IMAGE_SIZE, hq: bool = False, seed: int = 1,
              edit=None):
    """Meta's `SAM2Base` at a small config with perturbed weights, and our model loaded from its official `.pt`
    (in `tmp`). hq: add random HQ-SAM 2 tensors to the file and give Meta's decoder SysCV's HQ computation
    (`hq_decoder_stand_in`). edit(ref): change Meta's weights before saving. Returns (ref, ours, path)."""
    from samhq.modeling.sam2 import load_sam2_model

    from official_ref import perturb_

    hiera = small_hiera(variant)
    torch.manual_seed(0)
    ref = perturb_(build_sam2_image_model(hiera, image_size=image_size), seed=seed)
    if edit is not None:
        with torch.no_grad():
            edit(ref)
    tensors = official_hq_tensors() if hq else None
    path = save_official(ref, tmp, our_config(hiera, image_size), extra=tensors)
    if hq:
        hq_decoder_stand_in(ref.sam_mask_decoder, tensors)
    return ref, load_sam2_model(path), path


def hq_decoder_stand_in(decoder, tensors: dict) -> None:
    """Make Meta's `MaskDecoder` compute SysCV's `MaskDecoderHQ.forward` (hq_token_only=False, as SysCV's predictor
    and generator call it): every token's masks by HQ-SAM 2's `predict_masks`, the SAM selection (token order with
    multimask, the stability fallback without) and the HQ mask added. Test-only, on the module instance."""
    from sam2.modeling.sam2_utils import MLP, LayerNorm2d

    dim = tensors["sam_mask_decoder.hf_token.weight"].shape[1]
    hq = nn.ModuleDict(dict(
        hf_token=nn.Embedding(1, dim),
        hf_mlp=MLP(dim, dim, dim // 8, 3),
        embedding_maskfeature=nn.Sequential(nn.Conv2d(dim // 8, dim // 4, 3, 1, 1), LayerNorm2d(dim // 4), nn.GELU(),
                                            nn.Conv2d(dim // 4, dim // 8, 3, 1, 1)),
    ))
    hq.load_state_dict({k[len("sam_mask_decoder."):]: v for k, v in tensors.items()})
    hq.eval()
    dec = decoder

    def forward(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output,
                repeat_image, high_res_features=None):
        n = sparse_prompt_embeddings.shape[0]
        hq.to(image_embeddings.device)  # not a registered submodule: the decoder's .to() leaves it behind
        out_tokens = torch.cat([dec.obj_score_token.weight, dec.iou_token.weight, dec.mask_tokens.weight, hq.hf_token.weight])
        tokens = torch.cat([out_tokens[None].expand(n, -1, -1), sparse_prompt_embeddings], dim=1)
        src = (image_embeddings.repeat_interleave(n, 0) if repeat_image else image_embeddings) + dense_prompt_embeddings
        hs, keys = dec.transformer(src, image_pe.repeat_interleave(src.shape[0], 0), tokens)
        b, c, h, w = src.shape
        conv1, norm, act1, conv2, act2 = dec.output_upscaling
        feat_s0, feat_s1 = high_res_features
        up = act1(norm(conv1(keys.transpose(1, 2).reshape(b, c, h, w)) + feat_s1))
        up = act2(conv2(up) + feat_s0)
        hyper = torch.stack([dec.output_hypernetworks_mlps[i](hs[:, 2 + i]) for i in range(4)], dim=1)
        masks = (hyper @ up.flatten(2)).view(b, 4, *up.shape[-2:])
        hq_mask = (hq.hf_mlp(hs[:, 6])[:, None] @ hq.embedding_maskfeature(up).flatten(2)).view(b, 1, *up.shape[-2:])
        iou = dec.iou_prediction_head(hs[:, 1])  # its MLP applies the sigmoid (sigmoid_output)
        if multimask_output:
            sam, scores = masks[:, 1:], iou[:, 1:]
        else:
            sam, scores = dec._dynamic_multimask_via_stability(masks, iou)
        return sam + hq_mask, scores, hs[:, 2:6], dec.pred_obj_score_head(hs[:, 0])

    dec.forward = forward


def meta_predictor(ref, image_size: int = SMALL_IMAGE_SIZE, **kwargs):
    """Meta's `SAM2ImagePredictor` over `ref`, with its backbone feature sizes set for `image_size`."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    p = SAM2ImagePredictor(ref, **kwargs)
    p._bb_feat_sizes = [(image_size // 4,) * 2, (image_size // 8,) * 2, (image_size // 16,) * 2]
    return p
