"""Turning dataset items into training samples in the model's input frame.

An item is a dict with "image" uint8 (H, W, 3) and "masks", a list of bool (H, W). The image goes
through the same preprocessing as inference (`samhq.processing`: longest side resized to the model's
image size, PIL bilinear; ImageNet mean/std; zero padding bottom/right); masks get the same geometry
(nearest), so prompts and labels share the input frame.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from ..processing import normalize_and_pad, preprocess_shape, resize_rgb


def preprocess_image(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised, padded pixel values (3, size, size) float32."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"training images must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if preprocess_shape(*image.shape[:2], size) != image.shape[:2]:
        image = resize_rgb(image, size)
    return normalize_and_pad(torch.from_numpy(image).permute(2, 0, 1)[None], size)[0]


def preprocess_masks(masks: list[np.ndarray], size: int) -> torch.Tensor:
    """Bool masks [(H, W)] -> bool (P, size, size) in the padded input frame (nearest resize)."""
    m = torch.from_numpy(np.stack([np.asarray(x, dtype=bool) for x in masks])).float()
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
