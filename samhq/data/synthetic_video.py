"""A synthetic video with ground truth: two shapes crossing the frame, passing behind an occluding bar.

Used by the video tests (parity, CLI, DAVIS evaluation), by the memory measurement and by the README
figure. Every video is a pure function of its arguments.
"""
from __future__ import annotations

import numpy as np

# Object ids in the label maps: 1 the disk, 2 the square; 0 background (the bar included).
DISK, SQUARE = 1, 2


def moving_shapes(num_frames: int = 10, height: int = 96, width: int = 128, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Frames (num_frames of (H, W, 3) uint8 RGB) and label maps (num_frames, H, W) uint8 of the visible parts.

    A red disk moves left to right in the upper half and a blue square right to left in the lower half, over
    a smooth textured background; a grey vertical bar in the middle covers them as they pass (the square is
    hidden completely for a frame or two, the disk partly). Motion repeats every 20 frames, so long videos
    (for memory measurements) keep the objects in view.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.stack([90 + 40 * np.sin(xx / 17.0 + c) * np.cos(yy / 13.0 - c) for c in (0.0, 1.0, 2.0)], axis=-1)
    background += rng.normal(0, 6, size=background.shape)
    bar_x0, bar_x1 = int(width * 0.42), int(width * 0.64)
    r, side = height * 0.15, height * 0.22
    frames, labels = [], np.zeros((num_frames, height, width), np.uint8)
    for t in range(num_frames):
        phase = (t % 20) / 19.0  # 0 .. 1 across the frame, then again
        cx1, cy1 = width * (0.12 + 0.76 * phase), height * 0.3
        cx2, cy2 = width * (0.86 - 0.72 * phase), height * 0.7
        disk = (xx - cx1) ** 2 + (yy - cy1) ** 2 <= r * r
        square = (np.abs(xx - cx2) <= side / 2) & (np.abs(yy - cy2) <= side / 2)
        bar = (xx >= bar_x0) & (xx < bar_x1)
        image = background.copy()
        image[square] = (40, 70, 200)
        image[disk] = (210, 50, 40)
        image[bar] = (150, 150, 150)
        frames.append(np.clip(image, 0, 255).astype(np.uint8))
        labels[t][square & ~bar] = SQUARE
        labels[t][disk & ~bar] = DISK
    return frames, labels


__all__ = ["moving_shapes", "DISK", "SQUARE"]
