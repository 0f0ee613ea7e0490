"""Turning whatever a user calls an image into one (H, W, 3) uint8 RGB array.

Accepted inputs and how they become RGB:
- a file path (str or os.PathLike): opened with PIL, EXIF orientation applied, then as a PIL image;
- a PIL image in any mode: modes with transparency (RGBA, LA, PA, P with a transparent colour) are
  composited onto white, as transformers' processor does; 16-bit and 32-bit integer modes (I;16, I)
  are scaled from 0..65535 to 0..255 (value / 257, rounded); float mode F is read as 0..1; every
  other mode (L, 1, P, CMYK, YCbCr, ...) goes through PIL's own `convert("RGB")`;
- a numpy array (H, W), (H, W, 1|3|4) or channel-first (1|3|4, H, W): uint8 as is, uint16 / other
  integers scaled from 0..65535, bool as 0 / 255, floats must lie in [0, 1] and are multiplied by
  255 and rounded; one channel is repeated three times; a fourth channel is alpha over white;
- a torch tensor (C, H, W) or (H, W): as the numpy array of the same layout.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_image(path) -> Image.Image:
    """Open an image file; raise ValueError naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"image file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not an image file")
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Any numeric array -> uint8, by the rules in the module docstring."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"integer image values must lie in 0..65535, got {arr.min()}..{arr.max()}")
        return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("image contains NaN or infinite values")
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise ValueError(
                f"float images must have values in [0, 1], got {arr.min():.4g}..{arr.max():.4g}; "
                "pass uint8 for 0..255 data"
            )
        return np.round(arr.astype(np.float64) * 255.0).astype(np.uint8)
    raise TypeError(f"unsupported image dtype {arr.dtype}")


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _array_to_rgb(np.asarray(im).astype(np.int64))
    if im.mode == "F":
        return _array_to_rgb(np.asarray(im))
    if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channel-first
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"an image array must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; got shape {tuple(arr.shape)}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image is empty ({arr.shape[1]}x{arr.shape[0]} pixels)")
    arr = _scale_to_uint8(arr)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:  # alpha over white
        alpha = arr[..., 3:].astype(np.float64) / 255.0
        arr = np.round(arr[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(arr)


def to_rgb_array(image, image_format: str = "RGB") -> np.ndarray:
    """Any supported image (see module docstring) -> (H, W, 3) uint8 RGB array.

    image_format: the channel order of an array or tensor, "RGB" or "BGR" (OpenCV's); files and PIL
    images are decoded as RGB, so "BGR" with one of them is a ValueError.
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    raw = isinstance(image, np.ndarray) or type(image).__module__.startswith("torch")
    if image_format == "BGR" and not raw:
        raise ValueError("image_format='BGR' describes the channel order of an array or tensor; a file or PIL image "
                         "is decoded as RGB, so leave image_format at 'RGB' for it")
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image is empty ({image.width}x{image.height} pixels)")
        return _pil_to_rgb(image)
    if type(image).__module__.startswith("torch"):
        image = image.detach().cpu()
        if image.dtype.is_floating_point:
            image = image.float()
        image = image.numpy()
        if image.ndim == 3 and not (image.shape[-1] in (1, 3, 4) and image.shape[0] not in (1, 3, 4)):
            image = np.moveaxis(image, 0, -1)  # tensors are channel-first, unless plainly (H, W, C)
    if isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image)
        return np.ascontiguousarray(rgb[..., ::-1]) if image_format == "BGR" else rgb
    raise TypeError(
        f"unsupported image type {type(image).__name__}: pass a file path, PIL image, numpy array or torch tensor"
    )


def check_image_size(height: int, width: int, target: int = 1024) -> None:
    """Refuse images too small to segment: empty, a single pixel, or a side that resizes to 0 pixels."""
    if height < 1 or width < 1:
        raise ValueError(f"image is empty ({width}x{height} pixels)")
    if height * width < 2:
        raise ValueError(f"image is a single pixel ({width}x{height}); nothing to segment")
    scale = target / max(height, width)
    if int(height * scale + 0.5) < 1 or int(width * scale + 0.5) < 1:
        raise ValueError(f"image is {width}x{height} pixels: too thin to resize to {target} on its long side")
