"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Each block: self-attention of the tokens, tokens attend to the image, an MLP on the tokens, and
the image attends to the tokens; a final token-to-image attention follows the blocks. Positional
encodings are added to the queries and keys of every attention (not to the values).
The fast form for many prompts on one image is `fast_paths.decode_masks`.
"""
import torch
from torch import nn
from torch.nn import functional as F

from ..config import SamHQMaskDecoderConfig
from .common import MLPBlock

# The official model's transformer LayerNorms use PyTorch's default eps; transformers uses the
# config's 1e-6. The checkpoints were trained with the former.
NORM_EPS = 1e-5


class Attention(nn.Module):
    """Multi-head attention with the inner width reduced by `downsample_rate`."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError(f"attention width {inner} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = inner // num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(..., N, heads * d) -> (..., heads, N, d)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (..., Nq, C), k and v (..., Nk, C) -> (..., Nq, C)."""
        out = F.scaled_dot_product_attention(self.heads(self.q_proj(q)), self.heads(self.k_proj(k)), self.heads(self.v_proj(v)))
        return self.out_proj(out.transpose(-3, -2).flatten(-2))


class TwoWayBlock(nn.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention."""

    def __init__(self, config: SamHQMaskDecoderConfig, skip_first_layer_pe: bool):
        super().__init__()
        c, heads, rate, eps = config.hidden_size, config.num_attention_heads, config.attention_downsample_rate, NORM_EPS
        self.self_attn = Attention(c, heads)
        self.layer_norm1 = nn.LayerNorm(c, eps=eps)
        self.cross_attn_token_to_image = Attention(c, heads, rate)
        self.layer_norm2 = nn.LayerNorm(c, eps=eps)
        self.mlp = MLPBlock(c, config.mlp_dim, nn.ReLU)
        self.layer_norm3 = nn.LayerNorm(c, eps=eps)
        self.layer_norm4 = nn.LayerNorm(c, eps=eps)
        self.cross_attn_image_to_token = Attention(c, heads, rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def token_self_attention(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        """Step (1): self-attention of the tokens (..., T, C) and layer_norm1; the first layer's tokens are their own
        positional encoding."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        return self.layer_norm1(queries)

    def forward(self, queries, keys, query_pe, key_pe):
        """queries and query_pe (N, T, C) prompt tokens, keys and key_pe (N, HW, C) image tokens -> (queries, keys)."""
        queries = self.token_self_attention(queries, query_pe)  # (1)
        # (2) tokens attend to the image
        k = keys + key_pe
        queries = self.layer_norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        # (3) MLP on the tokens
        queries = self.layer_norm3(queries + self.mlp(queries))
        # (4) the image attends to the tokens
        keys = self.layer_norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, config: SamHQMaskDecoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(config, i == 0) for i in range(config.num_hidden_layers))
        self.final_attn_token_to_image = Attention(
            config.hidden_size, config.num_attention_heads, config.attention_downsample_rate
        )
        self.layer_norm_final_attn = nn.LayerNorm(config.hidden_size, eps=NORM_EPS)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        """image (N, C, h, w), image_pe (1 or N, C, h, w), tokens (N, T, C) -> (tokens (N, T, C), image tokens (N, h*w, C))."""
        return self.attend(image.flatten(2).transpose(1, 2), image_pe.flatten(2).transpose(1, 2), tokens)

    def attend(self, keys: torch.Tensor, key_pe: torch.Tensor, tokens: torch.Tensor):
        """`forward` on image tokens: keys (N, HW, C), key_pe (1 or N, HW, C), tokens (N, T, C) -> the same outputs."""
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.layer_norm_final_attn(queries + attn), keys
