"""SAM 2's image encoder: a Hiera trunk and an FPN neck.

Hiera (Ryali et al., ICML 2023, arXiv 2306.00989) is a plain hierarchical ViT: four stages of
transformer blocks whose first block (in stages 1..q_pool) max-pools its queries 2x2, halving the
resolution and doubling the width; attention is windowed except in a few global blocks. SAM 2
(Ravi et al. 2024, arXiv 2408.00714) uses it with the windowed absolute position embedding of
Bolya et al. 2023 (arXiv 2311.05613) and an FPN neck that projects each stage to 256 channels and
adds the coarser level, upsampled, to the levels in `fpn_top_down_levels`.

Tensors inside the trunk are channels-last, (B, H, W, C); stage outputs and neck features are
(B, C, H, W). At 1024 px a Hiera's stages run at 256, 128, 64 and 32 tokens a side.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ...config_sam2 import SamHQ2HieraConfig
from ..common import conv2d


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> windows (B * nW, window, window, C), zero-padding H and W up to multiples of `window`.

    Returns the windows and the padded size (Hp, Wp).
    """
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: windows (B * nW, window, window, C) -> (B, H, W, C) without the padding."""
    hp, wp = padded
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1).transpose(2, 3).reshape(b, hp, wp, -1)
    return x[:, :size[0], :size[1]]


def pool(x: torch.Tensor, stride: int | None) -> torch.Tensor:
    """Max-pool a channels-last (B, H, W, C) map by `stride` (no-op for None): Hiera's query pooling."""
    if not stride:
        return x
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=stride, stride=stride).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: a 7x7, stride-4 convolution, (B, 3, S, S) -> (B, S/4, S/4, C)."""

    def __init__(self, config: SamHQ2HieraConfig):
        super().__init__()
        self.projection = nn.Conv2d(config.num_channels, config.embed_dim, kernel_size=config.patch_kernel_size,
                                    stride=config.patch_stride, padding=config.patch_padding)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return conv2d(self.projection, pixel_values).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention whose queries may be max-pooled (the stage transition).

    Input (B, H, W, dim) -> output (B, H/s, W/s, dim_out), s the query stride (1 without pooling).
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        q, k, v = self.qkv(x).view(b, h * w, 3, self.num_heads, -1).unbind(2)  # (B, HW, heads, d) each
        if self.q_stride:
            q = pool(q.reshape(b, h, w, -1), self.q_stride)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, hidden)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.gelu(self.proj_in(x)))


class MultiScaleBlock(nn.Module):
    """A Hiera block: (windowed) attention with optional query pooling, then an MLP, both residual.

    At a stage transition (dim != dim_out) the shortcut is the normalised input projected to
    dim_out and pooled like the queries. (B, H, W, dim) -> (B, H/s, W/s, dim_out).
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, window_size: int, q_stride: int | None,
                 mlp_ratio: float, eps: float):
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_stride)
        self.layer_norm2 = nn.LayerNorm(dim_out, eps=eps)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio))
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.layer_norm1(x)
        if self.dim != self.dim_out:
            shortcut = pool(self.proj(x), self.q_stride)

        # Attention inside windows of window_size (global when 0); pooled queries shrink each window.
        if self.window_size > 0:
            x, padded = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            window = self.window_size // (self.q_stride or 1)
            size = shortcut.shape[1:3]
            padded = tuple(s + (-s) % window for s in size)
            x = window_unpartition(x, window, padded, size)

        x = shortcut + x
        return x + self.mlp(self.layer_norm2(x))


class Hiera(nn.Module):
    """The trunk: pixels (B, 3, S, S) -> one feature map per stage, finest first, (B, C_i, S/4/2^i, S/4/2^i)."""

    def __init__(self, config: SamHQ2HieraConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.embed_dim, *config.window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, config.embed_dim, config.window_spec[0], config.window_spec[0]))
        dims, heads = config.stage_dims, config.stage_heads
        q_pool_blocks = [end + 1 for end in config.stage_ends[:-1]][:config.q_pool]
        self.blocks = nn.ModuleList()
        for stage, count in enumerate(config.stages):
            for j in range(count):
                i = len(self.blocks)
                # A stage's first block still works at the previous stage's width and window.
                prev = stage - 1 if stage > 0 and j == 0 else stage
                window = 0 if i in config.global_att_blocks else config.window_spec[prev]
                self.blocks.append(MultiScaleBlock(
                    dims[prev], dims[stage], heads[stage], window,
                    config.q_stride[0] if i in q_pool_blocks else None, config.mlp_ratio, config.layer_norm_eps,
                ))

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """The windowed absolute position embedding for an (h, w) token grid, channels-last (1, h, w, C)."""
        background = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")
        window = self.pos_embed_window
        tiled = window.tile(1, 1, h // window.shape[-2], w // window.shape[-1])
        return (background + tiled).permute(0, 2, 3, 1)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(pixel_values)  # (B, S/4, S/4, C)
        x = x + self.position_embedding(*x.shape[1:3])
        ends = set(self.config.stage_ends)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


class SinePositionEncoding(nn.Module):
    """DETR's 2-D sine position encoding of a feature map's grid, normalised to (0, 2*pi].

    (B, C, H, W) -> (B, num_pos_feats, H, W): the first half encodes y, the second x, each as
    interleaved sin/cos at temperature^(2*(i//2)/(num_pos_feats/2)) (Carion et al. 2020).
    """

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0):
        super().__init__()
        self.half = num_pos_feats // 2
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        eps, scale = 1e-6, 2 * math.pi
        y = torch.arange(1, h + 1, dtype=torch.float32, device=x.device)
        xs = torch.arange(1, w + 1, dtype=torch.float32, device=x.device)
        y = y / (y[-1] + eps) * scale
        xs = xs / (xs[-1] + eps) * scale
        dim_t = torch.arange(self.half, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.half)

        def encode(pos):  # (n,) -> (n, half): sin on even, cos on odd channels
            p = pos[:, None] / dim_t
            return torch.stack([p[:, 0::2].sin(), p[:, 1::2].cos()], dim=2).flatten(1)

        pos_y = encode(y)[:, None, :].expand(h, w, -1)
        pos_x = encode(xs)[None, :, :].expand(h, w, -1)
        return torch.cat([pos_y, pos_x], dim=-1).permute(2, 0, 1)[None].expand(b, -1, -1, -1).to(x.dtype)


class FpnNeck(nn.Module):
    """Stage maps, finest first -> `d_model`-channel features and their sine position encodings, finest first.

    Each stage gets a 1x1 convolution (`convs` are ordered coarsest first, as in Meta's configs);
    levels in `fpn_top_down_levels` add the next coarser output upsampled 2x. The `scalp`
    coarsest levels are dropped.
    """

    def __init__(self, config: SamHQ2HieraConfig):
        super().__init__()
        self.config = config
        self.convs = nn.ModuleList(nn.Conv2d(c, config.d_model, kernel_size=1) for c in config.backbone_channel_list)
        self.position_encoding = SinePositionEncoding(config.d_model)

    def forward(self, stages: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cfg = self.config
        n = len(self.convs) - 1
        out: list[torch.Tensor] = [None] * len(stages)  # type: ignore[list-item]
        prev = None
        for i in range(n, -1, -1):  # coarsest first
            lateral = conv2d(self.convs[n - i], stages[i])
            if i in cfg.fpn_top_down_levels and prev is not None:
                # Meta's code upsamples in fp32 whatever the dtype.
                top_down = F.interpolate(prev.float(), scale_factor=2.0, mode=cfg.fpn_interp_model,
                                         align_corners=None if cfg.fpn_interp_model == "nearest" else False)
                prev = lateral + top_down
                if cfg.fuse_type == "avg":
                    prev = prev / 2
            else:
                prev = lateral
            out[i] = prev
        keep = out[:len(out) - cfg.scalp]
        return keep, [self.position_encoding(f) for f in keep]


class Sam2VisionEncoder(nn.Module):
    """Hiera + FPN neck: pixels (B, 3, S, S) -> (features, position encodings), finest level first.

    With SAM 2's configs at S = 1024: features (B, 256, 256, 256), (B, 256, 128, 128), (B, 256, 64, 64).
    """

    def __init__(self, config: SamHQ2HieraConfig):
        super().__init__()
        self.config = config
        self.backbone = Hiera(config)
        self.neck = FpnNeck(config)

    def forward(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.neck(self.backbone(pixel_values))
