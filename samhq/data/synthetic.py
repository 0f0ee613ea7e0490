"""Synthetic images of objects with fine structure, for training and testing SAM-HQ without real data.

Objects are wires and curves 1-3 px wide, rings and shapes with holes, combs, spiky stars, concave
polygons, lattices and branching trees, drawn over textured, cluttered backgrounds; later objects
and unannotated clutter occlude earlier ones. Every image is a pure function of (seed, index), so
datasets are reproducible and randomly indexable. `coarsen` turns a fine mask into the kind of
smooth, thin-part-free mask SA-1B-style annotation gives.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from ..masks import dilate, erode

KINDS = ("wire", "curve", "ring", "comb", "star", "polygon", "lattice", "holes", "branch")


def _smooth_path(ctrl: np.ndarray, steps: int = 12) -> list[tuple[float, float]]:
    """Catmull-Rom spline through control points (K, 2) -> dense list of (x, y)."""
    pts = np.concatenate([ctrl[:1], ctrl, ctrl[-1:]])
    t = np.linspace(0, 1, steps, endpoint=False)[:, None]
    out = []
    for i in range(1, len(pts) - 2):
        p0, p1, p2, p3 = pts[i - 1], pts[i], pts[i + 1], pts[i + 2]
        seg = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        out.extend(map(tuple, seg))
    out.append(tuple(ctrl[-1]))
    return out


def _rotate(points: np.ndarray, angle: float, centre: tuple[float, float]) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    p = points @ np.array([[c, s], [-s, c]]) + np.asarray(centre)
    return list(map(tuple, p))


def _wire(d, rng, cx, cy, r):
    k = int(rng.integers(3, 7))
    ctrl = np.stack([cx + rng.uniform(-r, r, k), cy + rng.uniform(-r, r, k)], 1)
    d.line(_smooth_path(ctrl), fill=255, width=int(rng.integers(1, 4)), joint="curve")


def _curve(d, rng, cx, cy, r):
    w = int(rng.integers(1, 4))
    if rng.random() < 0.5:  # spiral
        turns = rng.uniform(1.5, 3.5)
        th = np.linspace(0, 2 * math.pi * turns, 200)
        rad = r * (0.15 + 0.85 * th / th[-1])
        pts = np.stack([rad * np.cos(th), rad * np.sin(th)], 1)
    else:  # sine wave
        x = np.linspace(-r, r, 120)
        pts = np.stack([x, r * rng.uniform(0.15, 0.5) * np.sin(x / r * math.pi * rng.uniform(1, 4))], 1)
    d.line(_rotate(pts, rng.uniform(0, math.pi), (cx, cy)), fill=255, width=w, joint="curve")


def _ring(d, rng, cx, cy, r):
    rx, ry = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.6, 1.0)
    w = int(rng.integers(2, max(3, int(r / 5)) + 1))
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=255, width=w)
    if rng.random() < 0.5:  # an inner ring joined by thin spokes
        f = rng.uniform(0.35, 0.6)
        d.ellipse([cx - f * rx, cy - f * ry, cx + f * rx, cy + f * ry], outline=255, width=max(1, w // 2))
        for a in rng.uniform(0, 2 * math.pi, int(rng.integers(2, 7))):
            d.line([(cx + f * rx * math.cos(a), cy + f * ry * math.sin(a)), (cx + rx * math.cos(a), cy + ry * math.sin(a))],
                   fill=255, width=int(rng.integers(1, 3)))


def _comb(d, rng, cx, cy, r):
    angle = rng.uniform(0, math.pi)
    t = rng.uniform(2, max(3, r / 6))
    n = int(rng.integers(5, 16))
    length = r * rng.uniform(0.5, 1.0)
    polys = [np.array([[-r, -t], [r, -t], [r, t], [-r, t]])]
    tw = rng.integers(1, 4) / 2
    for x in np.linspace(-r + tw, r - tw, n):
        polys.append(np.array([[x - tw, t], [x + tw, t], [x + tw, t + length], [x - tw, t + length]]))
    for p in polys:
        d.polygon(_rotate(p, angle, (cx, cy)), fill=255)


def _star(d, rng, cx, cy, r):
    n = int(rng.integers(5, 15))
    th = np.linspace(0, 2 * math.pi, 2 * n, endpoint=False) + rng.uniform(0, math.pi)
    rad = np.where(np.arange(2 * n) % 2 == 0, r * rng.uniform(0.8, 1.0, 2 * n), r * rng.uniform(0.12, 0.45))
    d.polygon(list(zip(cx + rad * np.cos(th), cy + rad * np.sin(th))), fill=255)


def _polygon(d, rng, cx, cy, r):
    n = int(rng.integers(6, 15))
    th = np.sort(rng.uniform(0, 2 * math.pi, n))
    rad = r * rng.uniform(0.25, 1.0, n)
    d.polygon(list(zip(cx + rad * np.cos(th), cy + rad * np.sin(th))), fill=255)


def _lattice(d, rng, cx, cy, r):
    angle = rng.uniform(0, math.pi / 2)
    hw, hh = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.6, 1.0)
    step = rng.uniform(4, max(5, r / 4))
    w = int(rng.integers(1, 3))
    lines = [((-hw, y), (hw, y)) for y in np.arange(-hh, hh + 1e-6, step)]
    lines += [((x, -hh), (x, hh)) for x in np.arange(-hw, hw + 1e-6, step)]
    if rng.random() < 0.4:  # diagonal bracing
        lines += [((-hw, -hh), (hw, hh)), ((-hw, hh), (hw, -hh))]
    for a, b in lines:
        d.line(_rotate(np.array([a, b]), angle, (cx, cy)), fill=255, width=w)


def _holes(d, rng, cx, cy, r):
    rx, ry = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.6, 1.0)
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    for _ in range(int(rng.integers(3, 12))):
        a, f = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.75)
        hx, hy, hr = cx + f * rx * math.cos(a), cy + f * ry * math.sin(a), rng.uniform(1, max(2, r / 8))
        d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=0)
    for _ in range(int(rng.integers(0, 4))):  # thin slits
        a = rng.uniform(0, math.pi)
        ln = r * rng.uniform(0.3, 0.8)
        d.line([(cx - ln * math.cos(a), cy - ln * math.sin(a)), (cx + ln * math.cos(a), cy + ln * math.sin(a))],
               fill=0, width=int(rng.integers(1, 3)))


def _branch(d, rng, cx, cy, r):
    def grow(x, y, angle, length, width, depth):
        x2, y2 = x + length * math.cos(angle), y + length * math.sin(angle)
        d.line([(x, y), (x2, y2)], fill=255, width=max(1, int(round(width))))
        if depth > 0:
            for _ in range(int(rng.integers(2, 4))):
                grow(x2, y2, angle + rng.uniform(-0.9, 0.9), length * rng.uniform(0.5, 0.8), width * 0.6, depth - 1)

    base = rng.uniform(0, 2 * math.pi)
    grow(cx - 0.5 * r * math.cos(base), cy - 0.5 * r * math.sin(base), base, r * 0.55, rng.uniform(2.5, 4.5),
         int(rng.integers(2, 4)))


_DRAW = {"wire": _wire, "curve": _curve, "ring": _ring, "comb": _comb, "star": _star, "polygon": _polygon,
         "lattice": _lattice, "holes": _holes, "branch": _branch}


def _value_noise(rng, h, w, cells: int, channels: int) -> np.ndarray:
    """Smooth random field in [0, 1], (h, w, channels), from a cells x cells grid upsampled bilinearly."""
    grid = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    img = Image.fromarray(grid if channels == 3 else grid[..., 0]).resize((w, h), Image.BILINEAR)
    out = np.asarray(img, dtype=np.float32) / 255
    return out if channels == 3 else out[..., None]


def _background(rng, h, w) -> np.ndarray:
    """Gradient + smooth colour noise + optional stripes/checks, float32 (h, w, 3) in 0..255."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx * math.cos(a) + yy * math.sin(a)) / max(h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    img += (_value_noise(rng, h, w, int(rng.integers(3, 12)), 3) - 0.5) * rng.uniform(40, 140)
    kind = rng.integers(0, 3)
    if kind > 0:
        f, amp, b = rng.uniform(0.05, 0.6), rng.uniform(10, 40), rng.uniform(0, 2 * math.pi)
        pattern = np.sin(f * (xx * math.cos(b) + yy * math.sin(b)))
        if kind == 2:
            pattern = np.sign(pattern * np.sin(f * (-xx * math.sin(b) + yy * math.cos(b))))
        img += amp * pattern[..., None]
    return img


def _clutter(rng, h, w, count: int) -> tuple[Image.Image, Image.Image]:
    """Unannotated distractors: an RGB layer and its coverage mask (L)."""
    layer, cover = Image.new("RGB", (w, h)), Image.new("L", (w, h))
    dl, dc = ImageDraw.Draw(layer), ImageDraw.Draw(cover)
    s = min(h, w)
    for _ in range(count):
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.02, 0.12) * s
        shape = rng.integers(0, 3)
        if shape == 0:
            box = [x - r, y - r * rng.uniform(0.3, 1), x + r, y + r * rng.uniform(0.3, 1)]
            dl.ellipse(box, fill=col), dc.ellipse(box, fill=255)
        elif shape == 1:
            box = [x - r, y - r, x + r * rng.uniform(0.3, 1), y + r * rng.uniform(0.3, 1)]
            dl.rectangle(box, fill=col), dc.rectangle(box, fill=255)
        else:
            pts = [(x, y), (x + rng.uniform(-3, 3) * r, y + rng.uniform(-3, 3) * r)]
            width = int(rng.integers(1, 5))
            dl.line(pts, fill=col, width=width), dc.line(pts, fill=255, width=width)
    return layer, cover


def _object_colour(rng, under: np.ndarray) -> np.ndarray:
    """A colour that differs from the mean background under the object by at least ~60 levels."""
    mean = under.mean(0) if len(under) else np.full(3, 128.0)
    for _ in range(8):
        col = rng.uniform(0, 255, 3)
        if np.abs(col - mean).max() > 60:
            return col
    return np.where(mean > 127, mean - 100, mean + 100).clip(0, 255)


def render_object(kind: str, height: int, width: int, rng: np.random.Generator, centre=None, radius=None) -> np.ndarray:
    """Draw one object of `kind` into a boolean (height, width) mask."""
    s = min(height, width)
    r = radius if radius is not None else rng.uniform(0.12, 0.35) * s
    cx, cy = centre if centre is not None else (rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height)
    canvas = Image.new("L", (width, height))
    _DRAW[kind](ImageDraw.Draw(canvas), rng, cx, cy, r)
    return np.asarray(canvas) > 127


class SyntheticShapes:
    """A reproducible dataset of synthetic images with fine-structured object masks.

    Item i is a dict: image uint8 (H, W, 3), masks list of bool (H, W) after occlusion (non-empty),
    kinds list of str (one per mask). Items depend only on (seed, i).
    """

    def __init__(self, num_images: int, image_size=(256, 256), seed: int = 0, objects_per_image=(1, 4),
                 kinds=KINDS, clutter: bool = True, noise: bool = True, min_visible: float = 0.3):
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; known: {KINDS}")
        if not 1 <= objects_per_image[0] <= objects_per_image[1]:
            raise ValueError(f"objects_per_image must be (min, max) with 1 <= min <= max, got {objects_per_image}")
        self.num_images, self.image_size, self.seed = int(num_images), tuple(image_size), int(seed)
        self.objects_per_image, self.kinds = tuple(objects_per_image), tuple(kinds)
        self.clutter, self.noise, self.min_visible = clutter, noise, min_visible

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        rng = np.random.default_rng((self.seed, index % self.num_images))
        for _ in range(20):  # retry until at least one object stays visible
            item = self._generate(rng)
            if item["masks"]:
                return item
        raise RuntimeError("could not generate a visible object; image_size may be too small")

    def _generate(self, rng) -> dict:
        h, w = self.image_size
        img = _background(rng, h, w)
        if self.clutter:
            layer, cover = _clutter(rng, h, w, int(rng.integers(3, 15)))
            c = np.asarray(cover)[..., None] > 127
            img = np.where(c, np.asarray(layer, dtype=np.float32), img)
        masks, kinds, areas = [], [], []
        n = int(rng.integers(self.objects_per_image[0], self.objects_per_image[1] + 1))
        for _ in range(n):
            kind = self.kinds[int(rng.integers(len(self.kinds)))]
            m = render_object(kind, h, w, rng)
            if not m.any():
                continue
            col = _object_colour(rng, img[m])
            shade = 1 + (_value_noise(rng, h, w, 4, 1) - 0.5) * rng.uniform(0, 0.5)
            img = np.where(m[..., None], col * shade, img)
            masks = [old & ~m for old in masks]
            masks.append(m), kinds.append(kind), areas.append(m.sum())
        if self.clutter and rng.random() < 0.5:  # unannotated occluders in front of the objects
            layer, cover = _clutter(rng, h, w, int(rng.integers(1, 4)))
            c = np.asarray(cover) > 127
            img = np.where(c[..., None], np.asarray(layer, dtype=np.float32), img)
            masks = [m & ~c for m in masks]
        if self.noise:
            img = img + rng.normal(0, rng.uniform(1, 8), img.shape).astype(np.float32)
        keep = [i for i, m in enumerate(masks) if m.sum() >= max(16, self.min_visible * areas[i])]
        return {"image": img.clip(0, 255).astype(np.uint8), "masks": [masks[i] for i in keep],
                "kinds": [kinds[i] for i in keep]}


def coarsen(mask: np.ndarray, radius: int | None = None, factor: int = 4) -> np.ndarray:
    """An SA-1B-like coarse version of a fine (H, W) mask: thin parts and small holes gone, boundary smoothed.

    Morphological opening then closing by a (2r+1) square (r defaults to ~1.2% of the short side,
    at least 2), then a polygon-like simplification: area-downsample by `factor`, threshold at 0.5 and
    upsample bilinearly. A mask made only of thin parts becomes a thickened, smoothed version of itself.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    r = radius if radius is not None else max(2, int(round(0.012 * min(h, w))))
    out = dilate(erode(mask, r), r)
    if not out.any():
        out = dilate(mask, r)
    out = erode(dilate(out, r), r) | (out & ~erode(np.ones_like(out), r))  # closing, keeping border pixels
    small = Image.fromarray(out.astype(np.uint8) * 255).resize((max(1, w // factor), max(1, h // factor)), Image.BOX)
    small = Image.fromarray(((np.asarray(small) > 127) * 255).astype(np.uint8))
    coarse = np.asarray(small.resize((w, h), Image.BILINEAR)) > 127
    return coarse if coarse.any() else out


def main(argv=None) -> None:
    """Write a few synthetic images and mask overlays as PNGs (a quick look at the data)."""
    import argparse
    import os

    p = argparse.ArgumentParser(description="Write synthetic fine-mask images to a folder (im/*.jpg, gt/*.png).")
    p.add_argument("output")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    os.makedirs(os.path.join(a.output, "im"), exist_ok=True)
    os.makedirs(os.path.join(a.output, "gt"), exist_ok=True)
    data = SyntheticShapes(a.num, (a.size, a.size), seed=a.seed)
    for i in range(len(data)):
        item = data[i]
        Image.fromarray(item["image"]).save(os.path.join(a.output, "im", f"{i:05d}.jpg"), quality=95)
        Image.fromarray(item["masks"][-1].astype(np.uint8) * 255).save(os.path.join(a.output, "gt", f"{i:05d}.png"))
    print(f"wrote {len(data)} images to {a.output}")


if __name__ == "__main__":
    main()
