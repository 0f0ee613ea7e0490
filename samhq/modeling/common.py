"""Small building blocks shared by the encoders and the decoder, and the fast-path switch."""
import torch
from torch import nn
from torch.nn import functional as F


class FastPathModule(nn.Module):
    """A module with a fast form of its forward in `samhq.modeling.fast_paths`.

    The fast form runs when `fast_path` is set (the model sets it for every such module, see
    `SamHQModel.set_fast_path`) and the module is in eval mode. The fast forms are for inference:
    some reuse buffers, which autograd cannot differentiate, so the model's forwards run them without
    autograd, and train mode (or `set_fast_path(False)`) always runs the plain forward.
    """

    fast_path = False

    @property
    def use_fast_path(self) -> bool:
        return self.fast_path and not self.training


def set_fast_path(module: nn.Module, enabled: bool) -> None:
    """Switch the fast forms of every `FastPathModule` inside `module` on or off."""
    for m in module.modules():
        if isinstance(m, FastPathModule):
            m.fast_path = enabled


def gelu(x: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """Exact GELU; `in_place` overwrites x (a fresh large tensor on a CPU costs page faults more than the GELU)."""
    return torch.ops.aten.gelu_(x) if in_place else F.gelu(x)


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)`, computed in float32 when x is a bfloat16/float16 tensor on a CPU, the result cast back to x's dtype.

    On a Xeon with AMX, oneDNN's bfloat16 convolutions at the ViT's patch-embedding and neck shapes took 150 ms each
    against 4 ms in float32 (torch 2.11, benchmarks/results-amx.md): 40% of the bf16 encoder's time for 0.3% of its
    multiply-adds. Rounding the float32 result to x's dtype is the only difference from a bf16 kernel's output.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
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
