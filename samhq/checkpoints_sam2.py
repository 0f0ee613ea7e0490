"""SAM 2 / SAM 2.1 / HQ-SAM 2 checkpoints as state dicts: Meta's official `.pt`, transformers' `Sam2Model`
directory layout, and our own parameter names. Nothing here builds a model.

- Official (Meta's `sam2.1_hiera_{tiny,small,base_plus,large}.pt`, SAM 2.0's `sam2_hiera_*.pt`,
  SysCV's `sam2.1_hq_hiera_large.pt`): `{"model": state_dict}` with `image_encoder.trunk.*`,
  `sam_prompt_encoder.*`, `sam_mask_decoder.*` (HQ: `hf_token`, `hf_mlp`, `embedding_maskfeature`)
  and the video modules' tensors.
- transformers (`Sam2Model.save_pretrained`): `config.json` (model_type "sam2") + `model.safetensors`
  with `vision_encoder.backbone.*`, `prompt_encoder.*`, `mask_decoder.*`, `no_memory_embedding`.
- Ours (`SamHQ2Model.state_dict()`): transformers' names, except where the modules are shared with
  SAM-HQ v1 (`samhq.modeling.two_way_transformer`: `out_proj`, `mlp.lin1/lin2`;
  `samhq.modeling.prompt_encoder`: `point_embed.N`), plus the HQ parts under SAM-HQ's
  transformers names (`hq_token`, `hq_mask_mlp`, `mask_conv1/mask_norm/mask_conv2`).

Video tensors (official: `memory_attention.*`, `memory_encoder.*`, `maskmem_tpos_enc`,
`no_mem_pos_enc`, `no_obj_ptr`, `obj_ptr_proj.*`, `obj_ptr_tpos_proj.*`, `mask_downsample.*`,
`no_obj_embed_spatial`; transformers: the keys `Sam2Model` ignores, `memory_*`,
`object_pointer_proj.*`, ...) are not part of the image model: readers return them separately,
under the names of the layout they came in, so that the video model (issue 19) can take them and
a writer of the same layout can put them back. Renaming them between layouts is issue 19's.

Files are read with `torch.load(weights_only=True)` or safetensors only: nothing runs code.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import (  # noqa: F401 - is_sam2_checkpoint re-exported
    CheckpointError,
    _refuse_overwrite,
    is_hq_parameter,
    is_sam2_checkpoint,
    read_state_file,
    resolve_source,
    sam2_layout,
    short_list,
    write_replacing,
)
from .config_sam2 import (
    SAM2_VARIANTS,
    SamHQ2Config,
    SamHQ2HieraConfig,
    SamHQ2MaskDecoderConfig,
    SamHQ2PromptEncoderConfig,
    SamHQ2VideoConfig,
)

VIDEO_KEYS = re.compile(
    r"^(memory_attention\.|memory_encoder\.|maskmem_tpos_enc$|no_mem_pos_enc$|no_obj_ptr$|obj_ptr_proj\.|"
    r"obj_ptr_tpos_proj\.|mask_downsample\.|no_obj_embed_spatial$)"
)
# The same tensors under transformers' `Sam2VideoModel` names (hub checkpoints carry them; Sam2Model ignores them).
TRANSFORMERS_VIDEO_KEYS = re.compile(
    r"^(memory_|mask_downsample\.|object_pointer_proj\.|temporal_positional_encoding_projection_layer\.|"
    r"no_memory_positional_encoding$|no_object_pointer$|occlusion_spatial_embedding_parameter$)"
)
TIED = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")

# (official, ours) name prefixes, most specific first; `#` stands for a number.
_OFFICIAL_RULES = [
    ("image_encoder.trunk.patch_embed.proj.", "vision_encoder.backbone.patch_embed.projection."),
    ("image_encoder.trunk.blocks.#.norm#.", "vision_encoder.backbone.blocks.#.layer_norm#."),
    ("image_encoder.trunk.", "vision_encoder.backbone."),
    ("image_encoder.neck.convs.#.conv.", "vision_encoder.neck.convs.#."),
    ("sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "shared_image_embedding.positional_embedding"),
    ("sam_prompt_encoder.point_embeddings.", "prompt_encoder.point_embed."),
    ("sam_prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("sam_prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("sam_prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("sam_prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("sam_prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("sam_prompt_encoder.", "prompt_encoder."),
    ("sam_mask_decoder.transformer.layers.#.norm#.", "mask_decoder.transformer.layers.#.layer_norm#."),
    ("sam_mask_decoder.transformer.layers.#.mlp.layers.0.", "mask_decoder.transformer.layers.#.mlp.lin1."),
    ("sam_mask_decoder.transformer.layers.#.mlp.layers.1.", "mask_decoder.transformer.layers.#.mlp.lin2."),
    ("sam_mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("sam_mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("sam_mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("sam_mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    ("sam_mask_decoder.hf_token.", "mask_decoder.hq_token."),
    ("sam_mask_decoder.hf_mlp.", "mask_decoder.hq_mask_mlp."),
    ("sam_mask_decoder.embedding_maskfeature.0.", "mask_decoder.mask_conv1."),
    ("sam_mask_decoder.embedding_maskfeature.1.", "mask_decoder.mask_norm."),
    ("sam_mask_decoder.embedding_maskfeature.3.", "mask_decoder.mask_conv2."),
    ("sam_mask_decoder.", "mask_decoder."),
    ("no_mem_embed", "no_memory_embedding"),
]
# (transformers, ours): the names of the modules shared with SAM-HQ v1.
_TRANSFORMERS_RULES = [
    ("mask_decoder.transformer.layers.#.self_attn.o_proj.", "mask_decoder.transformer.layers.#.self_attn.out_proj."),
    ("mask_decoder.transformer.layers.#.cross_attn_token_to_image.o_proj.",
     "mask_decoder.transformer.layers.#.cross_attn_token_to_image.out_proj."),
    ("mask_decoder.transformer.layers.#.cross_attn_image_to_token.o_proj.",
     "mask_decoder.transformer.layers.#.cross_attn_image_to_token.out_proj."),
    ("mask_decoder.transformer.final_attn_token_to_image.o_proj.",
     "mask_decoder.transformer.final_attn_token_to_image.out_proj."),
    ("mask_decoder.transformer.layers.#.mlp.proj_in.", "mask_decoder.transformer.layers.#.mlp.lin1."),
    ("mask_decoder.transformer.layers.#.mlp.proj_out.", "mask_decoder.transformer.layers.#.mlp.lin2."),
]
# Official MLPs (`layers.0..n-1`) that are `proj_in`, `layers.0..n-3`, `proj_out` in ours (official names).
_OFFICIAL_MLP = re.compile(
    r"^(sam_mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head|hf_mlp)"
    r"|image_encoder\.trunk\.blocks\.\d+\.mlp)\.layers\.(\d+)\.(.*)$"
)
_OUR_MLP = re.compile(
    r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head|hq_mask_mlp)"
    r"|vision_encoder\.backbone\.blocks\.\d+\.mlp)\.(proj_in|proj_out|layers\.\d+)\.(.*)$"
)


def _compile(rules, reverse: bool):
    out = []
    for a, b in rules:
        src, dst = (b, a) if reverse else (a, b)
        pattern = "^" + re.escape(src).replace("\\#", "#").replace("#", r"(\d+)")
        groups = iter(range(1, 10))
        out.append((re.compile(pattern), re.sub("#", lambda _, groups=groups: f"\\{next(groups)}", dst)))
    return out


_FROM_OFFICIAL, _TO_OFFICIAL = _compile(_OFFICIAL_RULES, False), _compile(_OFFICIAL_RULES, True)
_FROM_TRANSFORMERS, _TO_TRANSFORMERS = _compile(_TRANSFORMERS_RULES, False), _compile(_TRANSFORMERS_RULES, True)


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, name, count=1)
        if n:
            return new
    return name


def is_video_key(name: str) -> bool:
    """True for the official names of the video modules' tensors (kept aside by the image model)."""
    return bool(VIDEO_KEYS.match(name))


def official_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An official state dict -> (image model state in our names, video tensors under their official names)."""
    depths: dict[str, int] = {}
    for name in state:
        if m := _OFFICIAL_MLP.match(name):
            depths[m.group(1)] = max(depths.get(m.group(1), 0), int(m.group(2)) + 1)
    image, video = {}, {}
    for name, tensor in state.items():
        if is_video_key(name):
            video[name] = tensor
            continue
        if m := _OFFICIAL_MLP.match(name):
            prefix, i, tail = m.group(1), int(m.group(2)), m.group(3)
            sub = "proj_in" if i == 0 else "proj_out" if i == depths[prefix] - 1 else f"layers.{i - 1}"
            name = f"{_rename(prefix + '.', _FROM_OFFICIAL)}{sub}.{tail}"
        else:
            name = _rename(name, _FROM_OFFICIAL)
        image[name] = tensor
    if TIED[0] in image:
        image[TIED[1]] = image[TIED[0]]
    return image, video


def ours_to_official(state: dict[str, torch.Tensor],
                     video_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Our state dict (+ video tensors under official names) -> an official state dict (Meta's / sam-hq2's names)."""
    depths: dict[str, int] = {}
    for name in state:
        if (m := _OUR_MLP.match(name)) and m.group(2).startswith("layers."):
            depths[m.group(1)] = max(depths.get(m.group(1), 2), int(m.group(2).split(".")[1]) + 3)
    out = {}
    for name, tensor in state.items():
        if name == TIED[1]:
            continue
        if m := _OUR_MLP.match(name):
            prefix, sub, tail = m.groups()
            depth = depths.get(prefix, 2)
            i = 0 if sub == "proj_in" else depth - 1 if sub == "proj_out" else int(sub.split(".")[1]) + 1
            out[f"{_rename(prefix + '.', _TO_OFFICIAL)}layers.{i}.{tail}"] = tensor
        else:
            out[_rename(name, _TO_OFFICIAL)] = tensor
    out.update(video_state or {})
    return out


def transformers_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A transformers `Sam2Model` / `Sam2VideoModel` state dict (HQ tensors, if any, already in our names)
    -> (image model state in our names, video tensors under transformers' names)."""
    out, video = {}, {}
    for name, tensor in state.items():
        if TRANSFORMERS_VIDEO_KEYS.match(name):
            video[name] = tensor
            continue
        if name == "prompt_encoder.point_embed.weight":  # one (4, C) table -> four (1, C) embeddings
            for i, row in enumerate(tensor):
                out[f"prompt_encoder.point_embed.{i}.weight"] = row[None].clone()
            continue
        out[_rename(name, _FROM_TRANSFORMERS)] = tensor
    present = [out[k] for k in TIED if k in out]
    if len(present) == 2 and not present[0].is_meta and not torch.equal(*present):
        raise CheckpointError(f"{TIED[0]} and {TIED[1]} differ; SAM 2 has one random-feature matrix for both")
    if present:
        out[TIED[0]] = out[TIED[1]] = present[0]
    return out, video


def ours_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' `Sam2Model` names (the HQ tensors keep ours; video tensors are not handled here)."""
    out, points = {}, {}
    for name, tensor in state.items():
        if name == TIED[1]:  # transformers keeps two copies of the one matrix (two buffers)
            tensor = tensor.clone()
        if m := re.fullmatch(r"prompt_encoder\.point_embed\.(\d+)\.weight", name):
            points[int(m.group(1))] = tensor
            continue
        out[_rename(name, _TO_TRANSFORMERS)] = tensor
    if points:
        out["prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in sorted(points)])
    return out


def _layout(names) -> str:
    names = list(names)
    layout = sam2_layout(names)
    if layout is not None:
        return layout
    if any(n.startswith(("image_encoder.blocks.", "vision_encoder.layers.", "image_encoder.patch_embed.seq")) for n in names):
        return "sam_v1"
    return "unknown"


# ---------------------------------------------------------------------------------------------
# Configs: inferred from tensor shapes, or transformers' config.json


def _count(state, pattern) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    if not idx:
        raise KeyError(f"no tensors match {pattern!r}")
    return max(idx) + 1


def infer_config(state: dict[str, torch.Tensor], where: str = "checkpoint") -> SamHQ2Config:
    """The config of a state dict in our names, from its tensor shapes.

    Shapes give the widths, the stages and the decoder's options, but not Hiera's head counts,
    windows and global-attention blocks: those come from the SAM 2.1 preset with the same trunk
    (all of Meta's and SysCV's releases). Raises CheckpointError for a trunk no preset matches.
    """
    try:
        patch = state["vision_encoder.backbone.patch_embed.projection.weight"]
        depth = _count(state, r"vision_encoder\.backbone\.blocks\.(\d+)\.")
        starts = [i for i in range(depth) if f"vision_encoder.backbone.blocks.{i}.proj.weight" in state]
        bounds = [0, *starts, depth]
        stages = [b - a for a, b in zip(bounds, bounds[1:])]
        trunk = dict(embed_dim=patch.shape[0], stages=stages,
                     window_pos_embed_bkg_spatial_size=list(state["vision_encoder.backbone.pos_embed"].shape[-2:]))
        window0 = state["vision_encoder.backbone.pos_embed_window"].shape[-1]
        preset = next((p for p in SAM2_VARIANTS.values()
                       if all(p[k] == v for k, v in trunk.items()) and p["window_spec"][0] == window0), None)
        if preset is None:
            raise CheckpointError(
                f"{where}: a Hiera trunk with embed_dim {trunk['embed_dim']}, stages {stages} matches none of the SAM 2.1 "
                f"presets ({', '.join(SAM2_VARIANTS)}); its head counts, windows and global-attention blocks cannot be "
                "read from tensor shapes: save it with a config.json (SamHQ2Model.save_pretrained)"
            )
        d_model = state["vision_encoder.neck.convs.0.weight"].shape[0]
        vision = SamHQ2HieraConfig(**preset, d_model=d_model, num_channels=patch.shape[1], patch_kernel_size=patch.shape[-1],
                                   patch_padding=patch.shape[-1] // 2)
        decoder = SamHQ2MaskDecoderConfig(
            hidden_size=state["mask_decoder.iou_token.weight"].shape[1],
            mlp_dim=state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
            num_hidden_layers=_count(state, r"mask_decoder\.transformer\.layers\.(\d+)\."),
            num_multimask_outputs=state["mask_decoder.mask_tokens.weight"].shape[0] - 1,
            iou_head_depth=_count(state, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.") + 2
            if "mask_decoder.iou_prediction_head.layers.0.weight" in state else 2,
            iou_head_hidden_dim=state["mask_decoder.iou_prediction_head.proj_in.weight"].shape[0],
            use_high_res_features="mask_decoder.conv_s0.weight" in state,
            pred_obj_scores="mask_decoder.obj_score_token.weight" in state,
            pred_obj_scores_mlp="mask_decoder.pred_obj_score_head.proj_in.weight" in state,
        )
        prompt = SamHQ2PromptEncoderConfig(
            hidden_size=d_model, image_size=vision.image_size, patch_size=vision.backbone_stride,
            mask_input_channels=state["prompt_encoder.mask_embed.conv2.weight"].shape[0],
        )
        return SamHQ2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    except (KeyError, IndexError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where}: does not look like a SAM 2 / HQ-SAM 2 checkpoint ({e})") from None


# transformers' Sam2 code hard-wires these options; a config with other values has no transformers layout.
_TRANSFORMERS_FIXED = dict(use_high_res_features=True, iou_prediction_use_sigmoid=True, pred_obj_scores=True,
                           pred_obj_scores_mlp=True)


def config_from_transformers(data: dict) -> SamHQ2Config:
    """transformers' `Sam2Config` as a dict (its config.json) -> SamHQ2Config. Raises CheckpointError if it is not one."""
    if data.get("model_type") not in ("sam2", "sam2_video"):  # Sam2Model's, or Sam2VideoModel's (hub repositories)
        raise CheckpointError(f"config.json has model_type {data.get('model_type')!r}, expected 'sam2', 'sam2_video' or "
                              "'sam_hq2'")
    try:
        v = data.get("vision_config") or {}
        t = v.get("backbone_config") or {}
        dims, heads = t["embed_dim_per_stage"], t["num_attention_heads_per_stage"]
        vision = SamHQ2HieraConfig(
            embed_dim=t["hidden_size"], num_heads=t["num_attention_heads"], stages=t["blocks_per_stage"],
            global_att_blocks=t["global_attention_blocks"], window_spec=t["window_size_per_stage"],
            window_pos_embed_bkg_spatial_size=t["window_positional_embedding_background_size"],
            q_pool=t["num_query_pool_stages"], q_stride=t["query_stride"], dim_mul=dims[1] / dims[0],
            head_mul=heads[1] / heads[0],
            mlp_ratio=t["mlp_ratio"], layer_norm_eps=t["layer_norm_eps"], patch_kernel_size=_side(t["patch_kernel_size"]),
            patch_stride=_side(t["patch_stride"]), patch_padding=_side(t["patch_padding"]), num_channels=t["num_channels"],
            image_size=_side(t["image_size"]), d_model=v["fpn_hidden_size"], fpn_top_down_levels=v["fpn_top_down_levels"],
            scalp=len(t["blocks_per_stage"]) - v["num_feature_levels"],
        )
        if vision.stage_dims != list(dims) or vision.stage_heads != list(heads):
            raise ValueError(f"stage widths {dims} / heads {heads} do not grow geometrically")
        p, m = data.get("prompt_encoder_config") or {}, data.get("mask_decoder_config") or {}
        prompt = SamHQ2PromptEncoderConfig.from_dict(p)
        decoder = SamHQ2MaskDecoderConfig.from_dict({**m, **_TRANSFORMERS_FIXED})
        video = video_config_from_transformers(data) if data["model_type"] == "sam2_video" else None
        return SamHQ2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder, video_config=video)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"config.json is not a usable transformers Sam2Config ({type(e).__name__}: {e})") from None


def _side(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def config_to_transformers(config: SamHQ2Config) -> dict:
    """SamHQ2Config -> the dict transformers' `Sam2Config` saves (model_type "sam2").

    Raises CheckpointError for options transformers' Sam2 code does not have.
    """
    v, p, m = config.vision_config, config.prompt_encoder_config, config.mask_decoder_config
    fixed = {k: getattr(m, k) for k in _TRANSFORMERS_FIXED if getattr(m, k) != _TRANSFORMERS_FIXED[k]}
    if v.fpn_interp_model != "nearest" or v.fuse_type != "sum":
        fixed.update(fpn_interp_model=v.fpn_interp_model, fuse_type=v.fuse_type)
    if fixed:
        raise CheckpointError(f"transformers' Sam2Model has no layout for {fixed}; save in the official format instead")
    backbone = dict(
        model_type="sam2_hiera_det_model", hidden_size=v.embed_dim, num_attention_heads=v.num_heads,
        num_channels=v.num_channels, image_size=[v.image_size] * 2, patch_kernel_size=[v.patch_kernel_size] * 2,
        patch_stride=[v.patch_stride] * 2, patch_padding=[v.patch_padding] * 2, query_stride=list(v.q_stride),
        window_positional_embedding_background_size=list(v.window_pos_embed_bkg_spatial_size),
        num_query_pool_stages=v.q_pool, blocks_per_stage=list(v.stages), embed_dim_per_stage=v.stage_dims,
        num_attention_heads_per_stage=v.stage_heads, window_size_per_stage=list(v.window_spec),
        global_attention_blocks=list(v.global_att_blocks), mlp_ratio=v.mlp_ratio, hidden_act="gelu",
        layer_norm_eps=v.layer_norm_eps,
    )
    vision = dict(
        model_type="sam2_vision_model", backbone_config=backbone, backbone_channel_list=v.backbone_channel_list,
        backbone_feature_sizes=[[s, s] for s in v.feature_sizes], fpn_hidden_size=v.d_model, fpn_kernel_size=1,
        fpn_stride=1, fpn_padding=0, fpn_top_down_levels=list(v.fpn_top_down_levels),
        num_feature_levels=v.num_feature_levels, hidden_act="gelu", layer_norm_eps=1e-6,
    )
    prompt = dict(model_type="sam2_prompt_encoder", hidden_size=p.hidden_size, image_size=p.image_size,
                  patch_size=p.patch_size, mask_input_channels=p.mask_input_channels,
                  num_point_embeddings=p.num_point_embeddings, hidden_act="gelu", layer_norm_eps=p.layer_norm_eps, scale=1)
    decoder = dict(model_type="sam2_mask_decoder", hidden_act="gelu", **{
        k: getattr(m, k) for k in ("hidden_size", "mlp_dim", "num_hidden_layers", "num_attention_heads",
                                   "attention_downsample_rate", "num_multimask_outputs", "iou_head_depth",
                                   "iou_head_hidden_dim", "dynamic_multimask_via_stability",
                                   "dynamic_multimask_stability_delta", "dynamic_multimask_stability_thresh")})
    out = dict(model_type="sam2", architectures=["Sam2Model"], vision_config=vision, prompt_encoder_config=prompt,
               mask_decoder_config=decoder, initializer_range=0.02)
    if config.video_config is not None:
        out.update(video_config_to_transformers(config.video_config, v.d_model), model_type="sam2_video",
                   architectures=["Sam2VideoModel"], image_size=v.image_size)
    return out


# ---------------------------------------------------------------------------------------------
# The video modules: official names <-> ours (= transformers' Sam2VideoModel names), configs

# (official, ours) name prefixes; `#` stands for a number. The mask downsampler's Sequential indices and
# the object-pointer MLP's layers are renumbered by `_video_official_to_ours` / `_video_ours_to_official`.
_OFFICIAL_VIDEO_RULES = [
    ("maskmem_tpos_enc", "memory_temporal_positional_encoding"),
    ("no_mem_pos_enc", "no_memory_positional_encoding"),
    ("no_obj_ptr", "no_object_pointer"),
    ("no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),
    ("obj_ptr_tpos_proj.", "temporal_positional_encoding_projection_layer."),
    ("obj_ptr_proj.", "object_pointer_proj."),
    ("memory_attention.layers.#.self_attn.out_proj.", "memory_attention.layers.#.self_attn.o_proj."),
    ("memory_attention.layers.#.cross_attn_image.out_proj.", "memory_attention.layers.#.cross_attn_image.o_proj."),
    ("memory_attention.layers.#.norm#.", "memory_attention.layers.#.layer_norm#."),
    ("memory_attention.norm.", "memory_attention.layer_norm."),
    ("memory_encoder.pix_feat_proj.", "memory_encoder.feature_projection."),
    ("memory_encoder.out_proj.", "memory_encoder.projection."),
    ("memory_encoder.fuser.layers.#.gamma", "memory_encoder.memory_fuser.layers.#.scale"),
    ("memory_encoder.fuser.layers.#.dwconv.", "memory_encoder.memory_fuser.layers.#.depthwise_conv."),
    ("memory_encoder.fuser.layers.#.norm.", "memory_encoder.memory_fuser.layers.#.layer_norm."),
    ("memory_encoder.fuser.layers.#.pwconv1.", "memory_encoder.memory_fuser.layers.#.pointwise_conv1."),
    ("memory_encoder.fuser.layers.#.pwconv2.", "memory_encoder.memory_fuser.layers.#.pointwise_conv2."),
]
_FROM_OFFICIAL_VIDEO, _TO_OFFICIAL_VIDEO = _compile(_OFFICIAL_VIDEO_RULES, False), _compile(_OFFICIAL_VIDEO_RULES, True)
_DOWNSAMPLER_OFFICIAL = re.compile(r"^memory_encoder\.mask_downsampler\.encoder\.(\d+)\.(.*)$")
_DOWNSAMPLER_OURS = re.compile(r"^memory_encoder\.mask_downsampler\.(?:layers\.(\d+)\.(conv|layer_norm)|final_conv)\.(.*)$")
_PTR_MLP_OFFICIAL = re.compile(r"^obj_ptr_proj\.layers\.(\d+)\.(.*)$")
_PTR_MLP_OURS = re.compile(r"^object_pointer_proj\.(proj_in|proj_out|layers\.\d+)\.(.*)$")


def is_our_video_key(name: str) -> bool:
    """True for the video modules' parameter names in ours (= transformers') layout."""
    return bool(TRANSFORMERS_VIDEO_KEYS.match(name))


def _video_official_to_ours(video: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    convs = [int(m.group(1)) for k in video if (m := _DOWNSAMPLER_OFFICIAL.match(k)) and k.endswith(".weight")]
    final = max(convs, default=0)  # Sequential: conv, norm, GELU per layer, then the final 1x1 conv
    depth = 1 + max((int(m.group(1)) for k in video if (m := _PTR_MLP_OFFICIAL.match(k))), default=0)
    out = {}
    for name, tensor in video.items():
        if m := _DOWNSAMPLER_OFFICIAL.match(name):
            i, tail = int(m.group(1)), m.group(2)
            sub = "final_conv" if i == final else f"layers.{i // 3}.{'conv' if i % 3 == 0 else 'layer_norm'}"
            name = f"memory_encoder.mask_downsampler.{sub}.{tail}"
        elif m := _PTR_MLP_OFFICIAL.match(name):
            i, tail = int(m.group(1)), m.group(2)
            sub = "proj_in" if i == 0 else "proj_out" if i == depth - 1 else f"layers.{i - 1}"
            name = f"object_pointer_proj.{sub}.{tail}"
        else:
            name = _rename(name, _FROM_OFFICIAL_VIDEO)
        out[name] = tensor
    return out


def _video_ours_to_official(video: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layers = 1 + max((int(m.group(1)) for k in video if (m := _DOWNSAMPLER_OURS.match(k)) and m.group(1)), default=-1)
    depth = 2 + sum(1 for k in video if re.match(r"^object_pointer_proj\.layers\.\d+\.weight$", k))
    out = {}
    for name, tensor in video.items():
        if m := _DOWNSAMPLER_OURS.match(name):
            i, part, tail = m.groups()
            index = 3 * layers if i is None else 3 * int(i) + (0 if part == "conv" else 1)
            name = f"memory_encoder.mask_downsampler.encoder.{index}.{tail}"
        elif m := _PTR_MLP_OURS.match(name):
            sub, tail = m.groups()
            i = 0 if sub == "proj_in" else depth - 1 if sub == "proj_out" else int(sub.split(".")[1]) + 1
            name = f"obj_ptr_proj.layers.{i}.{tail}"
        else:
            name = _rename(name, _TO_OFFICIAL_VIDEO)
        out[name] = tensor
    return out


def video_to_ours(video: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Video tensors as a reader returns them (official or transformers names) -> our names."""
    return _video_official_to_ours(video) if layout == "official" else dict(video)


def video_from_ours(video: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Our video parameters -> the names of `layout` ("official" or "transformers")."""
    return _video_ours_to_official(video) if layout == "official" else dict(video)


def infer_video_config(video: dict[str, torch.Tensor], where: str = "checkpoint") -> SamHQ2VideoConfig:
    """The video config of video tensors in our names, from their shapes and which of them exist.

    Shapes give the memory size and width, the layer counts and kernel sizes; which tensors exist tells
    SAM 2.1 (temporal encoding of pointers, occlusion embedding) from SAM 2.0. The rest (heads, flags not
    visible in the tensors) are the release's. Raises CheckpointError when the tensors are incomplete.
    """
    try:
        tpos = video["memory_temporal_positional_encoding"]
        down = video["memory_encoder.mask_downsampler.layers.0.conv.weight"]
        dw = video["memory_encoder.memory_fuser.layers.0.depthwise_conv.weight"]
        stride = int(round(down.shape[0] ** 0.5))
        kernel = down.shape[-1]
        release = "sam2.1" if ("occlusion_spatial_embedding_parameter" in video
                               or "temporal_positional_encoding_projection_layer.weight" in video) else "sam2"
        return SamHQ2VideoConfig.from_release(
            release,
            num_maskmem=tpos.shape[0], mem_dim=tpos.shape[-1],
            mask_downsampler_kernel_size=kernel, mask_downsampler_stride=stride,
            mask_downsampler_padding=(kernel - stride + 1) // 2,
            mask_downsampler_total_stride=stride ** _count(video, r"memory_encoder\.mask_downsampler\.layers\.(\d+)\."),
            fuser_num_layers=_count(video, r"memory_encoder\.memory_fuser\.layers\.(\d+)\."),
            fuser_kernel_size=dw.shape[-1], fuser_padding=dw.shape[-1] // 2, fuser_use_dwconv=dw.shape[1] == 1,
            memory_attention_num_layers=_count(video, r"memory_attention\.layers\.(\d+)\."),
            memory_attention_dim_feedforward=video["memory_attention.layers.0.linear1.weight"].shape[0],
            memory_attention_downsample_rate=video["memory_attention.layers.0.self_attn.q_proj.weight"].shape[1]
            // video["memory_attention.layers.0.self_attn.q_proj.weight"].shape[0],
            use_obj_ptrs_in_encoder="mask_downsample.weight" in video,
            use_mlp_for_obj_ptr_proj="object_pointer_proj.proj_in.weight" in video,
            proj_tpos_enc_in_obj_ptrs="temporal_positional_encoding_projection_layer.weight" in video,
            no_obj_embed_spatial="occlusion_spatial_embedding_parameter" in video,
            fixed_no_obj_ptr="mask_downsample.weight" in video,
        )
    except (KeyError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: the video modules' tensors are incomplete or inconsistent "
                              f"({type(e).__name__}: {e})") from None


# transformers' Sam2VideoModel hard-wires these video settings.
_TRANSFORMERS_VIDEO_FIXED = dict(
    memory_temporal_stride_for_eval=1, binarize_mask_from_pts_for_mem_enc=True, non_overlap_masks_for_mem_enc=False,
    memory_attention_pos_enc_at_input=True, memory_attention_pos_enc_at_attn=False,
    memory_attention_pos_enc_at_cross_attn_keys=True, memory_attention_pos_enc_at_cross_attn_queries=False,
    use_obj_ptrs_in_encoder=True, only_obj_ptrs_in_the_past_for_eval=True,
    use_mlp_for_obj_ptr_proj=True, fixed_no_obj_ptr=True, soft_no_obj_ptr=False, directly_add_no_mem_embed=True,
    use_mask_input_as_output_without_sam=True, fuser_use_dwconv=True,
)
# (ours, transformers' Sam2VideoConfig) for the fields both have.
_VIDEO_FIELDS = [
    ("num_maskmem", "num_maskmem"), ("sigmoid_scale_for_mem_enc", "sigmoid_scale_for_mem_enc"),
    ("sigmoid_bias_for_mem_enc", "sigmoid_bias_for_mem_enc"), ("no_obj_embed_spatial", "enable_occlusion_spatial_embedding"),
    ("multimask_output_in_sam", "multimask_output_in_sam"), ("multimask_min_pt_num", "multimask_min_pt_num"),
    ("multimask_max_pt_num", "multimask_max_pt_num"), ("multimask_output_for_tracking", "multimask_output_for_tracking"),
    ("max_obj_ptrs_in_encoder", "max_object_pointers_in_encoder"), ("max_cond_frames_in_attn", "max_cond_frame_num"),
    ("memory_attention_num_layers", "memory_attention_num_layers"),
    ("memory_attention_num_heads", "memory_attention_num_attention_heads"),
    ("memory_attention_downsample_rate", "memory_attention_downsample_rate"),
    ("memory_attention_dim_feedforward", "memory_attention_feed_forward_hidden_size"),
    ("memory_attention_activation", "memory_attention_feed_forward_hidden_act"), ("mem_dim", "memory_encoder_output_channels"),
    ("mask_downsampler_kernel_size", "mask_downsampler_kernel_size"), ("mask_downsampler_stride", "mask_downsampler_stride"),
    ("mask_downsampler_padding", "mask_downsampler_padding"), ("mask_downsampler_total_stride", "mask_downsampler_total_stride"),
    ("fuser_num_layers", "memory_fuser_num_layers"), ("fuser_kernel_size", "memory_fuser_kernel_size"),
    ("fuser_padding", "memory_fuser_padding"), ("fuser_layer_scale_init_value", "memory_fuser_layer_scale_init_value"),
]


def video_config_from_transformers(data: dict) -> SamHQ2VideoConfig:
    """The video fields of transformers' `Sam2VideoConfig` (a config.json dict, model_type "sam2_video")."""
    fields = {ours: data[theirs] for ours, theirs in _VIDEO_FIELDS if theirs in data}
    tpos = bool(data.get("enable_temporal_pos_encoding_for_object_pointers", True))
    theta = (data.get("rope_parameters") or {}).get("rope_theta", data.get("memory_attention_rope_theta", 10000.0))
    return SamHQ2VideoConfig(**fields, add_tpos_enc_to_obj_ptrs=tpos, proj_tpos_enc_in_obj_ptrs=tpos,
                             use_signed_tpos_enc_to_obj_ptrs=tpos, rope_theta=float(theta))


def video_config_to_transformers(video: SamHQ2VideoConfig, hidden_size: int = 256) -> dict:
    """SamHQ2VideoConfig -> the video fields of transformers' `Sam2VideoConfig`. Raises CheckpointError for settings
    transformers' Sam2VideoModel does not have."""
    fixed = {k: getattr(video, k) for k, v in _TRANSFORMERS_VIDEO_FIXED.items() if getattr(video, k) != v}
    tpos = {video.add_tpos_enc_to_obj_ptrs, video.proj_tpos_enc_in_obj_ptrs, video.use_signed_tpos_enc_to_obj_ptrs}
    if len(tpos) > 1:
        fixed["add/proj/signed_tpos_enc_to_obj_ptrs"] = sorted(tpos)
    if fixed:
        raise CheckpointError(f"transformers' Sam2VideoModel has no layout for {fixed}; save in the official format instead")
    out = {theirs: getattr(video, ours) for ours, theirs in _VIDEO_FIELDS}
    out.update(enable_temporal_pos_encoding_for_object_pointers=video.add_tpos_enc_to_obj_ptrs,
               rope_parameters={"rope_type": "default", "rope_theta": video.rope_theta},
               memory_attention_hidden_size=hidden_size, memory_encoder_hidden_size=hidden_size,
               mask_downsampler_embed_dim=hidden_size, memory_fuser_embed_dim=hidden_size,
               memory_fuser_intermediate_dim=4 * hidden_size, mask_downsampler_hidden_act="gelu",
               memory_fuser_hidden_act="gelu")
    return out


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class Sam2Checkpoint:
    """What a SAM 2 checkpoint holds: `state` (image model, our names), `video_state` (the video modules'
    tensors under the names of `layout`), `config` (from config.json, else None), `layout` ("official" or
    "transformers") and `path`."""

    state: dict[str, torch.Tensor]
    video_state: dict[str, torch.Tensor]
    config: SamHQ2Config | None
    layout: str
    path: Path


def read_checkpoint(source) -> Sam2Checkpoint:
    """Read a SAM 2 checkpoint: an official `.pt`, a `.safetensors` file, or a directory (transformers layout
    `config.json` + `model.safetensors` / `pytorch_model.bin`, or holding exactly one checkpoint file); a hub
    id is downloaded through huggingface_hub (`samhq.checkpoints.resolve_source`).

    Raises CheckpointError for unreadable, damaged or non-SAM 2 files.
    """
    path = resolve_source(source)
    config = None
    if path.is_dir():
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()), None)
        if weights is None:
            found = [p for ext in ("*.pt", "*.pth", "*.safetensors") for p in sorted(path.glob(ext))]
            if len(found) != 1:
                raise CheckpointError(f"{path}: expected model.safetensors (+ config.json) or exactly one .pt/.pth/.safetensors "
                                      f"file, found {[p.name for p in found] or 'none'}")
            weights = found[0]
        if (path / "config.json").exists():
            config = read_config(path / "config.json")
        path = weights
    raw, _ = read_state_file(path)
    layout = _layout(raw)
    if layout == "official":
        state, video = official_to_ours(raw)
    elif layout == "transformers":
        state, video = transformers_to_ours(raw)
    elif layout == "sam_v1":
        raise CheckpointError(f"{path}: a SAM / SAM-HQ (v1, ViT) checkpoint, not SAM 2: load it with SamHQModel.from_pretrained")
    else:
        raise CheckpointError(f"{path}: no SAM 2 tensors "
                              "(image_encoder.trunk.*, sam_mask_decoder.* or vision_encoder.backbone.*)")
    # the reader memory-maps .pt files; the video tensors outlive the load, so they get their own memory (writing
    # the model back over its own file must not pull the pages from under them)
    video = {k: v.clone() for k, v in video.items()}
    return Sam2Checkpoint(state=state, video_state=video, config=config, layout=layout, path=path)


def read_config(path) -> SamHQ2Config:
    """Our config.json (model_type "sam_hq2"), or transformers' (model_type "sam2"; ours is used when it carries one)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a config must be a JSON object")
    try:
        if isinstance(data.get("samhq2_config"), dict):
            return SamHQ2Config.from_dict(data["samhq2_config"])
        if data.get("model_type") == SamHQ2Config.model_type:
            return SamHQ2Config.from_dict(data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        return config_from_transformers(data)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple], where: str, variant: str = "custom") -> bool:
    """Check a state dict (our names) against a model's (name -> shape); returns whether it has the HQ tensors.

    A checkpoint may lack all HQ tensors (plain SAM 2), not some of them. Raises CheckpointError
    naming missing, unexpected and mis-shaped tensors.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    hq_all = [k for k in expected if is_hq_parameter(k)]
    hq_missing = [k for k in missing if is_hq_parameter(k)]
    if hq_missing and len(hq_missing) != len(hq_all):
        raise CheckpointError(f"{where}: some HQ-SAM 2 tensors are present and some missing: {short_list(hq_missing)}")
    missing = [k for k in missing if not is_hq_parameter(k)]
    if missing or unexpected:
        raise CheckpointError(f"{where}: does not match the {variant} SAM 2 model: missing {short_list(missing)}; "
                              f"unexpected {short_list(unexpected)}")
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(s)}" for k, s in expected.items()
           if k in state and tuple(state[k].shape) != tuple(s)]
    if bad:
        raise CheckpointError(f"{where}: tensor shapes disagree with the {variant} config: {short_list(bad)}")
    return not hq_missing


# ---------------------------------------------------------------------------------------------
# Writing


def write_official(state: dict[str, torch.Tensor], path, video_state: dict[str, torch.Tensor] | None = None,
                   overwrite: bool = False) -> Path:
    """Write Meta's / sam-hq2's format: `torch.save({"model": official_state_dict}, path)` (loadable by their `build_sam2`).

    video_state: video tensors under official names, written as they are.
    """
    path = Path(path)
    _refuse_overwrite(path, overwrite)
    official = ours_to_official({k: v.detach().contiguous().cpu() for k, v in state.items()}, video_state)
    write_replacing(path, lambda tmp: torch.save({"model": official}, tmp))
    return path


def write_transformers(state: dict[str, torch.Tensor], config: SamHQ2Config, directory, overwrite: bool = False,
                       video_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write transformers' `Sam2Model` layout: config.json (model_type "sam2", ours under "samhq2_config") and model.safetensors.

    transformers' `Sam2Model.from_pretrained(directory)` loads it (an HQ-SAM 2 model's HQ tensors are
    then reported as unused: transformers has no HQ-SAM 2). video_state: video tensors under
    transformers' names, written as they are.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "model.safetensors"
    _refuse_overwrite(weights, overwrite)
    data = config_to_transformers(config)
    data["samhq2_config"] = config.to_dict()
    tensors = ours_to_transformers({k: v.detach().contiguous().cpu() for k, v in state.items()})
    tensors.update({k: v.detach().contiguous().cpu() for k, v in (video_state or {}).items()})
    write_replacing(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory


__all__ = ["CheckpointError", "Sam2Checkpoint", "read_checkpoint", "read_config", "infer_config", "check_state",
           "official_to_ours", "ours_to_official", "transformers_to_ours", "ours_to_transformers",
           "config_from_transformers", "config_to_transformers", "write_official", "write_transformers",
           "is_sam2_checkpoint", "is_hq_parameter", "is_video_key", "VIDEO_KEYS", "TRANSFORMERS_VIDEO_KEYS",
           "is_our_video_key", "video_to_ours", "video_from_ours", "infer_video_config", "video_config_from_transformers",
           "video_config_to_transformers"]
