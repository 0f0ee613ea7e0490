"""The one image intake: whatever a user calls an image becomes one (H, W, 3) uint8 RGB array.

Every entry point (predictor, automatic generator, pipelines, processor, `samhq segment` /
`everything`, the server's uploads, the training and evaluation datasets) reads images through
`to_rgb_array` (or `open_image` for encoded files), so all of them see the same pixels.

Accepted inputs and how they become RGB:
- a file path (str or os.PathLike) or the bytes of an encoded file (an upload): the size the file
  declares is checked against `max_pixels` *before* decoding (`samhq.limits`), then the file is
  decoded with PIL and its EXIF orientation applied (a phone photo stored sideways comes out upright),
  then as a PIL image;
- a PIL image in any mode, as it is (an EXIF orientation it still carries is not applied, with a
  warning; pass the path instead): modes with transparency (RGBA, LA, PA, P with a transparent colour) are
  composited onto white, as transformers' processor does; 16-bit and 32-bit integer modes (I;16, I)
  and float mode F as the numpy array of their values; every other mode (L, 1, P, CMYK, YCbCr, ...)
  goes through PIL's own `convert("RGB")`;
- a numpy array (H, W), (H, W, 1|3|4) or channel-first (1|3|4, H, W): uint8 as is, bool as 0 / 255,
  other integers and floats by `bit_depth` (below); one channel is repeated three times; a fourth
  channel is alpha over white (scaled by its dtype's range);
- a torch tensor (C, H, W) or (H, W): as the numpy array of the same layout.

`bit_depth` says how images with more than 8 bits (uint16, int32, float) become 0..255:
- "dtype" (default): by the type's range: integers from 0..65535 (value / 257, rounded), floats from
  [0, 1] (value * 255, rounded; values outside [0, 1] are an error). An integer image whose values
  stay below a quarter of 65535 (12-bit microscopy or satellite data stored in 16 bits) comes out
  nearly black: a warning names the other two modes;
- "minmax": the image's own minimum and maximum become 0 and 255 (a constant image becomes 0);
- "percentile": the image's 1st and 99.8th percentiles become 0 and 255, values beyond are clipped
  (the normalisation of CSBDeep / StarDist; robust to a few hot pixels).
The stretch is computed over the colour channels together, so their balance is kept. 8-bit images
are never rescaled.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .limits import Limits, check_pixels, get_limits, image_too_large

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
BIT_DEPTH_MODES = ("dtype", "minmax", "percentile")
PERCENTILES = (1.0, 99.8)
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)
_pil_lock = threading.Lock()


def _allow_pil_size(max_pixels: int) -> None:
    """PIL warns above Image.MAX_IMAGE_PIXELS and refuses above twice that on its own; samhq's
    `max_pixels` is the check that counts, so PIL's is raised (never lowered) to a raised `max_pixels`."""
    with _pil_lock:
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


@contextlib.contextmanager
def _opened(source, limits: Limits, name: str | None):
    """PIL's lazy open of an encoded image (path or bytes), its declared size checked against `max_pixels`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        what, fp = name or f"the image data ({len(source)} bytes)", io.BytesIO(source)
    else:
        path = Path(source)
        what, fp = name or str(path), path
        if not path.exists():
            raise ValueError(f"image file not found: {path}")
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not an image file")
    _allow_pil_size(limits.max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except Image.DecompressionBombError as e:  # PIL's own check, before ours: the size is in its message only
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise image_too_large(None, None, limits.max_pixels, int(pixels[1]) if pixels else None) from None
    except _READ_ERRORS as e:
        raise ValueError(f"cannot read {what} as an image: {e}") from None
    with im:
        check_pixels(im.width, im.height, limits)  # the declared size, before decoding
        try:
            yield im
        except _READ_ERRORS as e:
            raise ValueError(f"cannot read {what} as an image: {e}") from None


def open_image(source, limits: Limits | None = None, name: str | None = None) -> Image.Image:
    """Decode an encoded image (a file path, or bytes) -> PIL image, upright by its EXIF orientation.

    The size the file declares is checked against `limits.max_pixels` (default: the process-wide
    limits) before any pixel is decoded. Raises `samhq.limits.LimitError` for a too-large image and
    ValueError naming the file (or `name`) when it is missing, truncated or not an image.
    """
    with _opened(source, limits or get_limits(), name) as im:
        im.load()
        return ImageOps.exif_transpose(im)


def load_image(path, limits: Limits | None = None) -> Image.Image:
    """Open an image file, upright by its EXIF orientation (see `open_image`)."""
    return open_image(path, limits)


def image_size(source, limits: Limits | None = None) -> tuple[int, int]:
    """(width, height) of an encoded image as `open_image` returns it (EXIF orientation applied), from
    the file's header alone, without decoding. Raises as `open_image`."""
    with _opened(source, limits or get_limits(), None) as im:
        w, h = im.size
        # PIL decodes a whole PNG to look for an eXIf chunk after the pixel data; one before it is in `info`.
        orientation = 1 if im.format == "PNG" and "exif" not in im.info else im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _stretch(arr: np.ndarray, bit_depth: str) -> np.ndarray:
    """Colour channels of any numeric dtype -> uint8, by `bit_depth` (see the module docstring)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"unsupported image dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite values")
    if bit_depth == "dtype" or arr.size == 0:
        return _by_dtype(arr)
    x = arr.astype(np.float64)
    lo, hi = (x.min(), x.max()) if bit_depth == "minmax" else np.percentile(x, PERCENTILES)
    if hi <= lo:  # constant image (or a flat percentile range): fall back to min/max, then to 0
        lo, hi = x.min(), x.max()
        if hi <= lo:
            return np.zeros(arr.shape, np.uint8)
    return np.round(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def _by_dtype(arr: np.ndarray) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"integer image values must lie in 0..65535, got {arr.min()}..{arr.max()}; "
                             "pass bit_depth='minmax' or 'percentile' (--bit-depth) to use the image's own range")
        peak = int(arr.max()) if arr.size else 0
        if 0 < peak < 65535 // 4:
            warnings.warn(
                f"the image's values reach only {peak} of 0..65535: scaled by the 16-bit range it comes out nearly "
                f"black (brightest pixel {round(peak / 257)} of 255); pass bit_depth='minmax' or 'percentile' "
                "(command line: --bit-depth) to stretch its own range", UserWarning, stacklevel=5)
        return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(
            f"float images must have values in [0, 1], got {arr.min():.4g}..{arr.max():.4g}; pass uint8 for 0..255 "
            "data, or bit_depth='minmax' or 'percentile' (--bit-depth) to use the image's own range"
        )
    return np.round(arr.astype(np.float64) * 255.0).astype(np.uint8)


def _pil_to_rgb(im: Image.Image, bit_depth: str) -> np.ndarray:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _array_to_rgb(np.asarray(im).astype(np.int64), bit_depth)
    if im.mode == "F":
        return _array_to_rgb(np.asarray(im), bit_depth)
    if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def _array_to_rgb(arr: np.ndarray, bit_depth: str) -> np.ndarray:
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
    alpha = None
    if arr.shape[-1] == 4:
        arr, alpha = arr[..., :3], _stretch(arr[..., 3:], "dtype")
    arr = _stretch(arr, bit_depth)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if alpha is not None:  # alpha over white
        a = alpha.astype(np.float64) / 255.0
        arr = np.round(arr * a + 255.0 * (1.0 - a)).astype(np.uint8)
    return np.ascontiguousarray(arr)


def to_rgb_array(image, image_format: str = "RGB", bit_depth: str = "dtype", limits: Limits | None = None) -> np.ndarray:
    """Any supported image (see the module docstring) -> (H, W, 3) uint8 RGB array.

    image_format: the channel order of an array or tensor, "RGB" or "BGR" (OpenCV's); files, bytes and
    PIL images are decoded as RGB, so "BGR" with one of them is a ValueError. bit_depth: "dtype",
    "minmax" or "percentile" for images with more than 8 bits; limits: the `samhq.limits.Limits` to
    check against (default: the process-wide ones). Raises ValueError for unreadable or malformed
    images, `samhq.limits.LimitError` (a ValueError) over `max_pixels`, TypeError for an unsupported
    kind of object.
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    if bit_depth not in BIT_DEPTH_MODES:
        raise ValueError(f"bit_depth must be one of {', '.join(BIT_DEPTH_MODES)}; got {bit_depth!r}")
    raw = isinstance(image, np.ndarray) or type(image).__module__.startswith("torch")
    if image_format == "BGR" and not raw:
        raise ValueError("image_format='BGR' describes the channel order of an array or tensor; a file or PIL image "
                         "is decoded as RGB, so leave image_format at 'RGB' for it")
    limits = limits or get_limits()
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        image = open_image(image, limits)
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image is empty ({image.width}x{image.height} pixels)")
        check_pixels(image.width, image.height, limits)
        orientation = image.getexif().get(0x0112, 1)
        if orientation not in (1, None):
            warnings.warn(f"the PIL image carries EXIF orientation {orientation}, which is not applied to an image "
                          "already opened; pass the file path (or ImageOps.exif_transpose(image)) to get it upright",
                          UserWarning, stacklevel=2)
        return _pil_to_rgb(image, bit_depth)
    if type(image).__module__.startswith("torch"):
        image = image.detach().cpu()
        if image.dtype.is_floating_point:
            image = image.float()
        image = image.numpy()
        if image.ndim == 3 and not (image.shape[-1] in (1, 3, 4) and image.shape[0] not in (1, 3, 4)):
            image = np.moveaxis(image, 0, -1)  # tensors are channel-first, unless plainly (H, W, C)
    if isinstance(image, np.ndarray):
        if image.ndim in (2, 3):
            h, w = image.shape[:2] if image.ndim == 2 or image.shape[-1] in (1, 3, 4) else image.shape[1:]
            check_pixels(int(w), int(h), limits)
        rgb = _array_to_rgb(image, bit_depth)
        return np.ascontiguousarray(rgb[..., ::-1]) if image_format == "BGR" else rgb
    raise TypeError(
        f"unsupported image type {type(image).__name__}: pass a file path, the bytes of an image file, a PIL image, "
        "a numpy array or a torch tensor"
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
