"""Prompt encoder: points, boxes and dense mask inputs to embeddings for the mask decoder."""
import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config import SamHQPromptEncoderConfig
from .common import LayerNorm2d

PAD_LABEL = -10  # a padding point: contributes nothing
NOT_A_POINT = -1  # SAM's "no point" token (also appended after points when no box is given)
POINT_LABELS = (1, 0, NOT_A_POINT, PAD_LABEL)  # foreground, background, not a point, padding
_NAMES = {"points": "input_points", "labels": "input_labels", "boxes": "input_boxes", "masks": "input_masks"}


def check_prompts(points=None, labels=None, boxes=None, masks=None, mask_size: int = 256, names: dict | None = None) -> None:
    """The one validation of prompt tensors, before they reach the prompt encoder.

    points (B, P, N, 2) and labels (B, P, N) with values in `POINT_LABELS`; boxes (B, P, 4) as x0, y0,
    x1, y1 with x1 >= x0 and y1 >= y0; masks (B, 1 or P, m, m) or (B, P, 1, m, m) logits with
    m = mask_size. Raises ValueError naming the offending input (`names` maps points, labels, boxes,
    masks to the caller's argument names) and what it should be.
    """
    n = {**_NAMES, **(names or {})}
    for key, t in (("points", points), ("labels", labels), ("boxes", boxes), ("masks", masks)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{n[key]} must be a torch.Tensor, got {type(t).__name__}")
    if points is not None:
        if points.ndim != 4 or points.shape[-1] != 2:
            raise ValueError(f"{n['points']} must be (batch, point_batch, points, 2), got {tuple(points.shape)}")
        if not torch.isfinite(points).all():
            raise ValueError(f"{n['points']} contain NaN or infinite values")
        if labels is not None:
            if tuple(labels.shape) != tuple(points.shape[:-1]):
                raise ValueError(f"{n['labels']} shape {tuple(labels.shape)} does not match {n['points']} {tuple(points.shape)}")
            bad = ~torch.isin(labels.to(torch.int64), torch.tensor(POINT_LABELS, device=labels.device))
            if bad.any():
                raise ValueError(f"point labels must be 1 (foreground), 0 (background), -1 (not a point) or -10 "
                                 f"(padding); {n['labels']} holds {labels[bad].flatten()[0].item():g}")
    elif labels is not None:
        raise ValueError(f"{n['labels']} were given without {n['points']}")
    if boxes is not None:
        if boxes.ndim != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"{n['boxes']} must be (batch, boxes, 4), got {tuple(boxes.shape)}")
        if not torch.isfinite(boxes).all():
            raise ValueError(f"{n['boxes']} contain NaN or infinite values")
        if points is not None and tuple(points.shape[:2]) != tuple(boxes.shape[:2]):
            raise ValueError(f"{n['points']} {tuple(points.shape)} and {n['boxes']} {tuple(boxes.shape)} must agree on "
                             "batch and prompt count")
        inverted = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
        if inverted.any():
            x0, y0, x1, y1 = (float(v) for v in boxes.reshape(-1, 4)[int(inverted.flatten().nonzero()[0, 0])])
            raise ValueError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) must have x1 >= x0 and y1 >= y0 (format x0, y0, x1, y1)")
    if masks is not None:
        if masks.ndim == 5 and masks.shape[2] == 1:
            masks = masks[:, :, 0]
        if masks.ndim != 4 or tuple(masks.shape[-2:]) != (mask_size, mask_size):
            raise ValueError(f"{n['masks']} must be (batch, 1 or prompts, {mask_size}, {mask_size}) low-res logits, "
                             f"got {tuple(masks.shape)}")
        if not torch.isfinite(masks).all():
            raise ValueError(f"{n['masks']} contain NaN or infinite values")


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
        """points (..., N, 2) in input-frame pixels, labels (..., N) -> (..., N [+1], C).

        Labels: 1 foreground, 0 background, 2 / 3 a box's top-left / bottom-right corner, -1 "not a
        point" (SAM's padding token), -10 padding (contributes nothing). `pad` appends one "not a point",
        as SAM does when no box follows the points.
        """
        points = points + 0.5  # pixel centres
        if pad:
            points = torch.cat([points, points.new_zeros(*points.shape[:-2], 1, 2)], dim=-2)
            labels = torch.cat([labels, labels.new_full((*labels.shape[:-1], 1), NOT_A_POINT)], dim=-1)
        emb = self.shared_embedding(points / self.config.image_size)
        labels = labels[..., None]
        emb = torch.where(labels == NOT_A_POINT, self.not_a_point_embed.weight, emb)
        emb = torch.where(labels == PAD_LABEL, torch.zeros_like(emb), emb)
        for i, table in enumerate(self.point_embed):  # background, foreground, box corners
            emb = emb + (labels == i).to(emb.dtype) * table.weight
        return emb

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """boxes (..., 4) as x0, y0, x1, y1 -> (..., 2, C): the two corners as points labelled 2 and 3."""
        corners = boxes.reshape(*boxes.shape[:-1], 2, 2)
        labels = torch.tensor([2, 3], device=boxes.device).expand(corners.shape[:-1])
        return self.embed_points(corners, labels, pad=False)

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
