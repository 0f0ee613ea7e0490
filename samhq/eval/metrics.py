"""Mask metrics: IoU and boundary IoU (Cheng et al. 2021), as SAM-HQ reports them (mIoU, mBIoU)."""
from __future__ import annotations

import math

import numpy as np

from ..masks import erode


def boundary_width(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """The boundary band width d in pixels: dilation_ratio x image diagonal, rounded, at least 1."""
    return max(1, int(round(dilation_ratio * math.hypot(height, width))))


def mask_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """Pixels of `mask` within d pixels (chessboard distance) of the background or the image border."""
    mask = np.asarray(mask, dtype=bool)
    d = boundary_width(*mask.shape, dilation_ratio)
    return mask & ~erode(mask, d)


def mask_iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """|gt & pred| / |gt | pred| for two (H, W) boolean masks; 1.0 when both are empty."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: gt {gt.shape}, pred {pred.shape}")
    union = np.count_nonzero(gt | pred)
    return 1.0 if union == 0 else np.count_nonzero(gt & pred) / union


def boundary_iou(gt: np.ndarray, pred: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """IoU of the two masks' boundary bands (band width = dilation_ratio x image diagonal); 1.0 when both are empty."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: gt {gt.shape}, pred {pred.shape}")
    return mask_iou(mask_boundary(gt, dilation_ratio), mask_boundary(pred, dilation_ratio))
