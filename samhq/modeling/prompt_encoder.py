"""Prompt encoder: points, boxes and dense mask inputs to embeddings for the mask decoder."""
import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config import SamHQPromptEncoderConfig
from .common import LayerNorm2d

PAD_LABEL = -10  # a padding point: contributes nothing
NOT_A_POINT = -1  # SAM's "no point" token (also appended after points when no box is given)


class PositionalEmbedding(nn.Module):
    """Random-Fourier-feature encoding of (x, y) in [0, 1]: (..., 2) -> (..., 2 * num_pos_feats)."""

    def __init__(self, num_pos_feats: int, scale: float = 1.0):
        super().__init__()
        self.positional_embedding = nn.Parameter(scale * torch.randn(2, num_pos_feats))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        proj = (2 * coords.to(self.positional_embedding.dtype) - 1) @ self.positional_embedding
        proj = 2 * math.pi * proj
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def grid(self, size: int) -> torch.Tensor:
        """Encoding of every cell centre of a size x size grid: (1, C, size, size)."""
        centres = (torch.arange(size, device=self.positional_embedding.device, dtype=torch.float32) + 0.5) / size
        yy, xx = torch.meshgrid(centres, centres, indexing="ij")
        return self(torch.stack([xx, yy], dim=-1)).permute(2, 0, 1)[None]


class MaskEmbedding(nn.Module):
    """Mask logits (N, 1, 4h, 4w) -> dense embeddings (N, C, h, w)."""

    def __init__(self, config: SamHQPromptEncoderConfig):
        super().__init__()
        mid = config.mask_input_channels // 4
        self.conv1 = nn.Conv2d(1, mid, kernel_size=2, stride=2)
        self.layer_norm1 = LayerNorm2d(mid, config.layer_norm_eps)
        self.conv2 = nn.Conv2d(mid, config.mask_input_channels, kernel_size=2, stride=2)
        self.layer_norm2 = LayerNorm2d(config.mask_input_channels, config.layer_norm_eps)
        self.conv3 = nn.Conv2d(config.mask_input_channels, config.hidden_size, kernel_size=1)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.layer_norm1(self.conv1(masks)))
        x = F.gelu(self.layer_norm2(self.conv2(x)))
        return self.conv3(x)


class PromptEncoder(nn.Module):
    """Sparse (points, boxes) and dense (mask) prompt embeddings.

    Point labels: 1 foreground, 0 background, -1 "not a point", -10 padding.
    """

    def __init__(self, config: SamHQPromptEncoderConfig, shared_embedding: PositionalEmbedding):
        super().__init__()
        self.config = config
        self.shared_embedding = shared_embedding
        self.mask_embed = MaskEmbedding(config)
        self.no_mask_embed = nn.Embedding(1, config.hidden_size)
        self.point_embed = nn.ModuleList(nn.Embedding(1, config.hidden_size) for _ in range(config.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, config.hidden_size)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """points (..., N, 2) in input-frame pixels, labels (..., N) -> (..., N [+1], C)."""
        points = points + 0.5
        if pad:
            points = torch.cat([points, points.new_zeros(*points.shape[:-2], 1, 2)], dim=-2)
            labels = torch.cat([labels, labels.new_full((*labels.shape[:-1], 1), NOT_A_POINT)], dim=-1)
        emb = self.shared_embedding(points / self.config.image_size)
        labels = labels[..., None]
        emb = torch.where(labels == NOT_A_POINT, self.not_a_point_embed.weight, emb)
        emb = torch.where(labels == PAD_LABEL, torch.zeros_like(emb), emb)
        emb = emb + (labels == 0) * self.point_embed[0].weight + (labels == 1) * self.point_embed[1].weight
        return emb

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """boxes (..., 4) as x0, y0, x1, y1 -> (..., 2, C)."""
        corners = (boxes + 0.5).reshape(*boxes.shape[:-1], 2, 2)
        emb = self.shared_embedding(corners / self.config.image_size)
        return emb + torch.cat([self.point_embed[2].weight, self.point_embed[3].weight])

    def forward(
        self,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts for B images x P prompts each.

        points (B, P, N, 2), labels (B, P, N), boxes (B, P, 4), masks (B, 1 or P, 4h, 4w) or (B, P, 1, 4h, 4w).
        Returns sparse (B, P, T, C) and dense (B, 1 or P, C, h, w).
        """
        parts = []
        if points is not None:
            parts.append(self.embed_points(points, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self.embed_boxes(boxes))
        if parts:
            sparse = torch.cat(parts, dim=2)
        else:
            b, p = masks.shape[:2] if masks is not None else (1, 1)  # mask-only prompts: one per mask
            sparse = self.no_mask_embed.weight.new_zeros(b, p, 0, self.config.hidden_size)
        if masks is not None:
            if masks.ndim == 5:
                masks = masks.flatten(1, 2)
            b, p = masks.shape[:2]
            dense = self.mask_embed(masks.reshape(b * p, 1, *masks.shape[-2:]).to(sparse.dtype))
            dense = dense.view(b, p, *dense.shape[1:])
        else:
            g = self.config.image_embedding_size
            dense = self.no_mask_embed.weight.view(1, 1, -1, 1, 1).expand(sparse.shape[0], 1, -1, g, g)
        return sparse, dense
