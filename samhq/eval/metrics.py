"""Mask metrics: IoU and boundary IoU (Cheng et al. 2021), as SAM-HQ reports them (mIoU, mBIoU).

Binary morphology with square structuring elements lives here too; it is numpy only, so the
synthetic data and the metrics need no scipy or OpenCV.
"""
from __future__ import annotations

import math

import numpy as np


def _shift_reduce(mask: np.ndarray, radius: int, op, fill: bool) -> np.ndarray:
    """Apply `op` (np.maximum / np.minimum) over a (2r+1)^2 square, separably; outside pixels are `fill`."""
    out = mask.astype(bool, copy=True)
    if radius <= 0:
        return out
    for axis in (0, 1):
        src = out
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(src, pad, constant_values=fill)
        n = src.shape[axis]
        acc = src.copy()
        for k in range(2 * radius + 1):
            if k == radius:
                continue
            window = padded[k:k + n] if axis == 0 else padded[:, k:k + n]
            op(acc, window, out=acc)
        out = acc
    return out


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of an (H, W) mask by a (2r+1) x (2r+1) square."""
    return _shift_reduce(mask, radius, np.maximum, False)


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion of an (H, W) mask by a (2r+1) x (2r+1) square; outside the image counts as background."""
    return _shift_reduce(mask, radius, np.minimum, False)


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
