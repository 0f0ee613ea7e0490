"""Small building blocks shared by the encoders and the decoder, and the fast-path switch."""
import torch
from torch import nn
from torch.nn import functional as F


class FastPathModule(nn.Module):
    """A module with a fast form of its forward in `samhq.modeling.fast_paths`.

    `fast_path` is True (the eager fast forms), "graph" (only the fast forms that are plain tensor algebra, which
    trace to one graph: what the ONNX export uses) or False (the plain forms); the model sets it for every such
    module (`SamHQModel.set_fast_path`). Either fast setting applies in eval mode only. The eager fast forms reuse
    buffers, which autograd cannot differentiate, so the model's forwards run them without autograd, and train mode
    always runs the plain forward.
    """

    fast_path: bool | str = False

    @property
    def use_fast_path(self) -> bool:
        return self.fast_path is True and not self.training

    @property
    def use_graph_forms(self) -> bool:
        return self.fast_path == "graph" and not self.training


def set_fast_path(module: nn.Module, enabled: bool | str) -> None:
    """Set the fast-path switch of every `FastPathModule` inside `module`: True, False or "graph" (see there)."""
    if not (enabled is True or enabled is False or enabled == "graph"):
        raise ValueError(f"set_fast_path takes True, False or 'graph', got {enabled!r}")
    for m in module.modules():
        if isinstance(m, FastPathModule):
            m.fast_path = enabled


def gelu(x: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """Exact GELU; `in_place` overwrites x (a fresh large tensor on a CPU costs page faults more than the GELU)."""
    return torch.ops.aten.gelu_(x) if in_place else F.gelu(x)


def add_image_features(x: torch.Tensor, image_features: torch.Tensor, p: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-prompt maps x (N, ...) plus their images' maps image_features (B, ...), for B images with p prompts
    each: N = B*p in image-major order, or, with `rows`, the prompts at those indices of the B*p (row // p is the
    image). The full form broadcasts; the selected form gathers one copy of the image maps per prompt."""
    if rows is None:
        return (x.unflatten(0, (-1, p)) + image_features[:, None]).flatten(0, 1)
    return x + image_features[rows // p]


def kept_rows(needed, iou: torch.Tensor) -> torch.Tensor | None:
    """The flat prompt indices (int64) whose masks `needed(iou)` (bool per prompt, shape iou.shape[:-1]) asks for;
    None when needed is None (every prompt)."""
    return None if needed is None else needed(iou).flatten().nonzero()[:, 0]


def nan_rows(values: torch.Tensor, rows: torch.Tensor | None, n: int) -> torch.Tensor:
    """values (len(rows), ...) placed at `rows` of an (n, ...) tensor of NaN; values itself when rows is None."""
    if rows is None:
        return values
    return values.new_full((n, *values.shape[1:]), float("nan")).index_copy_(0, rows, values)


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)`, computed in float32 when x is a bfloat16 tensor on a CPU, the result cast back to bfloat16.

    On a Xeon with AMX, oneDNN's bfloat16 convolutions at the ViT's patch-embedding and neck shapes took 150 ms each
    against 4 ms in float32 (torch 2.11, benchmarks/results-amx.md): 40% of the bf16 encoder's time for 0.3% of its
    multiply-adds. Rounding the float32 result to bfloat16 is the only difference from a bf16 kernel's output.
    float16 is left alone: it is the ONNX export's GPU precision, whose file keeps float16 weights.
    """
    if x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return conv(x)
    bias = None if conv.bias is None else conv.bias.float()
    return F.conv2d(x.float(), conv.weight.float(), bias, conv.stride, conv.padding, conv.dilation, conv.groups).to(x.dtype)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_dim(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """The same normalisation for a channels-last (B, H, W, C) tensor."""
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class MLPBlock(FastPathModule):
    """Linear -> activation (GELU or ReLU) -> Linear: the transformer blocks' feed-forward."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin1(x)
        if isinstance(self.act, nn.GELU):
            return self.lin2(gelu(h, self.use_fast_path))
        return self.lin2(self.act(h))


class FeedForward(nn.Module):
    """`num_layers` linear layers with ReLU between them (hypernetworks, IoU head)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_layers - 2))
        self.proj_out = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.proj_in(x))
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.proj_out(x)


def rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) pair along one axis.

    rel_pos: (L, C) learned table; resized linearly when L != 2 * size - 1.
    Returns (size, size, C), entry [q, k] = rel_pos[q - k + size - 1].
    """
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.T[None].float(), size=length, mode="linear")[0].T.to(rel_pos.dtype)
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[idx[:, None] - idx[None, :] + size - 1]


def rel_pos_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, h: int, w: int):
    """The two factors of the decomposed relative-position bias (MViTv2, as SAM's ViT uses it).

    q (B, n, HW, d) queries, unscaled. Returns (B, n, h, w, h) and (B, n, h, w, w): the bias of query
    (i, j) and key (k, l) is term_h[..., i, j, k] + term_w[..., i, j, l].
    """
    b, n, _, d = q.shape
    rq = q.reshape(b, n, h, w, d)
    term_h = torch.einsum("bnhwd,hkd->bnhwk", rq, rel_pos_table(h, rel_pos_h))
    term_w = torch.einsum("bnhwd,wkd->bnhwk", rq, rel_pos_table(w, rel_pos_w))
    return term_h, term_w
