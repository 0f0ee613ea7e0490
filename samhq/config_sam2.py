"""Configurations of SAM 2.1 and HQ-SAM 2 for images: one implementation, the Hiera sizes as presets.

Field names follow Meta's sam2 YAML configs (`configs/sam2.1/sam2.1_hiera_*.yaml`, whose
`image_encoder.trunk`, `image_encoder.neck` and `sam_mask_decoder_extra_args` entries they mirror),
so a YAML file maps onto these classes one to one. The HQ additions (HQ token, its MLP, the
mask-feature convolution) have no switch in the config: like SAM-HQ v1, a model carries them and
`SamHQ2Model.hq_enabled` is False when a checkpoint has no HQ weights (plain SAM 2 / 2.1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .config import _ConfigBase


@dataclass
class SamHQ2HieraConfig(_ConfigBase):
    """The image encoder: a Hiera trunk (Ryali et al. 2023, as in SAM 2) and SAM 2's FPN neck.

    Defaults are Hiera-T. Stage i (0-based) has `embed_dim * dim_mul**i` channels and
    `num_heads * head_mul**i` heads; the first block of stages 1..q_pool max-pools its queries by
    `q_stride`. `window_spec[i]` is stage i's attention window (0: global); as in Meta's code the
    first block of a stage still uses the previous stage's window. `global_att_blocks` are indices
    over all blocks. The windowed absolute position embedding (Bolya et al. 2023) is a background
    of `window_pos_embed_bkg_spatial_size`, resized bicubically to the token grid, plus a
    `window_spec[0]`-sized window tiled over it.
    The neck projects every stage to `d_model` channels (1x1 convs); levels in
    `fpn_top_down_levels` add the coarser level upsampled 2x (`fpn_interp_model`); the `scalp`
    coarsest levels are dropped. With the defaults at 1024 px: features of 256^2, 128^2 and 64^2.
    """

    model_type: ClassVar[str] = "sam_hq2_hiera"
    embed_dim: int = 96
    num_heads: int = 1
    stages: list[int] = field(default_factory=lambda: [1, 2, 7, 2])
    global_att_blocks: list[int] = field(default_factory=lambda: [5, 7, 9])
    window_spec: list[int] = field(default_factory=lambda: [8, 4, 14, 7])
    window_pos_embed_bkg_spatial_size: list[int] = field(default_factory=lambda: [7, 7])
    q_pool: int = 3
    q_stride: list[int] = field(default_factory=lambda: [2, 2])
    dim_mul: float = 2.0
    head_mul: float = 2.0
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    patch_kernel_size: int = 7
    patch_stride: int = 4
    patch_padding: int = 3
    num_channels: int = 3
    image_size: int = 1024
    d_model: int = 256
    fpn_top_down_levels: list[int] = field(default_factory=lambda: [2, 3])
    fpn_interp_model: str = "nearest"
    fuse_type: str = "sum"
    scalp: int = 1

    def __post_init__(self):
        for name in ("stages", "global_att_blocks", "window_spec", "window_pos_embed_bkg_spatial_size", "q_stride",
                     "fpn_top_down_levels"):
            setattr(self, name, [int(v) for v in getattr(self, name)])
        n = len(self.stages)
        if n < 2 or len(self.window_spec) != n or any(s < 1 for s in self.stages):
            raise ValueError(f"stages {self.stages} and window_spec {self.window_spec} must have the same length (>= 2), "
                             "every stage at least one block")
        if not 0 <= self.q_pool <= n - 1:
            raise ValueError(f"q_pool ({self.q_pool}) must be between 0 and {n - 1} (stages - 1)")
        if len(self.q_stride) != 2 or self.q_stride[0] != self.q_stride[1]:
            raise ValueError(f"q_stride must be a square stride [s, s], got {self.q_stride}")
        bad = [b for b in self.global_att_blocks if not 0 <= b < self.depth]
        if bad:
            raise ValueError(f"global_att_blocks {bad} are outside 0..{self.depth - 1}")
        for i, (dim, heads) in enumerate(zip(self.stage_dims, self.stage_heads)):
            if dim % heads:
                raise ValueError(f"stage {i}: {dim} channels are not divisible by {heads} heads")
        if not 0 <= self.scalp < n:
            raise ValueError(f"scalp ({self.scalp}) must be between 0 and {n - 1}")
        if self.fpn_interp_model not in ("nearest", "bilinear", "bicubic"):
            raise ValueError(f"fpn_interp_model must be nearest, bilinear or bicubic, got {self.fpn_interp_model!r}")
        if self.fuse_type not in ("sum", "avg"):
            raise ValueError(f"fuse_type must be 'sum' or 'avg', got {self.fuse_type!r}")
        grid = self.image_size // self.patch_stride
        if self.image_size % self.patch_stride or grid % self.window_spec[0]:
            raise ValueError(
                f"image_size ({self.image_size}) / patch_stride ({self.patch_stride}) must be a whole number of "
                f"window_spec[0] ({self.window_spec[0]}) windows: the window position embedding is tiled over it"
            )
        if self.image_size % self.backbone_stride:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of the feature stride {self.backbone_stride}")

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_dims(self) -> list[int]:
        return [int(self.embed_dim * self.dim_mul ** i) for i in range(len(self.stages))]

    @property
    def stage_heads(self) -> list[int]:
        return [int(self.num_heads * self.head_mul ** i) for i in range(len(self.stages))]

    @property
    def stage_ends(self) -> list[int]:
        """Index of the last block of each stage."""
        return [sum(self.stages[:i + 1]) - 1 for i in range(len(self.stages))]

    @property
    def backbone_channel_list(self) -> list[int]:
        """Stage widths, coarsest first (the order of the neck's convs, as in Meta's configs)."""
        return self.stage_dims[::-1]

    def stage_stride(self, stage: int) -> int:
        """Pixels per token of stage `stage`'s output."""
        return self.patch_stride * self.q_stride[0] ** min(stage, self.q_pool)

    @property
    def num_feature_levels(self) -> int:
        return len(self.stages) - self.scalp

    @property
    def backbone_stride(self) -> int:
        """Pixels per cell of the image embedding (the last level kept): 16 for SAM 2."""
        return self.stage_stride(self.num_feature_levels - 1)

    @property
    def feature_sizes(self) -> list[int]:
        """Side of each kept feature level, finest first: [256, 128, 64] at 1024 px."""
        return [self.image_size // self.stage_stride(i) for i in range(self.num_feature_levels)]


@dataclass
class SamHQ2PromptEncoderConfig(_ConfigBase):
    """SAM 2's prompt encoder (the same modules as SAM's). `patch_size` is the image embedding's stride."""

    model_type: ClassVar[str] = "sam_hq2_prompt_encoder"
    hidden_size: int = 256
    image_size: int = 1024
    patch_size: int = 16
    mask_input_channels: int = 16
    num_point_embeddings: int = 4
    layer_norm_eps: float = 1e-6

    @property
    def image_embedding_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_pos_feats(self) -> int:
        return self.hidden_size // 2


@dataclass
class SamHQ2MaskDecoderConfig(_ConfigBase):
    """SAM 2's mask decoder (Meta's `MaskDecoder` arguments) with HQ-SAM 2's additions.

    - use_high_res_features: add the stride-4 and stride-8 features (after `conv_s0`/`conv_s1`)
      inside the upscaling.
    - pred_obj_scores: an object-score token and head (`pred_obj_scores_mlp`: a 3-layer MLP, else
      one linear layer); without it the object score is the constant logit 10.
    - iou_prediction_use_sigmoid: IoU predictions pass through a sigmoid.
    - dynamic_multimask_via_stability (+ delta, thresh): single-mask output falls back to the best
      multimask mask when token 0's mask is unstable (see `samhq.modeling.mask_selection`); Meta's
      `build_sam2` turns it on for images with delta 0.05 and threshold 0.98.
    - use_multimask_token_for_obj_ptr: which token becomes the video object pointer; it does not
      change image outputs (kept for the video model).
    The HQ parts (HQ token, `hq_mask_mlp`, the 3x3 mask-feature convolutions) are always built.
    """

    model_type: ClassVar[str] = "sam_hq2_mask_decoder"
    hidden_size: int = 256
    mlp_dim: int = 2048
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    use_high_res_features: bool = True
    iou_prediction_use_sigmoid: bool = True
    pred_obj_scores: bool = True
    pred_obj_scores_mlp: bool = True
    use_multimask_token_for_obj_ptr: bool = True
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98

    def __post_init__(self):
        if self.hidden_size % 8:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of 8 "
                             "(the upscaled embedding has hidden_size/8 channels)")
        if self.num_multimask_outputs < 1 or self.iou_head_depth < 2:
            raise ValueError("num_multimask_outputs must be >= 1 and iou_head_depth >= 2")


@dataclass
class SamHQ2VideoConfig(_ConfigBase):
    """SAM 2's video modules and tracking settings (Meta's `SAM2Base` arguments, `sam2.1_hiera_*.yaml` names).

    Defaults are SAM 2.1's configs with the settings Meta's `build_sam2_video_predictor` applies
    (`binarize_mask_from_pts_for_mem_enc`); `from_release("sam2")` gives SAM 2.0's. Frames and sizes:
    memories live on the image-embedding grid (S/16 a side) with `mem_dim` channels.

    - Memory bank: `num_maskmem` memories (the conditioning frames + the `num_maskmem - 1` latest
      non-conditioning frames, every `memory_temporal_stride_for_eval`-th); at most
      `max_cond_frames_in_attn` conditioning frames, the temporally closest (-1: all).
    - Memory encoder: the mask (sigmoid of the logits, x `sigmoid_scale_for_mem_enc` +
      `sigmoid_bias_for_mem_enc`; binarised on prompted frames) downsampled by `mask_downsampler_*`
      convolutions, added to the projected image features, fused by `fuser_num_layers` ConvNeXt blocks,
      projected to `mem_dim`; `no_obj_embed_spatial` adds a learned vector where the object is absent.
    - Memory attention: `memory_attention_num_layers` layers of RoPE self-attention, cross-attention to
      the memories and object pointers, and an MLP (`memory_attention_dim_feedforward`, `activation`).
    - Object pointers: the decoder's output token through `obj_ptr_proj` (an MLP when
      `use_mlp_for_obj_ptr_proj`), up to `max_obj_ptrs_in_encoder` of them, with a 1-D sine encoding of the
      frame distance (`add_tpos_enc_to_obj_ptrs`, projected when `proj_tpos_enc_in_obj_ptrs`, signed when
      `use_signed_tpos_enc_to_obj_ptrs`); the learned `no_obj_ptr` where the object is absent
      (`fixed_no_obj_ptr`: replaces it; `soft_no_obj_ptr`: mixes by the object-score sigmoid).
    - SAM heads while tracking: multimask output for 0..1 clicks (`multimask_*`), the mask input used as
      the output on frames given a mask (`use_mask_input_as_output_without_sam`).
    """

    model_type: ClassVar[str] = "sam_hq2_video"
    num_maskmem: int = 7
    max_cond_frames_in_attn: int = -1
    memory_temporal_stride_for_eval: int = 1
    # memory encoder
    mem_dim: int = 64
    mask_downsampler_kernel_size: int = 3
    mask_downsampler_stride: int = 2
    mask_downsampler_padding: int = 1
    mask_downsampler_total_stride: int = 16
    fuser_num_layers: int = 2
    fuser_kernel_size: int = 7
    fuser_padding: int = 3
    fuser_layer_scale_init_value: float = 1e-6
    fuser_use_dwconv: bool = True
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    binarize_mask_from_pts_for_mem_enc: bool = True
    non_overlap_masks_for_mem_enc: bool = False
    no_obj_embed_spatial: bool = True
    # memory attention
    memory_attention_num_layers: int = 4
    memory_attention_dim_feedforward: int = 2048
    memory_attention_num_heads: int = 1
    memory_attention_downsample_rate: int = 1
    memory_attention_activation: str = "relu"
    memory_attention_pos_enc_at_input: bool = True
    memory_attention_pos_enc_at_attn: bool = False
    memory_attention_pos_enc_at_cross_attn_keys: bool = True
    memory_attention_pos_enc_at_cross_attn_queries: bool = False
    rope_theta: float = 10000.0
    # object pointers
    use_obj_ptrs_in_encoder: bool = True
    max_obj_ptrs_in_encoder: int = 16
    add_tpos_enc_to_obj_ptrs: bool = True
    proj_tpos_enc_in_obj_ptrs: bool = True
    use_signed_tpos_enc_to_obj_ptrs: bool = True
    only_obj_ptrs_in_the_past_for_eval: bool = True
    use_mlp_for_obj_ptr_proj: bool = True
    fixed_no_obj_ptr: bool = True
    soft_no_obj_ptr: bool = False
    # SAM heads while tracking
    directly_add_no_mem_embed: bool = True
    use_mask_input_as_output_without_sam: bool = True
    multimask_output_in_sam: bool = True
    multimask_min_pt_num: int = 0
    multimask_max_pt_num: int = 1
    multimask_output_for_tracking: bool = True

    def __post_init__(self):
        if self.num_maskmem < 0 or self.max_obj_ptrs_in_encoder < 1 or self.memory_temporal_stride_for_eval < 1:
            raise ValueError("num_maskmem must be >= 0, max_obj_ptrs_in_encoder and memory_temporal_stride_for_eval >= 1")
        if self.max_cond_frames_in_attn != -1 and self.max_cond_frames_in_attn < 2:
            raise ValueError(f"max_cond_frames_in_attn must be -1 (all) or >= 2, got {self.max_cond_frames_in_attn}")
        if self.memory_attention_activation not in ("relu", "gelu"):
            raise ValueError(f"memory_attention_activation must be relu or gelu, got {self.memory_attention_activation!r}")
        if self.proj_tpos_enc_in_obj_ptrs and not self.add_tpos_enc_to_obj_ptrs:
            raise ValueError("proj_tpos_enc_in_obj_ptrs needs add_tpos_enc_to_obj_ptrs")
        if self.fixed_no_obj_ptr and not self.use_obj_ptrs_in_encoder:
            raise ValueError("fixed_no_obj_ptr needs use_obj_ptrs_in_encoder")
        n = self.mask_downsampler_layers
        if self.mask_downsampler_stride < 2 or self.mask_downsampler_stride ** n != self.mask_downsampler_total_stride:
            raise ValueError(f"mask_downsampler_total_stride ({self.mask_downsampler_total_stride}) must be a power of "
                             f"mask_downsampler_stride ({self.mask_downsampler_stride})")

    @property
    def mask_downsampler_layers(self) -> int:
        """Number of strided convolutions of the mask downsampler (4 for 16 = 2^4)."""
        n, total = 0, 1
        while total < self.mask_downsampler_total_stride and self.mask_downsampler_stride > 1:
            total *= self.mask_downsampler_stride
            n += 1
        return n

    @classmethod
    def from_release(cls, release: str = "sam2.1", **changes) -> "SamHQ2VideoConfig":
        """"sam2.1" (SAM 2.1 and HQ-SAM 2) or "sam2" (SAM 2.0: no temporal encoding of object pointers and
        no occlusion embedding in the memories), with `changes` applied."""
        if release not in ("sam2.1", "sam2"):
            raise ValueError(f"release must be 'sam2.1' or 'sam2', got {release!r}")
        if release == "sam2":
            changes = {**dict(no_obj_embed_spatial=False, add_tpos_enc_to_obj_ptrs=False, proj_tpos_enc_in_obj_ptrs=False,
                              use_signed_tpos_enc_to_obj_ptrs=False), **changes}
        return cls(**changes)


def _sub(cls, value):
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls.from_dict(value)
    if not isinstance(value, cls):
        raise TypeError(f"expected a {cls.__name__} or a dict, got {type(value).__name__}")
    return value


@dataclass
class SamHQ2Config(_ConfigBase):
    """SAM 2.1 / HQ-SAM 2: `vision_config`, `prompt_encoder_config`, `mask_decoder_config`, and `video_config`
    (None: an image model without the video modules).

    Sub-configs may be config objects or dicts. `SamHQ2Config.from_variant("hiera_l")` is SAM 2.1's
    (and HQ-SAM 2's) Hiera-L; `from_variant("hiera_l", video=True)` with SAM 2.1's video modules.
    """

    model_type: ClassVar[str] = "sam_hq2"
    vision_config: Any = None
    prompt_encoder_config: Any = None
    mask_decoder_config: Any = None
    video_config: Any = None

    def __post_init__(self):
        if self.video_config is not None:
            self.video_config = _sub(SamHQ2VideoConfig, self.video_config)
        self.vision_config = _sub(SamHQ2HieraConfig, self.vision_config)
        self.prompt_encoder_config = _sub(SamHQ2PromptEncoderConfig, self.prompt_encoder_config)
        self.mask_decoder_config = _sub(SamHQ2MaskDecoderConfig, self.mask_decoder_config)
        v, p, m = self.vision_config, self.prompt_encoder_config, self.mask_decoder_config
        if not v.d_model == p.hidden_size == m.hidden_size:
            raise ValueError(f"vision d_model ({v.d_model}), prompt encoder hidden_size ({p.hidden_size}) and mask decoder "
                             f"hidden_size ({m.hidden_size}) must agree")
        if p.image_size != v.image_size or p.patch_size != v.backbone_stride:
            raise ValueError(f"prompt encoder image_size/patch_size ({p.image_size}/{p.patch_size}) must equal the image "
                             f"encoder's ({v.image_size}/{v.backbone_stride})")
        if m.use_high_res_features and v.num_feature_levels < 3:
            raise ValueError("use_high_res_features needs 3 feature levels from the image encoder (stages - scalp >= 3)")

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def variant(self) -> str | None:
        """The preset this config's image model equals (`hiera_l`, ...), or None for a custom config."""
        mine = {**self.to_dict(), "video_config": None}
        return next((name for name in SAM2_VARIANTS if SamHQ2Config.from_variant(name).to_dict() == mine), None)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["architectures"] = ["SamHQ2Model"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise TypeError(f"SamHQ2Config.from_dict expects a dict, got {type(data).__name__}")
        kind = data.get("model_type", cls.model_type)
        if kind != cls.model_type:
            raise ValueError(f"config has model_type {kind!r}, expected {cls.model_type!r}")
        return super().from_dict(data)

    @classmethod
    def from_variant(cls, name: str, video: bool = False) -> "SamHQ2Config":
        """A SAM 2.1 preset: `hiera_t`, `hiera_s`, `hiera_b+` or `hiera_l` (HQ-SAM 2's released model is `hiera_l`);
        `video=True` adds SAM 2.1's video modules."""
        if name not in SAM2_VARIANTS:
            raise ValueError(f"unknown SAM 2 variant {name!r}; known: {', '.join(SAM2_VARIANTS)}")
        return cls(vision_config=SamHQ2HieraConfig(**SAM2_VARIANTS[name]), video_config=SamHQ2VideoConfig() if video else None)


# Meta's configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml (the same trunks as SAM 2.0's and as
# sam-hq2's sam2.1_hq_hiera_l.yaml); fields not listed keep Hiera's defaults above.
SAM2_VARIANTS: dict[str, dict[str, Any]] = {
    "hiera_t": dict(embed_dim=96, num_heads=1, stages=[1, 2, 7, 2], global_att_blocks=[5, 7, 9],
                    window_pos_embed_bkg_spatial_size=[7, 7], window_spec=[8, 4, 14, 7]),
    "hiera_s": dict(embed_dim=96, num_heads=1, stages=[1, 2, 11, 2], global_att_blocks=[7, 10, 13],
                    window_pos_embed_bkg_spatial_size=[7, 7], window_spec=[8, 4, 14, 7]),
    "hiera_b+": dict(embed_dim=112, num_heads=2, stages=[2, 3, 16, 3], global_att_blocks=[12, 16, 20],
                     window_pos_embed_bkg_spatial_size=[14, 14], window_spec=[8, 4, 14, 7]),
    "hiera_l": dict(embed_dim=144, num_heads=2, stages=[2, 6, 36, 4], global_att_blocks=[23, 33, 43],
                    window_pos_embed_bkg_spatial_size=[7, 7], window_spec=[8, 4, 16, 8]),
}

__all__ = ["SamHQ2Config", "SamHQ2HieraConfig", "SamHQ2PromptEncoderConfig", "SamHQ2MaskDecoderConfig", "SamHQ2VideoConfig",
           "SAM2_VARIANTS"]
