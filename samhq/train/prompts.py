"""Prompt sampling from ground-truth masks, the way SAM and SAM-HQ are trained.

Each mask gets one prompt kind: a noisy box (noise of ~10% of the box side, at most 20 px, as in
SAM), 1..N positive points inside the mask plus 0..N negative points in the box around it, or a
noisy low-resolution mask input (the ground truth degraded and turned into noisy logits, like
SAM-HQ's `masks_noise`). Every function takes a numpy Generator, so sampling is reproducible.
Coordinates are pixels of the frame the masks are given in.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from ..modeling.prompt_encoder import PAD_LABEL

KINDS = ("box", "point", "mask")


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight box (x0, y0, x1, y1) of a non-empty (H, W) mask, pixel-inclusive as SAM's boxes."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("cannot take the box of an empty mask")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def noisy_box(mask: np.ndarray, rng: np.random.Generator, scale: float = 0.1, max_px: float = 20.0) -> np.ndarray:
    """The mask's box with each coordinate moved by N(0, scale * side), clipped to +-max_px and the image."""
    box = mask_box(mask)
    h, w = mask.shape
    side = np.array([box[2] - box[0], box[3] - box[1]] * 2, dtype=np.float32) + 1
    box = box + np.clip(rng.normal(0, scale, 4) * side, -max_px, max_px)
    x0, x1 = sorted(np.clip(box[[0, 2]], 0, w - 1))
    y0, y1 = sorted(np.clip(box[[1, 3]], 0, h - 1))
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def sample_points(mask: np.ndarray, rng: np.random.Generator, max_positive: int = 5, max_negative: int = 5,
                  negative_prob: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """1..max_positive points in the mask and (with negative_prob) 1..max_negative in its box outside it.

    Returns coords (K, 2) as pixel (x, y) and labels (K,) with 1 = foreground, 0 = background.
    """
    ys, xs = np.nonzero(mask)
    n_pos = int(rng.integers(1, max_positive + 1))
    pick = rng.integers(0, len(xs), n_pos)
    coords, labels = [np.stack([xs[pick], ys[pick]], 1)], [np.ones(n_pos)]
    if max_negative > 0 and rng.random() < negative_prob:
        x0, y0, x1, y1 = mask_box(mask).astype(int)
        by, bx = np.nonzero(~mask[y0:y1 + 1, x0:x1 + 1])
        if len(bx):
            n_neg = int(rng.integers(1, max_negative + 1))
            pick = rng.integers(0, len(bx), n_neg)
            coords.append(np.stack([bx[pick] + x0, by[pick] + y0], 1))
            labels.append(np.zeros(n_neg))
    return np.concatenate(coords).astype(np.float32), np.concatenate(labels).astype(np.int64)


def noisy_mask_logits(mask: torch.Tensor, size: int, rng: np.random.Generator, noise: float = 1.0) -> torch.Tensor:
    """A degraded mask prompt: mask (H, W) in the input frame -> logits (size, size).

    The mask is area-downsampled, its boundary randomly grown or shrunk by up to 2 cells, scaled
    to logits of +-(2..8) and perturbed by Gaussian noise (std `noise` x that scale).
    """
    m = F.interpolate(mask[None, None].float(), size=(size, size), mode="area")
    r = int(rng.integers(-2, 3))
    if r > 0:
        m = F.max_pool2d(m, 2 * r + 1, 1, r)
    elif r < 0:
        m = -F.max_pool2d(-m, -2 * r + 1, 1, -r)
    scale = float(rng.uniform(2, 8))
    g = torch.from_numpy(rng.standard_normal((size, size)).astype(np.float32))
    return ((2 * m[0, 0] - 1) * scale + noise * scale * g).float()


def sample_prompts(masks: torch.Tensor, kind: str, rng: np.random.Generator, mask_input_size: int,
                   max_points: int = 5, box_noise: float = 0.1) -> dict[str, torch.Tensor]:
    """Prompts of one kind for P masks (P, H, W) bool in the input frame, as SamHQModel inputs for one image.

    "box" -> input_boxes (1, P, 4); "point" -> input_points (1, P, K, 2), input_labels (1, P, K), padded
    with label -10; "mask" -> input_masks (1, P, mask_input_size, mask_input_size) logits.
    """
    if kind not in KINDS:
        raise ValueError(f"prompt kind must be one of {KINDS}, got {kind!r}")
    np_masks = masks.numpy().astype(bool)
    if kind == "box":
        return {"input_boxes": torch.from_numpy(np.stack([noisy_box(m, rng, box_noise) for m in np_masks]))[None]}
    if kind == "point":
        sampled = [sample_points(m, rng, max_points, max_points) for m in np_masks]
        k = max(len(c) for c, _ in sampled)
        pts = np.zeros((len(sampled), k, 2), np.float32)
        lab = np.full((len(sampled), k), PAD_LABEL, np.int64)
        for i, (c, lb) in enumerate(sampled):
            pts[i, :len(c)], lab[i, :len(lb)] = c, lb
        return {"input_points": torch.from_numpy(pts)[None], "input_labels": torch.from_numpy(lab)[None]}
    return {"input_masks": torch.stack([noisy_mask_logits(m, mask_input_size, rng) for m in masks])[None]}
