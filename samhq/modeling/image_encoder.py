"""SAM's ViT image encoder: patch embedding, windowed/global attention with decomposed
relative positions, and a convolutional neck to 256 channels.

One class serves ViT-B/L/H; the variant is the config.
"""
import torch
from torch import nn
from torch.nn import functional as F

from ..config import SamHQVisionConfig
from . import fast_paths
from .common import FastPathModule, LayerNorm2d, MLPBlock, conv2d, rel_pos_terms


class Attention(FastPathModule):
    """Multi-head self-attention on a (B, H, W, C) grid, with optional decomposed relative positions."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, use_rel_pos: bool, input_size: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size - 1, head_dim))

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`qkv`'s output (B, L, 3C) -> q, k, v (B, n, L, d) each, views of it."""
        return qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        q, k, v = self.split_heads(self.qkv(x.reshape(b, h * w, c)))
        if self.use_fast_path:
            out = fast_paths.vit_attention(self, q, k, v, h, w)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, n, HW, HW)
            if self.use_rel_pos:
                term_h, term_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, h, w)
                bias = term_h[..., :, None] + term_w[..., None, :]  # (B, n, h, w, h, w)
                attn = attn + bias.reshape(attn.shape)
            out = (attn.softmax(dim=-1) @ v).transpose(1, 2)  # (B, HW, n, d)
        return self.proj(out.reshape(b, h, w, c))


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWindows, window, window, C), zero-padding H and W up to multiples of window."""
    b, h, w, c = x.shape
    ph, pw = (window - h % window) % window, (window - w % window) % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(x: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`, cropping the padding."""
    hp, wp = padded
    b = x.shape[0] // (hp * wp // window // window)
    x = x.view(b, hp // window, wp // window, window, window, -1).transpose(2, 3).reshape(b, hp, wp, -1)
    return x[:, : size[0], : size[1]].contiguous() if (hp, wp) != tuple(size) else x


class VisionLayer(FastPathModule):
    """Pre-norm transformer block; `window_size == 0` means global attention."""

    def __init__(self, config: SamHQVisionConfig, window_size: int):
        super().__init__()
        grid = config.image_size // config.patch_size
        self.window_size = window_size
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            config.qkv_bias,
            config.use_rel_pos,
            window_size if window_size else grid,
        )
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLPBlock(config.hidden_size, config.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fast_path:
            return fast_paths.vit_layer(self, x)
        y = self.layer_norm1(x)
        if self.window_size:
            size = y.shape[1:3]
            y, padded = window_partition(y, self.window_size)
            y = window_unpartition(self.attn(y), self.window_size, padded, size)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.layer_norm2(x))


class PatchEmbed(FastPathModule):
    """(B, 3, S, S) -> (B, S/p, S/p, C): a p x p convolution with stride p, channels last."""

    def __init__(self, config: SamHQVisionConfig):
        super().__init__()
        p = config.patch_size
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.use_fast_path and pixel_values.dtype == torch.float32:  # other precisions: common.conv2d's rule
            return fast_paths.patch_embed(self.projection, pixel_values)
        return conv2d(self.projection, pixel_values).permute(0, 2, 3, 1)


class Neck(nn.Module):
    """(B, C, H, W) -> (B, out, H, W): 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d."""

    def __init__(self, in_channels: int, out_channels: int, eps: float = 1e-6):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.layer_norm1 = LayerNorm2d(out_channels, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.layer_norm2 = LayerNorm2d(out_channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm2(conv2d(self.conv2, self.layer_norm1(conv2d(self.conv1, x))))


class VisionEncoder(nn.Module):
    """pixel_values (B, 3, S, S) -> (embeddings (B, 256, S/16, S/16), [early features (B, S/16, S/16, C)]).

    The list holds the output of every global-attention layer; SAM-HQ fuses the first one.
    """

    def __init__(self, config: SamHQVisionConfig):
        super().__init__()
        self.config = config
        grid = config.image_size // config.patch_size
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.hidden_size)) if config.use_abs_pos else None
        glob = set(config.global_attn_indexes)
        self.layers = nn.ModuleList(
            VisionLayer(config, 0 if i in glob else config.window_size) for i in range(config.num_hidden_layers)
        )
        self.neck = Neck(config.hidden_size, config.output_channels)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(pixel_values)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[1:3] != x.shape[1:3]:
                pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic").permute(0, 2, 3, 1)
            x = x + pos
        intermediate = []
        for layer in self.layers:
            x = layer(x)
            if layer.window_size == 0:
                intermediate.append(x)
        return self.neck(x.permute(0, 3, 1, 2)), intermediate
