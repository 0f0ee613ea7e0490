"""Turning dataset items into training samples in the model's input frame.

An item is a dict with "image" uint8 (H, W, 3) and "masks", a list of bool (H, W). The image is
resized so its longest side is the model's image size (bilinear, as the seed's processor), scaled
to [0, 1], normalised with the ImageNet mean/std and padded bottom/right; masks get the same
geometry (nearest), so prompts and labels share the input frame.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the longest side equal to `size`, rounded as the seed's processor does."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess_image(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised, padded pixel values (3, size, size) float32."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"training images must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    h, w = resized_shape(*image.shape[:2], size)
    if (h, w) != image.shape[:2]:
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    return F.pad(x, (0, size - w, 0, size - h))


def preprocess_masks(masks: list[np.ndarray], size: int) -> torch.Tensor:
    """Bool masks [(H, W)] -> bool (P, size, size) in the padded input frame (nearest resize)."""
    m = torch.from_numpy(np.stack([np.asarray(x, dtype=bool) for x in masks])).float()
    h, w = resized_shape(*m.shape[-2:], size)
    if (h, w) != tuple(m.shape[-2:]):
        m = F.interpolate(m[None], size=(h, w), mode="nearest")[0]
    return F.pad(m, (0, size - w, 0, size - h)) > 0.5


def labels_at(frame_masks: torch.Tensor, size: int) -> torch.Tensor:
    """Input-frame masks (P, S, S) -> soft labels (P, size, size) in [0, 1] by area averaging."""
    m = frame_masks.float()
    if m.shape[-1] == size:
        return m
    return F.interpolate(m[None], size=(size, size), mode="area")[0]
