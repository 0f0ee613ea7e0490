"""TinyViT-5M, the image encoder of Light HQ-SAM (vit_tiny), from MobileSAM.

Four stages at 1/4, 1/8, 1/16, 1/16 of the image: MBConv blocks, then windowed attention blocks
with a learned per-offset bias and a depthwise "local" convolution. Parameter names follow the
official checkpoint inside `vision_encoder.` so conversion is a prefix change.
"""
import itertools

import torch
from torch import nn
from torch.nn import functional as F

from ..config import SamHQTinyViTConfig
from . import fast_paths
from .common import FastPathModule, gelu
from .image_encoder import Neck, window_partition, window_unpartition


class ConvBN(nn.Sequential, FastPathModule):
    """Conv2d without bias followed by BatchNorm2d (children named `c` and `bn`)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fast_path:
            return fast_paths.conv_bn(self, x)
        return self.bn(self.c(x))


class PatchEmbed(FastPathModule):
    """(B, 3, S, S) -> (B, C, S/4, S/4)."""

    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(cin, dim // 2, 3, 2), nn.GELU(), ConvBN(dim // 2, dim, 3, 2))

    def forward(self, x):
        return self.seq[2](gelu(self.seq[0](x), self.use_fast_path))


class MBConv(FastPathModule):
    def __init__(self, dim: int, expand: float):
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x):
        fast = self.use_fast_path
        y = gelu(self.conv2(gelu(self.conv1(x), fast)), fast)
        return gelu(x + self.conv3(y), fast)


class PatchMerging(FastPathModule):
    """(B, C, H, W) or (B, H*W, C) -> (B, H'*W', C_out); stride 2, or 1 before the last stage."""

    def __init__(self, resolution: int, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.resolution = resolution
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x):
        if x.ndim == 3:
            x = x.view(x.shape[0], self.resolution, self.resolution, -1).permute(0, 3, 1, 2)
        fast = self.use_fast_path
        x = self.conv3(gelu(self.conv2(gelu(self.conv1(x), fast)), fast))
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])  # a view for channels-last x


class TinyAttention(nn.Module):
    """Attention over window tokens (B, N, C) with a learned bias per head and |dy|, |dx| offset."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.window = window
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", torch.empty(0, dtype=torch.long), persistent=False)
        self.init_buffers()

    def init_buffers(self):
        """(N, N) index of each token pair's |offset| into `attention_biases`, numbered in first-seen order."""
        points = list(itertools.product(range(self.window), range(self.window)))
        offsets, idxs = {}, []
        for p in points:
            for q in points:
                idxs.append(offsets.setdefault((abs(p[0] - q[0]), abs(p[1] - q[1])), len(offsets)))
        device = self.attention_biases.device
        self.attention_bias_idxs = torch.tensor(idxs, device=None if device.type == "meta" else device).view(len(points), -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.key_dim).transpose(1, 2)
        q, k, v = qkv.split(self.key_dim, dim=-1)
        # a 4-D mask: CPU flash attention refuses 3-D ones and falls back to the slow math path
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(FastPathModule):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(gelu(self.fc1(self.norm(x)), self.use_fast_path))


class TinyViTBlock(nn.Module):
    """(B, H*W, C) -> same: windowed attention, depthwise 3x3 conv, MLP."""

    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, mlp_ratio: float, local_conv: int):
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = TinyAttention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        r, w = self.resolution, self.window
        if r == w:
            y = self.attn(x)
        else:
            win, padded = window_partition(x.view(b, r, r, c), w)
            y = self.attn(win.view(-1, w * w, c)).view(-1, w, w, c)
            y = window_unpartition(y, w, padded, (r, r)).view(b, n, c)
        x = x + y
        # channels-last views: no copies around the depthwise convolution
        x = self.local_conv(x.view(b, r, r, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, n, c)
        return x + self.mlp(x)


class Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViTEncoder(FastPathModule):
    """pixel_values (B, 3, S, S) -> (embeddings (B, 256, S/16, S/16), [stage-1 features (B, S/16, S/16, 160)])."""

    def __init__(self, config: SamHQTinyViTConfig):
        super().__init__()
        self.config = config
        dims, depths = config.embed_dims, config.depths
        self.patch_embed = PatchEmbed(config.num_channels, dims[0])
        res = config.image_size // 4
        resolutions = [res, res // 2, res // 4, res // 4]
        self.layers = nn.ModuleList()
        for i in range(4):
            down = None
            if i < 3:
                down = PatchMerging(resolutions[i], dims[i], dims[i + 1], stride=2 if i < 2 else 1)
            if i == 0:
                blocks = [MBConv(dims[0], config.mbconv_expand_ratio) for _ in range(depths[0])]
            else:
                blocks = [
                    TinyViTBlock(dims[i], resolutions[i], config.num_heads[i], config.window_sizes[i],
                                 config.mlp_ratio, config.local_conv_size)
                    for _ in range(depths[i])
                ]
            self.layers.append(Stage(blocks, down))
        self.grid = resolutions[-1]
        self.neck = Neck(dims[-1], config.output_channels)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, g = pixel_values.shape[0], self.grid
        if self.use_fast_path:
            pixel_values = fast_paths.channels_last(pixel_values)
        x = self.layers[0](self.patch_embed(pixel_values))
        x = self.layers[1](x)
        early = x.view(b, g, g, -1)
        x = self.layers[3](self.layers[2](x))
        return self.neck(x.view(b, g, g, -1).permute(0, 3, 1, 2)), [early]
