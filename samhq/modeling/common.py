"""Small building blocks shared by the encoders and the decoder."""
import torch
from torch import nn
from torch.nn import functional as F


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


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU of a freshly computed tensor, in place when autograd does not need it.

    Allocating a large new tensor (page faults) costs more on a CPU than the GELU itself.
    """
    if (torch.is_grad_enabled() and x.requires_grad) or torch.jit.is_tracing():
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


class MLPBlock(nn.Module):
    """Linear -> activation -> Linear (the transformer blocks' feed-forward)."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin1(x)
        return self.lin2(gelu(h) if isinstance(self.act, nn.GELU) else self.act(h))


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
