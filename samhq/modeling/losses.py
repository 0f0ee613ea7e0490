"""Mask losses: sigmoid BCE + dice, densely or at uncertainty-sampled points (PointRend style, as
SAM-HQ trains), and the IoU-prediction loss SAM uses for its score head.

Predicted logits may be smaller than the ground truth (SAM's 256x256 low-res masks against full-size
labels): the dense loss upsamples logits bilinearly to the label size, the point loss samples both
at the same normalised coordinates, so thin structures in the labels are never averaged away.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft dice loss per row: logits, targets (N, K) -> (N,). Smoothed by +1 so empty masks are defined."""
    p = logits.sigmoid()
    inter = (p * targets).sum(-1)
    return 1 - (2 * inter + 1) / (p.sum(-1) + targets.sum(-1) + 1)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid binary cross-entropy per row: (N, K) -> (N,)."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)


def sample_at(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of maps (N, H, W) at coords (N, K, 2) given as (x, y) in [0, 1] -> (N, K)."""
    grid = (2 * coords - 1)[:, :, None, :].to(maps.dtype)
    return F.grid_sample(maps[:, None], grid, mode="bilinear", align_corners=False)[:, 0, :, 0]


def uncertain_points(logits: torch.Tensor, num_points: int, oversample: float = 3.0, importance: float = 0.75,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose num_points (x, y) in [0, 1] per mask where logits (N, h, w) are least certain.

    Draw oversample x num_points uniform candidates, keep the importance share with the smallest
    |logit| (interpolated at the candidate, not taken from the nearest cell) and fill the rest with
    fresh uniform points. Returns (N, num_points, 2).
    """
    n, dev = logits.shape[0], logits.device
    candidates = torch.rand(n, int(num_points * oversample), 2, device=dev, generator=generator)
    certainty = sample_at(logits.detach().float(), candidates).abs()
    k = int(importance * num_points)
    idx = certainty.topk(k, dim=1, largest=False).indices
    chosen = candidates.gather(1, idx[..., None].expand(-1, -1, 2))
    rest = torch.rand(n, num_points - k, 2, device=dev, generator=generator)
    return torch.cat([chosen, rest], dim=1)


def mask_losses(logits: torch.Tensor, targets: torch.Tensor, point_sampled: bool = False, num_points: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """BCE + dice for each mask: logits (N, h, w), binary targets (N, H, W) -> (N,).

    Dense: logits are upsampled to (H, W) when the sizes differ. Point-sampled: BCE and dice over
    `num_points` uncertainty-chosen points per mask (default min(112^2, H*W/4), as SAM-HQ's 112^2 at 1024).
    """
    logits = logits.float()
    targets = targets.to(logits.dtype)
    if point_sampled:
        if num_points is None:
            num_points = min(112 * 112, targets.shape[-2] * targets.shape[-1] // 4)
        with torch.no_grad():
            coords = uncertain_points(logits, num_points, generator=generator)
            t = sample_at(targets, coords)
        x = sample_at(logits, coords)
    else:
        if logits.shape[-2:] != targets.shape[-2:]:
            logits = F.interpolate(logits[:, None], size=targets.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        x, t = logits.flatten(1), targets.flatten(1)
    return bce_loss(x, t) + dice_loss(x, t)


def segmentation_loss(pred_masks: torch.Tensor, labels: torch.Tensor, point_sampled: bool = False,
                      num_points: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean BCE + dice over prompts; with several masks per prompt, the best (lowest-loss) one counts.

    pred_masks (B, P, M, h, w) logits; labels (B, H, W) (shared by all P prompts), (B, P, H, W) or
    (B, P, 1, H, W), at the logits' size or larger: floats in [0, 1], or integer/bool masks (non-zero is
    foreground). Returns a scalar.
    """
    if pred_masks.ndim != 5:
        raise ValueError(f"pred_masks must be (batch, prompts, masks, h, w), got {tuple(pred_masks.shape)}")
    b, p, m = pred_masks.shape[:3]
    if labels.ndim == 5:
        labels = labels[:, :, 0]
    if labels.ndim == 3:
        labels = labels[:, None]
    if labels.ndim != 4 or labels.shape[0] != b or labels.shape[1] not in (1, p):
        raise ValueError(f"labels must be (batch, h, w) or (batch, prompts, h, w) for pred_masks {tuple(pred_masks.shape)}, "
                         f"got {tuple(labels.shape)}")
    if not labels.is_floating_point():
        labels = labels > 0  # integer / bool maps (e.g. 0/255 PNG masks): any non-zero value is foreground
    elif labels.numel() and (labels.min() < 0 or labels.max() > 1):
        raise ValueError("float labels must be mask probabilities in [0, 1]; pass integer or bool masks to binarise them")
    labels = labels.expand(b, p, *labels.shape[-2:])[:, :, None].expand(b, p, m, *labels.shape[-2:])
    losses = mask_losses(pred_masks.flatten(0, 2), labels.flatten(0, 2), point_sampled, num_points, generator)
    return losses.view(b, p, m).min(dim=2).values.mean()


def iou_prediction_loss(pred_iou: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MSE between predicted IoU (N, M) and the IoU of each mask (N, M, h, w) with targets (N, H, W). Scalar."""
    with torch.no_grad():
        x = logits.float()
        if x.shape[-2:] != targets.shape[-2:]:
            x = F.interpolate(x, size=targets.shape[-2:], mode="bilinear", align_corners=False)
        pred = x > 0
        gt = targets[:, None].bool()
        inter = (pred & gt).flatten(2).sum(-1).float()
        union = (pred | gt).flatten(2).sum(-1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return F.mse_loss(pred_iou.float(), iou)
