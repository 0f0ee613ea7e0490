"""SAM 2's video modules: the memory encoder, the memory attention, and the object-pointer parts.

SAM 2 (Ravi et al. 2024, arXiv 2408.00714, section 4) tracks an object by conditioning each frame's
image embedding on a memory bank: spatial memories (each earlier frame's features fused with its
predicted mask by the *memory encoder*) and object pointers (a projection of the decoder's output
token). The *memory attention* is a stack of transformer layers: self-attention over the current
frame, cross-attention to the memories, an MLP; both attentions use 2-D rotary position encodings
(RoPE, Su et al. 2021, axial as in Heo et al. 2024) on the spatial tokens, none on the pointers.

Parameter names are transformers' `Sam2VideoModel` names (`samhq.checkpoints_sam2` maps Meta's
official names onto them). Tensors are batch-first: B objects, HW tokens of the image-embedding grid
(h = w = S/16), C = 256 channels, memories with `mem_dim` = 64 channels.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ...config_sam2 import SamHQ2VideoConfig
from ..common import FeedForward, LayerNorm2d
from .hiera import SinePositionEncoding

# ---------------------------------------------------------------------------------------------
# Memory encoder: mask downsampler + feature projection + fuser (ConvNeXt blocks) + projection


class MaskDownSamplerLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, config: SamHQ2VideoConfig):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=config.mask_downsampler_kernel_size,
                              stride=config.mask_downsampler_stride, padding=config.mask_downsampler_padding)
        self.layer_norm = LayerNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.layer_norm(self.conv(x)))


class MaskDownSampler(nn.Module):
    """A mask (B, 1, S, S) -> (B, C, S/16, S/16): strided convolutions (channels x stride^2 each), LayerNorm, GELU,
    then a 1x1 convolution."""

    def __init__(self, config: SamHQ2VideoConfig, hidden_size: int):
        super().__init__()
        layers, channels = [], 1
        for _ in range(config.mask_downsampler_layers):
            out = channels * config.mask_downsampler_stride ** 2
            layers.append(MaskDownSamplerLayer(channels, out, config))
            channels = out
        self.layers = nn.ModuleList(layers)
        self.final_conv = nn.Conv2d(channels, hidden_size, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.final_conv(x)


class FuserBlock(nn.Module):
    """A ConvNeXt block (Liu et al. 2022): depthwise 7x7 conv, LayerNorm, 1x1 MLP (4x, GELU), layer scale, residual."""

    def __init__(self, dim: int, config: SamHQ2VideoConfig):
        super().__init__()
        self.depthwise_conv = nn.Conv2d(dim, dim, kernel_size=config.fuser_kernel_size, padding=config.fuser_padding,
                                        groups=dim if config.fuser_use_dwconv else 1)
        self.layer_norm = LayerNorm2d(dim)
        self.pointwise_conv1 = nn.Linear(dim, 4 * dim)
        self.pointwise_conv2 = nn.Linear(4 * dim, dim)
        self.scale = nn.Parameter(config.fuser_layer_scale_init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer_norm(self.depthwise_conv(x)).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.scale * self.pointwise_conv2(F.gelu(self.pointwise_conv1(y)))
        return x + y.permute(0, 3, 1, 2)


class MemoryFuser(nn.Module):
    def __init__(self, dim: int, config: SamHQ2VideoConfig):
        super().__init__()
        self.layers = nn.ModuleList(FuserBlock(dim, config) for _ in range(config.fuser_num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """A frame's memory: its image features (B, C, h, w) fused with its mask (B, 1, S, S) (probabilities,
    already scaled) -> memory features (B, mem_dim, h, w) and their sine position encoding (B, mem_dim, h, w)."""

    def __init__(self, config: SamHQ2VideoConfig, hidden_size: int):
        super().__init__()
        self.mask_downsampler = MaskDownSampler(config, hidden_size)
        self.feature_projection = nn.Conv2d(hidden_size, hidden_size, kernel_size=1)
        self.memory_fuser = MemoryFuser(hidden_size, config)
        self.projection = nn.Conv2d(hidden_size, config.mem_dim, kernel_size=1)
        self.position_encoding = SinePositionEncoding(config.mem_dim)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.feature_projection(features) + self.mask_downsampler(mask)
        x = self.projection(self.memory_fuser(x))
        return x, self.position_encoding(x)


# ---------------------------------------------------------------------------------------------
# Memory attention with 2-D rotary position encodings


def axial_rope_angles(head_dim: int, side: int, theta: float) -> torch.Tensor:
    """Rotation angles (side*side, head_dim/2) of axial 2-D RoPE on a side x side grid, row-major tokens.

    The first head_dim/4 pairs rotate by x * f_i, the next head_dim/4 by y * f_i, f_i = theta^(-4i/head_dim)
    (Meta's `compute_axial_cis`).
    """
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim)
    t = torch.arange(side * side, dtype=torch.float32)
    x, y = t % side, torch.div(t, side, rounding_mode="floor")
    return torch.cat([torch.outer(x, freqs), torch.outer(y, freqs)], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (..., L, d) by angles (L, d/2), as complex multiplication, in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


class RotaryAttention(nn.Module):
    """Multi-head attention with axial RoPE on the queries and on the first keys.

    q (B, Lq, dim), k/v (B, Lk, kv_dim); the queries are a square grid. With `repeat_keys` the keys are
    several grids of the same size one after the other (the memories); the last `num_k_exclude_rope`
    keys (object pointers) are not rotated.
    """

    def __init__(self, dim: int, kv_dim: int, num_heads: int, downsample_rate: int, theta: float, repeat_keys: bool):
        super().__init__()
        inner = dim // downsample_rate
        self.num_heads = num_heads
        self.theta = theta
        self.repeat_keys = repeat_keys
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(kv_dim, inner)
        self.v_proj = nn.Linear(kv_dim, inner)
        self.o_proj = nn.Linear(inner, dim)
        self._angles: dict[tuple[int, torch.device], torch.Tensor] = {}

    def angles(self, length: int, device) -> torch.Tensor:
        key = (length, torch.device(device))
        if key not in self._angles:  # kept per device: no host-to-GPU copy per attention call
            side = math.isqrt(length)
            if side * side != length:
                raise ValueError(f"RoPE needs a square grid of queries, got {length} tokens")
            head_dim = self.q_proj.out_features // self.num_heads
            self._angles[key] = axial_rope_angles(head_dim, side, self.theta).to(device)
        return self._angles[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        def heads(x):
            return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, L, d)

        q, k, v = heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v))
        angles = self.angles(q.shape[2], q.device)
        q = apply_rope(q, angles)
        n_rope = k.shape[2] - num_k_exclude_rope
        if n_rope > 0:
            repeats = n_rope // q.shape[2] if self.repeat_keys else 1
            if repeats * q.shape[2] != n_rope:
                raise ValueError(f"{n_rope} rotated keys are not a whole number of {q.shape[2]}-token grids")
            k = torch.cat([apply_rope(k[:, :, :n_rope], angles.repeat(repeats, 1)), k[:, :, n_rope:]], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class MemoryAttentionLayer(nn.Module):
    """Pre-norm layer: RoPE self-attention, RoPE cross-attention to the memories, MLP; each residual."""

    def __init__(self, config: SamHQ2VideoConfig, dim: int):
        super().__init__()
        self.config = config
        heads, rate, theta = config.memory_attention_num_heads, config.memory_attention_downsample_rate, config.rope_theta
        self.self_attn = RotaryAttention(dim, dim, heads, rate, theta, repeat_keys=False)
        self.cross_attn_image = RotaryAttention(dim, config.mem_dim, heads, rate, theta, repeat_keys=True)
        self.linear1 = nn.Linear(dim, config.memory_attention_dim_feedforward)
        self.linear2 = nn.Linear(config.memory_attention_dim_feedforward, dim)
        self.layer_norm1 = nn.LayerNorm(dim)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.layer_norm3 = nn.LayerNorm(dim)
        self.activation = F.relu if config.memory_attention_activation == "relu" else F.gelu

    def forward(self, x, memory, x_pos, memory_pos, num_obj_ptr_tokens: int) -> torch.Tensor:
        cfg = self.config
        y = self.layer_norm1(x)
        qk = y + x_pos if cfg.memory_attention_pos_enc_at_attn else y
        x = x + self.self_attn(qk, qk, y)
        y = self.layer_norm2(x)
        x = x + self.cross_attn_image(
            y + x_pos if cfg.memory_attention_pos_enc_at_cross_attn_queries else y,
            memory + memory_pos if cfg.memory_attention_pos_enc_at_cross_attn_keys else memory,
            memory, num_k_exclude_rope=num_obj_ptr_tokens,
        )
        return x + self.linear2(self.activation(self.linear1(self.layer_norm3(x))))


class MemoryAttention(nn.Module):
    """Condition the current frame on the memory bank.

    x (B, HW, C) image features with their position encoding x_pos (B, HW, C); memory (B, M, mem_dim)
    = the spatial memories (each HW tokens) followed by `num_obj_ptr_tokens` object-pointer tokens, with
    memory_pos (B, M, mem_dim). Returns (B, HW, C).
    """

    def __init__(self, config: SamHQ2VideoConfig, dim: int):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(MemoryAttentionLayer(config, dim) for _ in range(config.memory_attention_num_layers))
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x, x_pos, memory, memory_pos, num_obj_ptr_tokens: int = 0) -> torch.Tensor:
        if self.config.memory_attention_pos_enc_at_input:
            x = x + 0.1 * x_pos
        for layer in self.layers:
            x = layer(x, memory, x_pos, memory_pos, num_obj_ptr_tokens)
        return self.layer_norm(x)


# ---------------------------------------------------------------------------------------------
# The video modules of a SamHQ2Model


def sine_encoding_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Transformer sine encoding of positions (N,) -> (N, dim): [sin(p / T^(2(i//2)/(dim/2))) for i], then the cosines
    (Meta's `get_1d_sine_pe`; halves concatenated, not interleaved)."""
    half = dim // 2
    dim_t = temperature ** (2 * (torch.arange(half, dtype=torch.float32, device=positions.device) // 2) / half)
    p = positions[:, None].float() / dim_t
    return torch.cat([p.sin(), p.cos()], dim=-1)


VIDEO_MODULES = ("memory_attention", "memory_encoder", "memory_temporal_positional_encoding", "no_memory_positional_encoding",
                 "no_object_pointer", "occlusion_spatial_embedding_parameter", "mask_downsample", "object_pointer_proj",
                 "temporal_positional_encoding_projection_layer")


def add_video_modules(model: nn.Module, config: SamHQ2VideoConfig, hidden_size: int, pred_obj_scores: bool) -> None:
    """Give `model` (a SamHQ2Model) SAM 2's video modules, under transformers' `Sam2VideoModel` names.

    Learned tensors: `memory_temporal_positional_encoding` (num_maskmem, 1, 1, mem_dim), Meta's
    `maskmem_tpos_enc`; `no_memory_positional_encoding` (1, 1, C), `no_mem_pos_enc`; `no_object_pointer`
    (1, C), `no_obj_ptr`; `occlusion_spatial_embedding_parameter` (1, mem_dim), `no_obj_embed_spatial`;
    `mask_downsample` (a 4x4 stride-4 conv turning a mask into decoder mask-input logits);
    `object_pointer_proj` (`obj_ptr_proj`); `temporal_positional_encoding_projection_layer` (`obj_ptr_tpos_proj`).
    """
    c, m = hidden_size, config.mem_dim
    model.memory_attention = MemoryAttention(config, c)
    model.memory_encoder = MemoryEncoder(config, c)
    model.memory_temporal_positional_encoding = nn.Parameter(torch.zeros(config.num_maskmem, 1, 1, m))
    model.no_memory_positional_encoding = nn.Parameter(torch.zeros(1, 1, c))
    if config.use_obj_ptrs_in_encoder:
        model.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        model.object_pointer_proj = FeedForward(c, c, c, 3) if config.use_mlp_for_obj_ptr_proj else nn.Linear(c, c)
        if pred_obj_scores:
            model.no_object_pointer = nn.Parameter(torch.zeros(1, c))
    else:
        model.object_pointer_proj = nn.Identity()
    if config.proj_tpos_enc_in_obj_ptrs:
        model.temporal_positional_encoding_projection_layer = nn.Linear(c, m)
    if config.no_obj_embed_spatial:
        model.occlusion_spatial_embedding_parameter = nn.Parameter(torch.zeros(1, m))


__all__ = ["MemoryEncoder", "MemoryAttention", "MemoryAttentionLayer", "RotaryAttention", "MaskDownSampler", "FuserBlock",
           "axial_rope_angles", "apply_rope", "sine_encoding_1d", "add_video_modules", "VIDEO_MODULES"]
