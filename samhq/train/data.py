"""Turning dataset items into training samples in the model's input frame.

An item is a dict with "image" uint8 (H, W, 3) and "masks", a list of bool (H, W). The image goes
through the same preprocessing as inference (`samhq.processing`: longest side resized to the model's
image size, PIL bilinear; ImageNet mean/std; zero padding bottom/right; for SAM 2 models a square resize
without padding); masks get the same geometry (nearest), so prompts and labels share the input frame.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from ..processing import ResizeSquare, normalize_and_pad, preprocess_shape, resize_rgb


def preprocess_image(image: np.ndarray, size: int, square: bool = False) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised pixel values (3, size, size) float32: SAM's frame (longest side resized,
    padded), or with `square` SAM 2's (resized to a square; `ResizeSquare`, as at inference)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"training images must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if square:
        return ResizeSquare(size).preprocess(image)[0]
    if preprocess_shape(*image.shape[:2], size) != image.shape[:2]:
        image = resize_rgb(image, size)
    return normalize_and_pad(torch.from_numpy(image).permute(2, 0, 1)[None], size)[0]


def preprocess_masks(masks: list[np.ndarray], size: int, square: bool = False) -> torch.Tensor:
    """Bool masks [(H, W)] -> bool (P, size, size) in the input frame (nearest resize): padded as SAM's, or
    with `square` resized to the square as SAM 2's."""
    m = torch.from_numpy(np.stack([np.asarray(x, dtype=bool) for x in masks])).float()
    if square:
        return F.interpolate(m[None], size=(size, size), mode="nearest")[0] > 0.5
    h, w = preprocess_shape(*m.shape[-2:], size)
    if (h, w) != tuple(m.shape[-2:]):
        m = F.interpolate(m[None], size=(h, w), mode="nearest")[0]
    return F.pad(m, (0, size - w, 0, size - h)) > 0.5


def labels_at(frame_masks: torch.Tensor, size: int) -> torch.Tensor:
    """Input-frame masks (P, S, S) -> soft labels (P, size, size) in [0, 1] by area averaging."""
    m = frame_masks.float()
    if m.shape[-1] == size:
        return m
    return F.interpolate(m[None], size=(size, size), mode="area")[0]
