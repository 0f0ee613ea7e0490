"""Hostile and odd inputs made on the fly for the issue-14 tests: EXIF orientations, decompression
bombs, truncated files, weights of the wrong kind."""
import io
import struct
import zlib

import numpy as np
from PIL import Image


def upright(stored: np.ndarray, orientation: int) -> np.ndarray:
    """How a viewer shows stored pixels with EXIF Orientation 1-8, written out from the tag's definition
    (TIFF 6.0 / Exif 2.3: where the stored row 0 and column 0 appear), independently of PIL."""
    return {
        1: lambda a: a,                                 # row 0 top, column 0 left
        2: lambda a: a[:, ::-1],                        # row 0 top, column 0 right: mirrored left-right
        3: lambda a: a[::-1, ::-1],                     # row 0 bottom, column 0 right: turned 180 degrees
        4: lambda a: a[::-1, :],                        # row 0 bottom, column 0 left: mirrored top-bottom
        5: lambda a: a.transpose(1, 0, 2),              # row 0 left, column 0 top: transposed
        6: lambda a: np.rot90(a, -1),                   # row 0 right, column 0 top: turned 90 degrees clockwise
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 bottom: transverse
        8: lambda a: np.rot90(a, 1),                    # row 0 left, column 0 bottom: turned 90 counter-clockwise
    }[orientation](stored)


def jpeg_with_orientation(pixels: np.ndarray, orientation: int, quality: int = 95) -> bytes:
    """A JPEG of `pixels` (stored as given) whose EXIF Orientation tag is `orientation`."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def stored_pixels(data: bytes) -> np.ndarray:
    """The pixels as stored in the file, EXIF ignored (what a decoder gives before any rotation)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A valid 1-bit black PNG of width x height: a few KB on disk, width*height pixels when decoded.

    With `rows` < height only that many rows of data follow (a file truncated after its header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    parts, n = [], height if rows is None else rows
    block = row * 1024
    for start in range(0, n, 1024):
        parts.append(z.compress(block if n - start >= 1024 else row * (n - start)))
    parts.append(z.flush())
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
