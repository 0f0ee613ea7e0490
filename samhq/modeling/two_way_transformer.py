"""SAM's two-way transformer: prompt tokens and image tokens attend to each other."""
import torch
from torch import nn
from torch.nn import functional as F

from ..config import SamHQMaskDecoderConfig
from .common import MLPBlock

# The official model's transformer LayerNorms use PyTorch's default eps; transformers uses the
# config's 1e-6. The checkpoints were trained with the former.
NORM_EPS = 1e-5


class Attention(nn.Module):
    """Multi-head attention with the inner width reduced by `downsample_rate`.

    Besides the plain `forward`, `to_image` and `from_image` serve the decoder's cross attention
    between a few prompt tokens (T) and many image tokens (HW). While T is below the head width they
    never project the image tokens: the key and query projections are moved onto the T tokens' side
    of the product and the value and output projections applied after the weighted sum. The result
    is the same function, with T/d (d the head width) of the image-side multiply-adds.
    """

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

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)  # (..., heads, N, d)

    def _weight(self, proj: nn.Linear) -> torch.Tensor:
        return proj.weight.view(self.num_heads, self.head_dim, -1)  # (heads, d, C)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C)."""
        out = F.scaled_dot_product_attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v)))
        return self.out_proj(out.transpose(-3, -2).flatten(-2))

    def _absorb(self, tokens: torch.Tensor, image: torch.Tensor | None) -> bool:
        return (not torch.jit.is_tracing() and tokens.shape[-2] < self.head_dim
                and (image is None or image.shape[:-2] == tokens.shape[:-2]))

    def _value_out(self, v: torch.Tensor) -> torch.Tensor:
        """Tokens v (..., T, C) -> each head's values through its slice of out_proj, (..., heads*T, C)."""
        w = self.out_proj.weight.unflatten(1, (self.num_heads, -1)).permute(1, 2, 0)  # (heads, d, C)
        return (self._heads(self.v_proj(v)) @ w).flatten(-3, -2)

    def to_image(self, q, k, v, shared=None) -> torch.Tensor:
        """Tokens q (B, P, T, C) attending to image tokens k, v (B, P, HW, C) -> (B, P, T, C).

        shared: the image's projected keys and values in head layout, (B, heads, HW, d) each, when one
        image (k = v = None) serves all P prompts.
        """
        if shared is not None:
            b, p, t, _ = q.shape
            qh = self._heads(self.q_proj(q)).transpose(1, 2).reshape(b, self.num_heads, p * t, -1)
            out = F.scaled_dot_product_attention(qh, *shared)  # (B, heads, P*T, d)
            return self.out_proj(out.unflatten(2, (p, t)).permute(0, 2, 3, 1, 4).flatten(-2))
        if not self._absorb(q, k):
            return self(q, k, v)
        # the key bias adds one constant to each query's scores: softmax ignores it
        a = (self._heads(self.q_proj(q)) @ self._weight(self.k_proj)) * self.head_dim ** -0.5  # (..., heads, T, C)
        scores = torch.bmm(k.flatten(0, -3), a.flatten(-3, -2).flatten(0, -3).transpose(1, 2))  # (N, HW, heads*T)
        y = torch.bmm(scores.softmax(1).transpose(1, 2), v.flatten(0, -3)).view(*q.shape[:-2], self.num_heads, -1, q.shape[-1])
        out = y @ self._weight(self.v_proj).transpose(-1, -2) + self.v_proj.bias.view(self.num_heads, 1, -1)  # softmax sums to one
        return self.out_proj(out.transpose(-3, -2).flatten(-2))

    def from_image(self, q, k, v, shared=None) -> torch.Tensor:
        """Image tokens q (B, P, HW, C) attending to tokens k, v (B, P, T, C) -> (B, P, HW, C).

        shared: the image's projected queries in head layout, (B, heads, HW, d), when one image (q = None)
        serves all P prompts.
        """
        heads, t = self.num_heads, k.shape[-2]
        if shared is not None:
            b, p = k.shape[:2]
            kh = self._heads(self.k_proj(k)).permute(0, 2, 4, 1, 3).reshape(b, heads, -1, p * t)  # (B, heads, d, P*T)
            a = ((shared @ kh) * self.head_dim ** -0.5).view(b, heads, -1, p, t).softmax(-1)
            a = a.permute(0, 3, 2, 1, 4).flatten(-2).flatten(0, 1)  # (B*P, HW, heads*T)
            return torch.baddbmm(self.out_proj.bias, a, self._value_out(v).flatten(0, 1)).view(b, p, -1, v.shape[-1])
        if not self._absorb(k, q):
            return self(q, k, v)
        kh = self._heads(self.k_proj(k))  # (..., heads, T, d)
        scale = self.head_dim ** -0.5
        qk = (kh @ self._weight(self.q_proj)).flatten(-3, -2) * scale  # (..., heads*T, C)
        bias = (kh @ self.q_proj.bias.view(heads, -1, 1)).flatten(-3) * scale  # (..., heads*T)
        a = torch.baddbmm(bias.flatten(0, -2)[:, None], q.flatten(0, -3), qk.flatten(0, -3).transpose(1, 2))
        a = a.unflatten(-1, (heads, t)).softmax(-1).flatten(-2)  # (N, HW, heads*T)
        return torch.baddbmm(self.out_proj.bias, a, self._value_out(v).flatten(0, -3)).view(q.shape)


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

    def forward(self, queries, keys, query_pe, key_pe, shared=None):
        """shared: `TwoWayTransformer.image_context`'s projections when this is the first layer and keys its image."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.layer_norm1(queries)
        if shared is None:
            k = keys + key_pe
            t2i = self.cross_attn_token_to_image.to_image(queries + query_pe, k, keys)
        else:
            k = None
            t2i = self.cross_attn_token_to_image.to_image(queries + query_pe, None, None, (shared["k"], shared["v"]))
        queries = self.layer_norm2(queries + t2i)
        queries = self.layer_norm3(queries + self.mlp(queries))
        i2t = self.cross_attn_image_to_token.from_image(k, queries + query_pe, queries, None if shared is None else shared["q"])
        keys = self.layer_norm4(keys + i2t)
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, config: SamHQMaskDecoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(config, i == 0) for i in range(config.num_hidden_layers))
        self.final_attn_token_to_image = Attention(
            config.hidden_size, config.num_attention_heads, config.attention_downsample_rate
        )
        self.layer_norm_final_attn = nn.LayerNorm(config.hidden_size, eps=NORM_EPS)

    def image_context(self, image: torch.Tensor, image_pe: torch.Tensor) -> dict[str, torch.Tensor]:
        """The first layer's image-only work, for an image (B, 1, C, h, w) that many prompts will share.

        Returns its tokens, their positional encoding and the first layer's projections of them, which
        `forward(..., context=...)` then reuses instead of recomputing them for every call.
        """
        keys = image.flatten(-2).transpose(-1, -2).contiguous()  # (B, 1, HW, C); later sums keep this layout
        key_pe = image_pe.flatten(-2).transpose(-1, -2).contiguous()
        k = keys + key_pe
        first = self.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        return {"keys": keys, "key_pe": key_pe,
                "k": t2i._heads(t2i.k_proj(k))[:, 0].contiguous(), "v": t2i._heads(t2i.v_proj(keys))[:, 0].contiguous(),
                "q": i2t._heads(i2t.q_proj(k))[:, 0].contiguous()}

    def forward(self, image: torch.Tensor | None, image_pe: torch.Tensor | None, tokens: torch.Tensor,
                context: dict[str, torch.Tensor] | None = None):
        """image (B, 1 or P, C, h, w), image_pe (1, C, h, w), tokens (B, P, T, C) -> (tokens (B, P, T, C), image tokens (B, P, h*w, C)).

        An image shared by the P prompts is given once, (B, 1, C, h, w); or, in its place, its
        `image_context` (image and image_pe are then not used).
        """
        if context is None:
            keys = image.flatten(-2).transpose(-1, -2)
            key_pe = image_pe.flatten(-2).transpose(-1, -2)
        else:
            keys, key_pe = context["keys"], context["key_pe"]
        queries = tokens
        for i, layer in enumerate(self.layers):
            queries, keys = layer(queries, keys, tokens, key_pe, context if i == 0 else None)
        attn = self.final_attn_token_to_image.to_image(queries + tokens, keys + key_pe, keys)
        return self.layer_norm_final_attn(queries + attn), keys
