"""Label Studio's brush RLE: the run-length code its BrushLabels regions are stored in.

Label Studio keeps a brush mask as an RGBA image of the task's original size, flattened row by row
(H * W * 4 bytes, R G B A per pixel), and packs those bytes with thi.ng's `rle-pack` bit format:

    header  32 bits  number of values (H * W * 4)
             5 bits  word size - 1 (7: 8-bit values)
          4 x 4 bits  the four run-length field widths - 1 (we use 3, 4, 8 and 16 bits)
    chunks  1 bit    1 = a run of one repeated value, 0 = a list of literal values
             2 bits  which of the four widths the length field has
             w bits  run length - 1
             8 bits  the value (a run), or run-length values of 8 bits each (a literal list)
    padding zero bits up to a whole byte; the result is a list of byte values (0..255).

Format described by Label Studio's converter (`label_studio_sdk.converter.brush`, whose
`decode_rle` reads what this writes; the tests check it) and thi.ng/umbrella's rle-pack. A mask
pixel becomes (255, 255, 255, 255), background (0, 0, 0, 0), as the converter's `mask2rle` does.
`ls_rle_to_mask` reads any such stream back (e.g. masks annotators drew, from a Label Studio export).
"""
from __future__ import annotations

import numpy as np

_WIDTHS = np.array([3, 4, 8, 16])
_MAX_RUN = 1 << 16  # the widest length field holds runs of up to 65536 values


def mask_to_ls_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool mask -> Label Studio brush RLE (a list of byte values, JSON-ready).

    Every chunk is a run (the data is runs of 4 equal bytes per pixel at least), so the code is
    vectorised: one 27-bit-or-shorter code per run, concatenated most significant bit first.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a brush mask must be 2-D (H, W), got shape {mask.shape}")
    flat = (mask.reshape(-1) > 0).astype(np.uint8) * 255
    n_values = flat.size * 4
    if n_values >= 1 << 32:
        raise ValueError(f"a {mask.shape[1]}x{mask.shape[0]} mask is too large for Label Studio's RLE (2^32 values)")
    header = (n_values << 21) | (7 << 16)  # 32 + 5 bits, then the four widths
    for k, w in enumerate(_WIDTHS):
        header |= int(w - 1) << (12 - 4 * k)
    codes, lengths = [np.array([header], dtype=np.uint64)], [np.array([53])]
    if flat.size:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate([[0], change])
        runs = np.diff(np.concatenate([starts, [flat.size]])) * 4
        values = flat[starts].astype(np.uint64)
        # split runs longer than 65536 values into full chunks plus a remainder
        pieces = -(-runs // _MAX_RUN)
        run_values = np.repeat(values, pieces)
        run_lengths = np.full(pieces.sum(), _MAX_RUN, dtype=np.int64)
        last = np.cumsum(pieces) - 1
        run_lengths[last] = runs - (pieces - 1) * _MAX_RUN
        which = np.searchsorted(1 << _WIDTHS, run_lengths, side="left")  # smallest width with len - 1 < 2^w
        widths = _WIDTHS[which]
        code = (np.uint64(1) << (widths + 10).astype(np.uint64)) | (which.astype(np.uint64) << (widths + 8).astype(np.uint64))
        code |= (run_lengths - 1).astype(np.uint64) << np.uint64(8)
        code |= run_values
        codes.append(code)
        lengths.append(widths + 11)
    codes, lengths = np.concatenate(codes), np.concatenate(lengths)
    bit = np.arange(63, -1, -1, dtype=np.uint64)
    bits = ((codes[:, None] >> bit) & np.uint64(1)).astype(np.uint8)
    keep = np.arange(64)[None, :] >= 64 - lengths[:, None]
    return np.packbits(bits[keep]).tolist()


def ls_rle_to_mask(rle, height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE (a list of byte values) -> (height, width) bool mask (alpha > 0).

    Reads any rle-pack stream (runs and literal lists, any widths; 8-bit words) as the header
    describes it; ValueError when it does not hold height * width * 4 values.
    """
    bits = np.unpackbits(np.asarray(rle, dtype=np.uint8))
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > len(bits):
            raise ValueError("the brush RLE ends early")
        v = 0
        for b in bits[pos:pos + n]:
            v = (v << 1) | int(b)
        pos += n
        return v

    num, word = read(32), read(5) + 1
    widths = [read(4) + 1 for _ in range(4)]
    if num != height * width * 4:
        raise ValueError(f"the brush RLE holds {num} values, not {height}x{width}x4")
    if word != 8:
        raise ValueError(f"the brush RLE uses {word}-bit values; Label Studio writes 8")
    out = np.empty(num, dtype=np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        n = read(widths[read(2)]) + 1
        if i + n > num:
            raise ValueError("the brush RLE runs past its size")
        if repeat:
            out[i:i + n] = read(8)
        else:
            out[i:i + n] = [read(8) for _ in range(n)]
        i += n
    return out.reshape(height, width, 4)[:, :, 3] > 0
