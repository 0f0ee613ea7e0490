"""Drawing masks and prompts on an image (used by `samhq segment` and `samhq everything`)."""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

FOREGROUND = (40, 220, 60)
BACKGROUND = (230, 40, 40)
BOX = (40, 120, 255)


def palette(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """n well-separated saturated colours (golden-ratio hue steps), the same for the same n and seed."""
    out = []
    for i in range(n):
        h = (seed * 0.17 + i * 0.618034) % 1.0
        out.append(tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, 0.85, 0.95)))
    return out


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: mask pixels with a 4-neighbour outside the mask (image borders count
    as outside), grown inwards to `width` pixels."""
    inner = mask.copy()
    for _ in range(max(1, width)):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def draw_masks(
    image: np.ndarray,
    masks,
    colors=None,
    alpha: float = 0.45,
    outline: int | None = None,
    points=None,
    labels=None,
    boxes=None,
) -> np.ndarray:
    """Overlay translucent coloured masks with outlines, then the prompts, on an RGB image.

    image (H, W, 3) uint8; masks (H, W) or (N, H, W) bool, or a list of (H, W); colors: one RGB per
    mask (default `palette`); points (K, 2) x, y with labels (K,) 1 foreground (green) / 0 background
    (red); boxes (M, 4) x0, y0, x1, y1. Returns a new (H, W, 3) uint8 image.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    masks = [np.asarray(m, dtype=bool) for m in (masks if isinstance(masks, (list, tuple)) else
                                                  np.asarray(masks).reshape(-1, *np.asarray(masks).shape[-2:]))]
    for m in masks:
        if m.shape != (h, w):
            raise ValueError(f"mask of shape {m.shape} does not match the {w}x{h} image")
    colors = list(colors) if colors is not None else palette(len(masks))
    if len(colors) < len(masks):
        raise ValueError(f"{len(masks)} masks but only {len(colors)} colours")
    width = outline if outline is not None else max(1, round(max(h, w) / 400))
    out = image.astype(np.float32)
    for m, c in zip(masks, colors):
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(c, np.float32)
    for m, c in zip(masks, colors):
        out[mask_outline(m, width)] = c
    canvas = Image.fromarray(np.round(out).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    r = max(3, round(max(h, w) / 120))
    if boxes is not None:
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=float).reshape(-1, 4):
            draw.rectangle([x0, y0, x1, y1], outline=BOX, width=max(1, r // 2))
    if points is not None:
        pts = np.asarray(points, dtype=float).reshape(-1, 2)
        labels = np.ones(len(pts)) if labels is None else np.asarray(labels).reshape(-1)
        for (x, y), lab in zip(pts, labels):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=FOREGROUND if lab == 1 else BACKGROUND,
                         outline=(255, 255, 255), width=max(1, r // 3))
    return np.asarray(canvas)
