"""Configurations, with transformers' (`SamHQConfig`) class names, fields and defaults.

A hub `config.json` (model_type "sam_hq") loads unchanged: unknown keys that transformers adds
(`architectures`, `torch_dtype`, ...) are ignored. Light HQ-SAM's TinyViT encoder has a config of
its own, `SamHQTinyViTConfig`, since transformers has no TinyViT SamHQ.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar


class _ConfigBase:
    model_type: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _ConfigBase) else copy.deepcopy(value)
        out["model_type"] = self.model_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid JSON config ({e})") from None
        return cls.from_dict(data)


@dataclass
class SamHQVisionConfig(_ConfigBase):
    """The ViT image encoder (SAM's ViTDet-style backbone). Defaults are ViT-B."""

    model_type: ClassVar[str] = "sam_hq_vision_model"
    hidden_size: int = 768
    output_channels: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 1024
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 1e-10
    qkv_bias: bool = True
    mlp_ratio: float = 4.0
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    num_pos_feats: int = 128
    mlp_dim: int | None = None

    def __post_init__(self):
        self.global_attn_indexes = list(self.global_attn_indexes)
        if self.mlp_dim is None:
            self.mlp_dim = int(self.hidden_size * self.mlp_ratio)
        _check_positive(self, "hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if not self.global_attn_indexes:
            raise ValueError("global_attn_indexes must name at least one layer: SAM-HQ fuses the first one's output")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} are outside 0..{self.num_hidden_layers - 1}")

    @property
    def hq_feature_dim(self) -> int:
        """Channels of the early feature map the HQ branch fuses (the decoder's `vit_dim`)."""
        return self.hidden_size


@dataclass
class SamHQTinyViTConfig(_ConfigBase):
    """Light HQ-SAM's TinyViT-5M image encoder (from MobileSAM)."""

    model_type: ClassVar[str] = "sam_hq_tiny_vit"
    embed_dims: list[int] = field(default_factory=lambda: [64, 128, 160, 320])
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [2, 4, 5, 10])
    window_sizes: list[int] = field(default_factory=lambda: [7, 7, 14, 7])
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    num_channels: int = 3
    image_size: int = 1024
    patch_size: int = 16
    output_channels: int = 256
    layer_norm_eps: float = 1e-6
    num_pos_feats: int = 128

    def __post_init__(self):
        for name in ("embed_dims", "depths", "num_heads", "window_sizes"):
            setattr(self, name, list(getattr(self, name)))
            if len(getattr(self, name)) != 4:
                raise ValueError(f"TinyViT needs 4 stages: {name} has {len(getattr(self, name))} entries")
        if self.image_size % 16:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of 16")
        for d, h in zip(self.embed_dims[1:], self.num_heads[1:]):
            if d % h:
                raise ValueError(f"embed dim {d} is not divisible by its head count {h}")

    @property
    def hq_feature_dim(self) -> int:
        # The fused early feature is stage 1's output after its patch merging.
        return self.embed_dims[2]


@dataclass
class SamHQPromptEncoderConfig(_ConfigBase):
    model_type: ClassVar[str] = "sam_hq_prompt_encoder"
    hidden_size: int = 256
    image_size: int = 1024
    patch_size: int = 16
    mask_input_channels: int = 16
    num_point_embeddings: int = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6

    @property
    def image_embedding_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class SamHQMaskDecoderConfig(_ConfigBase):
    model_type: ClassVar[str] = "sam_hq_mask_decoder"
    hidden_size: int = 256
    hidden_act: str = "relu"
    mlp_dim: int = 2048
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    layer_norm_eps: float = 1e-6
    vit_dim: int = 768


_VISION_CONFIGS = {c.model_type: c for c in (SamHQVisionConfig, SamHQTinyViTConfig)}


def _vision_from_dict(data: dict[str, Any]):
    kind = data.get("model_type", SamHQVisionConfig.model_type)
    if kind not in _VISION_CONFIGS:
        raise ValueError(f"unknown vision model_type {kind!r}; known: {sorted(_VISION_CONFIGS)}")
    return _VISION_CONFIGS[kind].from_dict(data)


def _check_positive(cfg, *names):
    for n in names:
        if getattr(cfg, n) <= 0:
            raise ValueError(f"{type(cfg).__name__}.{n} must be positive, got {getattr(cfg, n)}")


@dataclass
class SamHQConfig(_ConfigBase):
    """The whole model: `vision_config`, `prompt_encoder_config`, `mask_decoder_config`.

    Sub-configs may be given as config objects or dicts (as in a hub `config.json`).
    """

    model_type: ClassVar[str] = "sam_hq"
    vision_config: Any = None
    prompt_encoder_config: Any = None
    mask_decoder_config: Any = None
    initializer_range: float = 0.02

    def __post_init__(self):
        v = self.vision_config
        self.vision_config = (
            SamHQVisionConfig() if v is None else _vision_from_dict(v) if isinstance(v, dict) else v
        )
        p = self.prompt_encoder_config
        self.prompt_encoder_config = (
            SamHQPromptEncoderConfig() if p is None else SamHQPromptEncoderConfig.from_dict(p) if isinstance(p, dict) else p
        )
        m = self.mask_decoder_config
        self.mask_decoder_config = (
            SamHQMaskDecoderConfig() if m is None else SamHQMaskDecoderConfig.from_dict(m) if isinstance(m, dict) else m
        )
        if not isinstance(self.vision_config, tuple(_VISION_CONFIGS.values())):
            raise TypeError(f"vision_config must be a vision config or dict, got {type(self.vision_config).__name__}")
        if self.mask_decoder_config.vit_dim != self.vision_config.hq_feature_dim:
            raise ValueError(
                f"mask_decoder_config.vit_dim ({self.mask_decoder_config.vit_dim}) must equal the encoder's early "
                f"feature width ({self.vision_config.hq_feature_dim})"
            )
        if self.prompt_encoder_config.hidden_size != self.mask_decoder_config.hidden_size:
            raise ValueError("prompt encoder and mask decoder hidden_size must agree")
        if self.vision_config.output_channels != self.mask_decoder_config.hidden_size:
            raise ValueError("vision_config.output_channels must equal mask_decoder_config.hidden_size")

    @property
    def is_tiny(self) -> bool:
        return isinstance(self.vision_config, SamHQTinyViTConfig)

    @property
    def variant(self) -> str | None:
        """The preset this config equals (`vit_b`, ...), or None for a custom config."""
        for name in VARIANTS:
            if SamHQConfig.from_variant(name).to_dict() == self.to_dict():
                return name
        return None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["architectures"] = ["SamHQModel"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise TypeError(f"SamHQConfig.from_dict expects a dict, got {type(data).__name__}")
        kind = data.get("model_type", "sam_hq")
        if kind != "sam_hq":
            raise ValueError(f"config has model_type {kind!r}, expected 'sam_hq'")
        return super().from_dict(data)

    @classmethod
    def from_variant(cls, name: str, **overrides) -> "SamHQConfig":
        """A preset: `vit_b`, `vit_l`, `vit_h` or `vit_tiny` (Light HQ-SAM)."""
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        vision = VARIANTS[name]()
        return cls(
            vision_config=vision,
            mask_decoder_config=SamHQMaskDecoderConfig(vit_dim=vision.hq_feature_dim),
            **overrides,
        )


def _vit(width, depth, heads, glob):
    return lambda: SamHQVisionConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, global_attn_indexes=glob
    )


VARIANTS = {
    "vit_b": _vit(768, 12, 12, [2, 5, 8, 11]),
    "vit_l": _vit(1024, 24, 16, [5, 11, 17, 23]),
    "vit_h": _vit(1280, 32, 16, [7, 15, 23, 31]),
    "vit_tiny": SamHQTinyViTConfig,
}
