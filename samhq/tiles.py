"""Huge images at native resolution: tiled embeddings, prompts in image coordinates, everything mode across tiles.

SAM resizes every image so that its long side is the model's input size (1024 px for the released
models), so a 20,000-px aerial or pathology image shrinks 20x and the thin structures SAM-HQ is for
vanish. Here the image is cut into overlapping square **windows**:

- level 0: windows of `tile_size` native pixels (default: the model's input size), `overlap`
  pixels shared by neighbours (micro-sam's `halo`; default a quarter of the tile), each embedded at
  native resolution;
- level k > 0, an image pyramid: windows of `tile_size * 2**k` native pixels (same overlap ratio),
  each downsized to the input size when embedded, up to the top level, one window over the whole
  image, which is exactly what `SamHQPredictor.set_image(image)` sees.

Windows are placed every `tile_size - overlap` pixels from the top-left, the last one in a row or
column moved back to end at the image border, so every window is full-sized unless the image is
smaller. An edge of a window that is not an image border is a **cut edge**.

Prompts (points, boxes, mask inputs) are given in the image's own pixels (x right, y down, as
`SamHQPredictor.predict` takes them) and decoded on the level-0 window that contains them and where
they lie farthest from a cut edge. A mask touching a cut edge (its object goes on beyond the window)
is decoded again one level up, on a window that contains the prompt and the mask found so far, and
so on up to the top level, so nothing is clipped at a tile edge. A mask from a coarse level is then
refined at native resolution where the level-0 windows agree with it: in a band around its boundary
the level-0 decode (the object's box, clipped to the tile, as prompt) replaces it, tile by tile, where
the two agree (IoU >= 0.5 within the tile); `refine=` chooses the prompt or turns this off.

Embeddings are made lazily (on the first prompt that needs a window) or up front (`embed="eager"`),
kept in memory up to `cache_bytes` (least recently used dropped first), and optionally kept in a
zarr store on disk (`set_image(..., store=PATH)`, the `tiles` extra) so a later run prompts without
re-embedding. A store records the engine's fingerprint (`samhq.modeling.model_fingerprint`), the
tiling, the image size and a digest of every window's pixels; it is refused for anything else.

Everything mode (`TiledMaskGenerator`) runs `SamHQAutomaticMaskGenerator` on every level-0 window
and merges the masks across window borders: masks of two windows that agree where the windows
overlap are one object; an object seen whole by some window keeps that window's mask (the others
are duplicates), an object cut by borders in every window is the union of its pieces.

Learnt from micro-sam (tile_shape / halo tiling of embeddings, prompts routed to one tile) and
segment-geospatial (fixed-size tiles over large rasters, merged afterwards); the pyramid for
objects larger than a tile and the border-aware merge are ours.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from . import masks as M
from .image_io import to_rgb_array
from .limits import LimitError, as_tiled_error, tiled_limits
from .predictor import EmbeddingCache, ImageEmbedding, SamHQPredictor, check_prompt_batch, one_prompt
from .processing import preprocess_shape, resize_rgb

STORE_FORMAT = "samhq-tile-embeddings/1"
MASK_LOGIT = 6.9  # a binary mask input becomes +-6.9 logits (sigmoid 0.999), as micro-sam turns masks into logits


# ---------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class Window:
    """A region of the image embedded as one model input (square unless the image is smaller).

    level: pyramid level (0: native resolution); index: position in its level's list;
    box: (x0, y0, x1, y1) native pixels, end exclusive; cut: (left, top, right, bottom), True for an
    edge inside the image (a cut edge), False for an image border; core: the part of box nearer to
    this window's centre than to any other window of its level (the cores tile the image exactly).
    """

    level: int
    index: int
    box: tuple[int, int, int, int]
    cut: tuple[bool, bool, bool, bool]
    core: tuple[int, int, int, int]

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]


def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    return list(range(0, length - size, stride)) + [length - size]


def _cores(starts: list[int], size: int, length: int) -> list[tuple[int, int]]:
    """Per window along one axis, the span nearer its centre than its neighbours' (midpoints between centres)."""
    cuts = [0] + [(a + b + size) // 2 for a, b in zip(starts, starts[1:])] + [length]
    return list(zip(cuts, cuts[1:]))


def tile_windows(height: int, width: int, tile_size: int, overlap: int, level: int = 0) -> list[Window]:
    """The windows of one pyramid level, row by row: `tile_size * 2**level` px wide, stride `(tile_size - overlap) * 2**level`."""
    size, stride = tile_size << level, (tile_size - overlap) << level
    ys, xs = _starts(height, size, stride), _starts(width, size, stride)
    out = []
    for y0, (cy0, cy1) in zip(ys, _cores(ys, size, height)):
        for x0, (cx0, cx1) in zip(xs, _cores(xs, size, width)):
            x1, y1 = min(x0 + size, width), min(y0 + size, height)
            out.append(Window(level, len(out), (x0, y0, x1, y1), (x0 > 0, y0 > 0, x1 < width, y1 < height),
                              (cx0, cy0, cx1, cy1)))
    return out


def pyramid_levels(height: int, width: int, tile_size: int) -> int:
    """Number of levels: the top one, `tile_size * 2**k` >= the long side, has a single window over the whole image."""
    k = 0
    while tile_size << k < max(height, width):
        k += 1
    return k + 1


def _check_tiling(tile_size: int, overlap: int) -> None:
    if tile_size < 32:
        raise ValueError(f"tile_size must be at least 32 pixels, got {tile_size}")
    if not 0 <= overlap <= tile_size // 2:
        raise ValueError(f"overlap must lie in 0..tile_size/2 = {tile_size // 2} pixels, got {overlap}")


# ---------------------------------------------------------------------------------------------
# Image sources


class ArraySource:
    """An in-memory (H, W, 3) uint8 RGB image as a window source (see `samhq.geo.RasterSource` for files read in windows)."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        self.shape = tuple(rgb.shape[:2])

    def read(self, box, out_shape=None) -> np.ndarray:
        """Pixels of box (x0, y0, x1, y1) as (h, w, 3) uint8, resized to out_shape (h, w) with PIL bilinear when given."""
        x0, y0, x1, y1 = box
        crop = np.ascontiguousarray(self.rgb[y0:y1, x0:x1])
        if out_shape is not None and tuple(out_shape) != crop.shape[:2]:
            h, w = out_shape
            if max(h, w) != max(crop.shape[:2]) and preprocess_shape(*crop.shape[:2], max(h, w)) == (h, w):
                return resize_rgb(crop, max(h, w))  # the predictor's own resize
            from PIL import Image

            return np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR))
        return crop


def as_source(image, image_format: str = "RGB"):
    """An image source: objects with `shape` (H, W) and `read(box, out_shape)` pass through; anything else
    goes through `samhq.image_io.to_rgb_array` into an `ArraySource`."""
    if hasattr(image, "read") and hasattr(image, "shape") and not isinstance(image, (np.ndarray, torch.Tensor)):
        return image
    try:
        rgb = to_rgb_array(image, image_format, limits=tiled_limits())
    except LimitError as e:
        raise as_tiled_error(e) from None
    return ArraySource(rgb)


def _digest(pixels: np.ndarray) -> bytes:
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes() + str(pixels.shape).encode()).digest()


# ---------------------------------------------------------------------------------------------
# Embedding memory and disk store


def _zarr():
    try:
        import zarr
    except ImportError:
        raise ImportError("an embedding store on disk needs zarr: pip install 'samhq[tiles]'") from None
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(f"the embedding store needs zarr >= 3, found {zarr.__version__}: pip install -U 'zarr>=3'")
    return zarr


class EmbeddingStore:
    """Window embeddings of one image in a zarr group on disk, one chunk per window.

    Layout: attributes {format, fingerprint, image_size, tile_size, overlap, height, width}; per level
    k a group `level{k}` with one float32 array per tensor of the engine's embeddings (`features`
    (n, C, g, g), and `early_features` (n, g, g, Ce) or `hq_features` for SAM-HQ), `input_size` (n, 2)
    int32, `digest` (n, 20) uint8 (SHA-1 of the window's pixels as
    embedded) and `done` (n,) bool, written last so an interrupted write is simply redone.
    Opening an existing store made by another encoder, tiling or image size raises ValueError.
    """

    def __init__(self, path, meta: dict, overwrite: bool = False) -> None:
        zarr = _zarr()
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            try:
                self.root = zarr.open_group(str(self.path), mode="r+")
            except Exception as e:  # zarr raises several kinds for a folder that is not a store
                raise ValueError(f"{self.path} exists and is not a samhq embedding store ({e}); "
                                 "give a new path or overwrite=True") from None
            self._check(dict(self.root.attrs), meta)
        else:
            self.root = zarr.open_group(str(self.path), mode="w")
            self.root.attrs.update(meta)
        self.meta = meta

    def _check(self, have: dict, want: dict) -> None:
        where = f"embedding store {self.path}"
        if have.get("format") != STORE_FORMAT:
            raise ValueError(f"{where} is not a samhq tile embedding store (format {have.get('format')!r}); "
                             "give a new path or overwrite=True")
        if have.get("fingerprint") != want["fingerprint"]:
            raise ValueError(f"{where} was made by another model (encoder fingerprint {have.get('fingerprint')}, "
                             f"this model {want['fingerprint']}); give a new path or overwrite=True to re-embed")
        for key in ("image_size", "tile_size", "overlap", "height", "width"):
            if have.get(key) != want[key]:
                raise ValueError(f"{where} was made with {key}={have.get(key)}, this run has {key}={want[key]}; "
                                 "give a new path or overwrite=True to re-embed")

    def _level(self, level: int, emb: ImageEmbedding | None = None, n: int | None = None):
        name = f"level{level}"
        if name in self.root:
            return self.root[name]
        if emb is None:
            return None
        g = self.root.create_group(name)
        g.attrs["tensors"] = list(emb.tensors)
        for key, t in emb.tensors.items():
            g.create_array(key, shape=(n, *t.shape[1:]), chunks=(1, *t.shape[1:]), dtype="float32", fill_value=0.0)
        g.create_array("input_size", shape=(n, 2), chunks=(n, 2), dtype="int32", fill_value=0)
        g.create_array("digest", shape=(n, 20), chunks=(n, 20), dtype="uint8", fill_value=0)
        g.create_array("done", shape=(n,), chunks=(n,), dtype="bool", fill_value=False)
        return g

    def get(self, window: Window) -> tuple[ImageEmbedding, bytes] | None:
        g = self._level(window.level)
        if g is None or not bool(g["done"][window.index]):
            return None
        i = window.index
        size = tuple(int(v) for v in g["input_size"][i])
        tensors = {key: torch.from_numpy(g[key][i][None]) for key in g.attrs["tensors"]}
        emb = ImageEmbedding(tensors, size, size, self.meta["image_size"], self.meta["fingerprint"])
        return emb, bytes(g["digest"][i].tobytes())

    def put(self, window: Window, n_windows: int, emb: ImageEmbedding, digest: bytes) -> None:
        g = self._level(window.level, emb, n_windows)
        i = window.index
        for key, t in emb.tensors.items():
            g[key][i] = t[0].detach().float().cpu().numpy()
        g["input_size"][i] = np.asarray(emb.input_size, dtype=np.int32)
        g["digest"][i] = np.frombuffer(digest, dtype=np.uint8)
        g["done"][i] = True


# ---------------------------------------------------------------------------------------------
# Masks in windows


@dataclass
class Region:
    """One prompt's mask as a crop of the image.

    mask (h, w) bool and logits (h, w) float32 cover box (x0, y0, x1, y1) native pixels (end
    exclusive); score is the decoder's predicted IoU; window is where it was decoded (a coarse level
    for objects larger than a tile) and low_res_logits (m, m) that decode's low-resolution logits;
    refined_tiles counts the level-0 windows whose native-resolution decode was used.
    """

    mask: np.ndarray
    logits: np.ndarray
    box: tuple[int, int, int, int]
    score: float
    window: Window
    low_res_logits: torch.Tensor
    refined_tiles: int = 0

    def to_full(self, height: int, width: int, logits: bool = False) -> np.ndarray:
        """The mask (bool) or logits (float32, -inf outside the crop) as an (height, width) array."""
        out = np.full((height, width), -np.inf, np.float32) if logits else np.zeros((height, width), bool)
        x0, y0, x1, y1 = self.box
        out[y0:y1, x0:x1] = self.logits if logits else self.mask
        return out


def _axis_map(n_in: int, n_out: int, start: int, stop: int):
    """Bilinear (align_corners=False) source indices and weights for outputs start..stop-1 of an n_in -> n_out resize,
    as torch's upsample_bilinear2d computes them."""
    scale = np.float32(n_in / n_out)
    src = np.maximum((np.arange(start, stop, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, torch.from_numpy((src - i0).astype(np.float32))


def resize_region(x: torch.Tensor, out_size: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    """Rows r0..r1-1 and columns c0..c1-1 of `F.interpolate(x, out_size, mode="bilinear")`, computed without the rest.

    x (..., h, w) float; returns (..., r1 - r0, c1 - c0). Equal to interpolating and cropping (within float rounding).
    """
    (h, w), (oh, ow) = x.shape[-2:], out_size
    r0, r1 = rows
    c0, c1 = cols
    if not (0 <= r0 <= r1 <= oh and 0 <= c0 <= c1 <= ow):
        raise ValueError(f"rows {rows} and columns {cols} must lie within the {oh}x{ow} output")
    i0, i1, a = _axis_map(h, oh, r0, r1)
    j0, j1, b = _axis_map(w, ow, c0, c1)
    top = x[..., i0, :] * (1 - a)[:, None] + x[..., i1, :] * a[:, None]
    return top[..., j0] * (1 - b) + top[..., j1] * b


def _source_span(n_in: int, n_out: int, lo: int, hi: int) -> tuple[int, int]:
    """Output indices whose bilinear sources touch input indices lo..hi-1 (a positive output needs a positive source)."""
    i0, i1, _ = _axis_map(n_in, n_out, 0, n_out)
    hit = np.flatnonzero((i1 >= lo) & (i0 < hi))
    return (int(hit[0]), int(hit[-1]) + 1) if len(hit) else (0, 0)


def _touches(mask: np.ndarray, box, window: Window, tol: int) -> tuple[bool, bool, bool, bool]:
    """Which cut edges of `window` the mask crop (at box) comes within tol pixels of."""
    if not mask.any():
        return (False, False, False, False)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    x0, y0 = box[0] + cols[0], box[1] + rows[0]
    x1, y1 = box[0] + cols[-1] + 1, box[1] + rows[-1] + 1
    wx0, wy0, wx1, wy1 = window.box
    near = (x0 - wx0 <= tol, y0 - wy0 <= tol, wx1 - x1 <= tol, wy1 - y1 <= tol)
    return tuple(bool(n and c) for n, c in zip(near, window.cut))


def _tighten(mask: np.ndarray, logits: np.ndarray, box):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return mask[:0, :0], logits[:0, :0], (box[0], box[1], box[0], box[1])
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return mask[r0:r1, c0:c1], logits[r0:r1, c0:c1], (box[0] + c0, box[1] + r0, box[0] + c1, box[1] + r1)


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass
class _Prompt:
    points: np.ndarray | None  # (N, 2) image pixels
    labels: np.ndarray | None  # (N,)
    box: np.ndarray | None  # (4,) image pixels
    mask: np.ndarray | None  # logits (float32) or bool over mask_box, or (m, m) low-res logits of `mask_window`
    mask_box: tuple | None  # (x0, y0, x1, y1) image pixels covered by an image-frame mask
    mask_window: Window | None
    extent: np.ndarray  # (4,) x0, y0, x1, y1 that a window must contain
    result: Region | None = None


def _extent(points, box, mask, height, width) -> np.ndarray:
    xs, ys = [], []
    if points is not None:
        xs += [points[:, 0].min(), points[:, 0].max()]
        ys += [points[:, 1].min(), points[:, 1].max()]
    if box is not None:
        xs += [box[0], box[2]]
        ys += [box[1], box[3]]
    if mask is not None and mask.shape == (height, width):
        rows, cols = np.flatnonzero((mask > 0).any(1)), np.flatnonzero((mask > 0).any(0))
        if len(rows):
            xs += [cols[0], cols[-1] + 1]
            ys += [rows[0], rows[-1] + 1]
    if not xs:
        return np.array([0, 0, width, height], dtype=np.float64)
    e = np.array([min(xs), min(ys), max(xs), max(ys)], dtype=np.float64)
    return np.clip(e, 0, [width, height, width, height])


# ---------------------------------------------------------------------------------------------
# The tiled predictor


class TiledPredictor:
    """Prompt a huge image at native resolution: `SamHQPredictor`'s interface, in the image's own pixel coordinates.

        tp = TiledPredictor(model)                       # tiles of the model's input size, 1/4 overlap
        tp.set_image(big_rgb_array)                      # or a path, or samhq.geo.RasterSource("scene.tif")
        masks, scores, logits = tp.predict(box=np.array([1200, 5400, 1900, 6300]))   # masks (1, H, W)
        regions = tp.predict_regions(boxes=many_boxes)   # crops, for images too big for full-size masks

    Arguments: model (a `SamHQModel` or a `SamHQPredictor`); tile_size in native pixels (default: the
    model's input size; windows are resized to the input size, so a smaller tile looks closer);
    overlap in pixels (0..tile_size/2, default tile_size // 4); cache_bytes, the memory kept for
    window embeddings (default 1 GiB; least recently used dropped); cache, instead of that, a
    `samhq.predictor.EmbeddingCache` the caller owns (e.g. the server's, for all its tiled images:
    windows are keyed by `set_image`'s key, so one memory bound covers every image); embed, "lazy" (a
    window is embedded when a prompt first needs it) or "eager" (every window of every level in `set_image`);
    refine, how a mask from a coarse level is refined at native resolution (module docstring):
    "box" (default: each level-0 window is prompted with the object's box clipped to it), "box+mask"
    (the coarse mask as well; as good on the thin-structure benchmark, slower: docs/huge-images.md)
    or None (keep the coarse mask); max_refine_tiles, the
    most level-0 windows an object may span and still be refined (default 64); edge_tolerance, in
    the window's input pixels: a mask this close to a cut edge is taken to go on beyond it (default:
    one low-res mask cell, image_size / mask size, 4 for the released models).

    Point prompts on an object much larger than a tile may give a part of it (a level-0 window sees
    only the part around the point, which may not reach a cut edge); give a box for large objects.
    """

    def __init__(self, model, tile_size: int | None = None, overlap: int | None = None, cache_bytes: int = 2**30,
                 embed: str = "lazy", refine: str | None = "box", max_refine_tiles: int = 64,
                 edge_tolerance: float | None = None, cache: EmbeddingCache | None = None) -> None:
        self.predictor = model if isinstance(model, SamHQPredictor) else SamHQPredictor(model)
        self.tile_size = int(tile_size or self.predictor.image_size)
        self.overlap = int(self.tile_size // 4 if overlap is None else overlap)
        _check_tiling(self.tile_size, self.overlap)
        if embed not in ("lazy", "eager"):
            raise ValueError(f"embed must be 'lazy' or 'eager', got {embed!r}")
        if refine not in (None, "box", "box+mask"):
            raise ValueError(f"refine must be None, 'box' or 'box+mask', got {refine!r}")
        self.embed, self.refine, self.max_refine_tiles = embed, refine, int(max_refine_tiles)
        # default: one low-res mask cell (masks fade out about that far from where a window cuts them)
        self.edge_tolerance = self.image_size / self.mask_size if edge_tolerance is None else float(edge_tolerance)
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.shared_cache = cache is not None
        self.cache = cache if cache is not None else EmbeddingCache(max_bytes=cache_bytes)
        self.key = None
        self.fingerprint = self.predictor.engine.fingerprint()
        self.source = self.store = None
        self.windows: list[list[Window]] = []
        self.last_window: Window | None = None
        self.encoder_calls = 0
        self._current = None

    @property
    def model(self):
        return self.predictor.model

    @property
    def image_size(self) -> int:
        return self.predictor.image_size

    @property
    def mask_size(self) -> int:
        return self.predictor.mask_size

    @property
    def original_size(self) -> tuple[int, int] | None:
        return None if self.source is None else tuple(self.source.shape)

    @property
    def is_image_set(self) -> bool:
        return self.source is not None

    # ------------------------------------------------------------------ images

    def set_image(self, image, image_format: str = "RGB", store=None, overwrite_store: bool = False, key=None) -> None:
        """Use a new image: anything `SamHQPredictor.set_image` takes, or a window source such as `samhq.geo.RasterSource`.

        key: with a shared `cache`, the image's key in it (e.g. a digest of its file): windows of an
        image set again under the same key are not embedded again; default a key of this call only.

        store: a folder for a zarr embedding store (see the module docstring); an existing one is
        reused when it was made by this model, with this tiling, for an image of this size (else
        ValueError; `overwrite_store=True` starts it afresh), and a window whose pixels differ from
        those it was made from raises ValueError when prompted. Nothing is embedded here unless
        `embed="eager"`.
        """
        self.reset_image()
        source = as_source(image, image_format)
        h, w = source.shape
        if h < 1 or w < 1 or h * w < 2:
            raise ValueError(f"image is {w}x{h} pixels; nothing to segment")
        self.source = source
        self.key = key if key is not None else object()
        n_levels = pyramid_levels(h, w, self.tile_size)
        self.windows = [tile_windows(h, w, self.tile_size, self.overlap, k) for k in range(n_levels)]
        if store is not None:
            meta = {"format": STORE_FORMAT, "fingerprint": self.fingerprint, "image_size": self.image_size,
                    "tile_size": self.tile_size, "overlap": self.overlap, "height": int(h), "width": int(w)}
            self.store = EmbeddingStore(store, meta, overwrite=overwrite_store)
        if self.embed == "eager":
            self.precompute()

    def reset_image(self) -> None:
        self.source = self.store = None
        self.windows = []
        if not self.shared_cache:
            self.cache.clear()
        self.key = self.last_window = self._current = None
        self.predictor.reset_image()

    def precompute(self, levels=None) -> int:
        """Embed every window of the given levels (default all) now; returns how many were computed (not cached or stored)."""
        self._require_image()
        before = self.encoder_calls
        for k in range(len(self.windows)) if levels is None else levels:
            for w in self.windows[k]:
                self.embedding(w)
        return self.encoder_calls - before

    def _require_image(self) -> None:
        if self.source is None:
            raise RuntimeError("no image is set: call set_image(image) first")

    def _input_shape(self, window: Window) -> tuple[int, int]:
        return self.predictor.transform.input_size((window.height, window.width))

    def embedding(self, window: Window) -> ImageEmbedding:
        """The window's embedding: from memory, else from the store, else computed (and stored)."""
        key = (self.key, window.level, window.index)
        emb = self.cache.get(key)
        if emb is not None:
            return emb
        pixels = None
        if self.store is not None:
            hit = self.store.get(window)
            if hit is not None:
                pixels = self.source.read(window.box, self._input_shape(window))
                if _digest(pixels) != hit[1]:
                    raise ValueError(
                        f"embedding store {self.store.path} was made from other pixels (level {window.level} window "
                        f"{window.box}); it belongs to another image: give a new store path or overwrite_store=True")
                emb = hit[0]
        if emb is None:
            if pixels is None:
                pixels = self.source.read(window.box, self._input_shape(window))
            self.predictor.set_image(pixels)
            self._current = None
            self.encoder_calls += 1
            emb = self.predictor.export_image_embedding()
            emb = ImageEmbedding({k: v.detach().cpu() for k, v in emb.tensors.items()},
                                 emb.original_size, emb.input_size, emb.image_size, emb.fingerprint)
            if self.store is not None:
                self.store.put(window, len(self.windows[window.level]), emb, _digest(pixels))
        self.cache.put(key, emb)
        return emb

    def _use(self, window: Window) -> None:
        key = (self.key, window.level, window.index)
        if self._current != key:
            self.predictor.set_image_embedding(self.embedding(window))
            self._current = key

    # ------------------------------------------------------------------ window choice

    def _best_window(self, level: int, extent: np.ndarray) -> Window | None:
        """The window of `level` that contains extent, with the extent farthest from its cut edges."""
        best, best_margin = None, -np.inf
        x0, y0, x1, y1 = extent
        for w in self.windows[level]:
            bx0, by0, bx1, by1 = w.box
            if x0 < bx0 or y0 < by0 or x1 > bx1 or y1 > by1:
                continue
            gaps = (x0 - bx0, y0 - by0, bx1 - x1, by1 - y1)
            margin = min((g for g, c in zip(gaps, w.cut) if c), default=np.inf)
            if margin > best_margin:
                best, best_margin = w, margin
        return best

    # ------------------------------------------------------------------ decoding

    def _decode(self, window: Window, prompts: list[_Prompt], multimask: bool, hq_only: bool, full: bool) -> list[Region]:
        """Decode prompts that share a window and prompt kinds, batched; masks as native-resolution crops."""
        self._use(window)
        p = self.predictor
        in_h, in_w = p.input_size
        sx, sy = in_w / window.width, in_h / window.height
        offset = np.array([window.box[0], window.box[1]], dtype=np.float64)
        scale = np.array([sx, sy])

        def frame(xy):  # image pixels -> the window's input frame
            return torch.as_tensor((xy - offset) * scale, dtype=torch.float, device=p.device)

        pts = labels = boxes = masks = None
        if prompts[0].points is not None:
            pts = torch.stack([frame(q.points) for q in prompts])
            labels = torch.stack([torch.as_tensor(q.labels, dtype=torch.int, device=p.device) for q in prompts])
        if prompts[0].box is not None:
            boxes = torch.stack([frame(q.box.reshape(2, 2)).reshape(4) for q in prompts])
        if prompts[0].mask is not None:
            masks = torch.stack([self._mask_input(q, window) for q in prompts])
        _, scores, low_res = p.predict_torch(pts, labels, boxes, masks, multimask, True, hq_only)
        stage1 = p.transform.postprocess_masks(low_res[:, 0], (in_h, in_w), (in_h, in_w))  # (B, in_h, in_w)
        out = []
        for i, _q in enumerate(prompts):
            out.append(self._region(window, stage1[i], scores[i, 0].item(), low_res[i, 0], full))
        return out

    def _region(self, window: Window, stage1: torch.Tensor, score: float, low_res: torch.Tensor, full: bool,
                box=None) -> Region:
        """Native-resolution logits of one decode: over `box` (image pixels) or the whole window when full,
        else over the mask's extent only."""
        in_h, in_w = stage1.shape
        h, w = window.height, window.width
        if box is not None:
            rows, cols = (box[1] - window.box[1], box[3] - window.box[1]), (box[0] - window.box[0], box[2] - window.box[0])
        elif full:
            rows, cols = (0, h), (0, w)
        else:
            pos = stage1 > self.predictor.mask_threshold
            r = torch.nonzero(pos.any(1)).flatten()
            c = torch.nonzero(pos.any(0)).flatten()
            if len(r) == 0:
                rows = cols = (0, 0)
            elif (in_h, in_w) == (h, w):
                rows, cols = (int(r[0]), int(r[-1]) + 1), (int(c[0]), int(c[-1]) + 1)
            else:
                rows = _source_span(in_h, h, int(r[0]), int(r[-1]) + 1)
                cols = _source_span(in_w, w, int(c[0]), int(c[-1]) + 1)
        if (in_h, in_w) == (h, w):
            logits = stage1[rows[0]:rows[1], cols[0]:cols[1]]
        else:
            logits = resize_region(stage1, (h, w), rows, cols)
        logits = logits.float().cpu().numpy()
        crop_box = (window.box[0] + cols[0], window.box[1] + rows[0], window.box[0] + cols[1], window.box[1] + rows[1])
        mask = logits > self.predictor.mask_threshold
        if not full and box is None:
            mask, logits, crop_box = _tighten(mask, logits, crop_box)
        return Region(mask, logits, crop_box, score, window, low_res.detach().cpu())

    def _mask_input(self, q: _Prompt, window: Window) -> torch.Tensor:
        """The prompt's mask input as (1, m, m) low-res logits in `window`'s frame."""
        m, dev = self.mask_size, self.predictor.device
        if q.mask_window is not None:  # low-res logits of a previous call, which ran on that window
            return torch.as_tensor(q.mask, dtype=torch.float, device=dev).reshape(1, m, m)
        frame = np.full((window.height, window.width), -MASK_LOGIT, np.float32)  # nothing outside the given mask
        both = _intersect(q.mask_box, window.box)
        if both is not None:
            x0, y0, x1, y1 = both
            mx, my = q.mask_box[:2]
            crop = q.mask[y0 - my:y1 - my, x0 - mx:x1 - mx]
            frame[y0 - window.box[1]:y1 - window.box[1], x0 - window.box[0]:x1 - window.box[0]] = \
                np.where(crop, MASK_LOGIT, -MASK_LOGIT) if crop.dtype == bool else crop
        t = torch.as_tensor(frame)[None, None]
        in_h, in_w = self._input_shape(window)
        t = F.interpolate(t, (in_h, in_w), mode="bilinear", align_corners=False)
        s = self.image_size
        t = F.pad(t, (0, s - in_w, 0, s - in_h), value=-MASK_LOGIT)
        return F.interpolate(t, (m, m), mode="area")[0].to(dev)

    # ------------------------------------------------------------------ prompts in, regions out

    def predict_regions(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                        multimask_output: bool = True, hq_token_only: bool = False, full_logits: bool = False) -> list[Region]:
        """Masks for B prompts as crops (`Region`), in image pixels; the core of `predict` and `predict_torch`.

        point_coords (B, N, 2) x, y and point_labels (B, N); boxes (B, 4) x0, y0, x1, y1; mask_input
        (B, H, W) image-frame masks (bool, or float logits) or, for one prompt, the (1, m, m)
        low-res logits a previous call returned (used on that call's window). full_logits: logits
        over the whole decode window instead of the mask's extent.
        """
        self._require_image()
        prompts = self._prompts(point_coords, point_labels, boxes, mask_input)
        n_levels = len(self.windows)
        pending = list(prompts)
        for level in range(n_levels):
            groups: dict = {}
            for q in pending:
                if q.mask_window is not None:
                    w = q.mask_window
                    if w.level != level:
                        continue
                else:
                    w = self._best_window(level, q.extent)
                    if w is None:
                        continue
                key = (w.index, q.points is None, 0 if q.points is None else len(q.points), q.box is None, q.mask is None)
                groups.setdefault(key, (w, []))[1].append(q)
            for w, group in groups.values():
                for q, region in zip(group, self._decode(w, group, multimask_output, hq_token_only, full_logits)):
                    touched = _touches(region.mask, region.box, w, self.edge_tolerance * w.width / self._input_shape(w)[1])
                    if level == n_levels - 1 or not any(touched) or q.mask_window is not None:
                        q.result = region
                        continue
                    # the object goes on past a cut edge: look again one level up, on a window that also covers
                    # the mask so far and a margin beyond the edges it touches
                    grow = self.overlap << level
                    ext = q.extent.copy()
                    if region.mask.any():
                        ext = np.minimum(ext, [*region.box[:2], np.inf, np.inf])
                        ext = np.maximum(ext, [-np.inf, -np.inf, *region.box[2:]])
                    ext = ext + np.array([-grow, -grow, grow, grow]) * np.array(touched)
                    h, w_img = self.source.shape
                    q.extent = np.clip(ext, 0, [w_img, h, w_img, h])
            pending = [q for q in pending if q.result is None]
            if not pending:
                break
        for q in prompts:
            if q.result.window.level > 0 and self.refine is not None and q.mask_window is None:
                q.result = self._refine(q, multimask_output, hq_token_only, full_logits)
        self.last_window = prompts[-1].result.window
        return [q.result for q in prompts]

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output: bool = True,
                return_logits: bool = False, hq_token_only: bool = False,
                return_low_res: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`SamHQPredictor.predict` in the image's own pixels: one prompt, one full-size mask.

        point_coords (N, 2) x, y with point_labels (N,); box (4,) x0, y0, x1, y1; mask_input an (H, W)
        image-frame mask (bool, or float logits) or the (1, m, m) low-res logits the previous call
        returned. Returns masks (1, H, W) bool (float32 logits with return_logits, -inf outside the
        decoded window), scores (1,) and low-res logits (1, m, m) of the window it was decoded on
        (`last_window`), or None with return_low_res=False (`SamHQPredictor.predict`'s keyword; here it saves no work,
        as the window's logits are computed for the refinement anyway). For images too large for a full-size mask use
        `predict_regions`. Raises ValueError for malformed prompts (the same checks and messages as `SamHQPredictor`).
        """
        self._require_image()
        if point_coords is not None or box is not None:
            pts, lab, b = one_prompt(point_coords, point_labels, box)  # the predictor's checks, in image pixels
            check_prompt_batch(None if pts is None else pts[None], None if lab is None else lab[None],
                               None if b is None else b[None], None, self.mask_size)
        elif mask_input is None:
            raise ValueError("give a prompt: point_coords with point_labels, a box, or a mask_input")
        pts = None if point_coords is None else np.asarray(point_coords, dtype=np.float64)[None]
        labels = None if point_labels is None else np.asarray(point_labels, dtype=np.float64).reshape(1, -1)
        bx = None if box is None else np.asarray(box, dtype=np.float64).reshape(1, 4)
        mk = None
        if mask_input is not None:
            mk = np.asarray(mask_input.detach().cpu() if isinstance(mask_input, torch.Tensor) else mask_input)
            mk = mk[None] if mk.shape == tuple(self.source.shape) else mk
        region = self.predict_regions(pts, labels, bx, mk, multimask_output, hq_token_only, full_logits=return_logits)[0]
        h, w = self.source.shape
        return (region.to_full(h, w, return_logits)[None], np.array([region.score], np.float32),
                region.low_res_logits.numpy()[None] if return_low_res else None)

    def predict_torch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None, multimask_output: bool = True,
                      return_logits: bool = False, hq_token_only: bool = False, return_low_res: bool = True):
        """`SamHQPredictor.predict_torch` with prompts in the image's own pixels (not the resized frame).

        point_coords (B, N, 2), point_labels (B, N), boxes (B, 4), mask_input (B, 1, H, W) image-frame
        masks. Returns masks (B, 1, H, W) bool (or float logits), scores (B, 1) and low-res logits
        (B, 1, m, m), torch tensors, or None for the logits with return_low_res=False (as in `predict`, it saves
        no work). Prompts sharing a window are decoded in one batch.
        """
        self._require_image()
        if mask_input is not None:
            mask_input = torch.as_tensor(mask_input) if not isinstance(mask_input, torch.Tensor) else mask_input
            if mask_input.ndim == 4:
                mask_input = mask_input[:, 0]
        regions = self.predict_regions(point_coords, point_labels, boxes, mask_input, multimask_output, hq_token_only,
                                       full_logits=return_logits)
        h, w = self.source.shape
        masks = torch.from_numpy(np.stack([r.to_full(h, w, return_logits) for r in regions]))[:, None]
        scores = torch.tensor([[r.score] for r in regions], dtype=torch.float32)
        return masks, scores, torch.stack([r.low_res_logits for r in regions])[:, None] if return_low_res else None

    def _prompts(self, point_coords, point_labels, boxes, mask_input) -> list[_Prompt]:
        """Validate batched prompts (the predictor's own checks) and split them into one `_Prompt` each."""
        h, w = self.source.shape
        to_t = lambda x, dt: None if x is None else torch.as_tensor(  # noqa: E731
            np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64), dtype=dt)
        pts, labels, bxs = to_t(point_coords, torch.float64), to_t(point_labels, torch.float64), to_t(boxes, torch.float64)
        if bxs is not None and bxs.ndim == 1:
            bxs = bxs[None]
        b = None
        if pts is not None or bxs is not None:
            _, _, checked_boxes, _ = check_prompt_batch(pts, labels, bxs, None, self.mask_size)
            b = len(pts) if pts is not None else len(checked_boxes)
        mask_window, masks = None, None
        if mask_input is not None:
            mk = np.asarray(mask_input.detach().cpu() if isinstance(mask_input, torch.Tensor) else mask_input)
            m = self.mask_size
            if mk.shape[-2:] == (h, w):
                masks = mk.reshape(-1, h, w)
                if masks.dtype != bool:
                    masks = masks.astype(np.float32)
                    if not np.isfinite(masks).all():
                        raise ValueError("mask_input contains NaN or infinite values")
            elif mk.shape in ((m, m), (1, m, m), (1, 1, m, m)):
                if self.last_window is None:
                    raise ValueError("low-res mask_input (as predict returns) needs a previous predict call on this image; "
                                     f"or give an image-frame mask of shape ({h}, {w})")
                masks, mask_window = mk.reshape(1, m, m).astype(np.float32), self.last_window
            else:
                raise ValueError(f"mask_input must be image-frame masks (B, {h}, {w}) or the (1, {m}, {m}) low-res logits "
                                 f"a previous predict returned; got shape {mk.shape}")
            if b is not None and len(masks) != b:
                raise ValueError(f"{len(masks)} mask inputs for {b} prompts; give one per prompt")
            b = len(masks)
        if b is None:
            raise ValueError("give a prompt: point_coords with point_labels, boxes, or mask_input")
        out = []
        for i in range(b):
            p = pts[i].numpy() if pts is not None else None
            bx = bxs[i].numpy() if bxs is not None else None
            mk = masks[i] if masks is not None else None
            ext = _extent(p, bx, mk if mask_window is None else None, h, w)
            mask_box = (0, 0, w, h) if mk is not None and mask_window is None else None
            out.append(_Prompt(p, labels[i].numpy() if labels is not None else None, bx, mk, mask_box, mask_window, ext))
        return out

    # ------------------------------------------------------------------ refinement at native resolution

    def _refine(self, q: _Prompt, multimask: bool, hq_only: bool, full: bool) -> Region:
        """Replace a coarse mask by level-0 decodes in a band around its boundary, tile by tile, where they agree."""
        coarse = q.result
        if not coarse.mask.any():
            return coarse
        win = coarse.window
        in_h, in_w = self._input_shape(win)
        # one low-res mask cell of the coarse window, in native pixels: how far its boundary may be off
        r = max(1, math.ceil(win.width / in_w * self.image_size / self.mask_size))
        x0, y0, x1, y1 = coarse.box
        box = (max(x0 - 2 * r, win.box[0]), max(y0 - 2 * r, win.box[1]),
               min(x1 + 2 * r, win.box[2]), min(y1 + 2 * r, win.box[3]))
        tiles = [t for t in self.windows[0] if _intersect(t.core, box) is not None]
        if len(tiles) > self.max_refine_tiles:
            return coarse
        stage1 = self.predictor.transform.postprocess_masks(coarse.low_res_logits[None], (in_h, in_w), (in_h, in_w))[0]
        logits = self._region(win, stage1, coarse.score, coarse.low_res_logits, False, box=box).logits.copy()
        coarse_mask = logits > self.predictor.mask_threshold
        t = torch.from_numpy(coarse_mask)[None, None].float()
        dilated = F.max_pool2d(t, 2 * r + 1, 1, r)[0, 0].numpy() > 0
        eroded = -F.max_pool2d(-t, 2 * r + 1, 1, r)[0, 0].numpy() > 0
        band = dilated & ~eroded
        used = 0
        for tile in tiles:
            cx0, cy0, cx1, cy1 = _intersect(tile.core, box)
            here = np.s_[cy0 - box[1]:cy1 - box[1], cx0 - box[0]:cx1 - box[0]]
            there = np.s_[cy0 - tile.box[1]:cy1 - tile.box[1], cx0 - tile.box[0]:cx1 - tile.box[0]]
            prompt_box = _intersect(coarse.box, tile.box)
            if not band[here].any() or prompt_box is None:
                continue
            guide = np.full((tile.height, tile.width), -MASK_LOGIT, np.float32)  # the coarse mask as the tile's mask input
            gx0, gy0, gx1, gy1 = _intersect(box, tile.box)
            guide[gy0 - tile.box[1]:gy1 - tile.box[1], gx0 - tile.box[0]:gx1 - tile.box[0]] = \
                logits[gy0 - box[1]:gy1 - box[1], gx0 - box[0]:gx1 - box[0]]
            pb = np.asarray(prompt_box, dtype=np.float64)
            guide_q = _Prompt(None, None, pb, guide, tile.box, None, pb) if self.refine == "box+mask" else \
                _Prompt(None, None, pb, None, None, None, pb)
            fine = self._decode(tile, [guide_q], multimask, hq_only, True)[0].logits[there]
            fine_mask, ref = fine > self.predictor.mask_threshold, coarse_mask[here]
            union = (fine_mask | ref).sum()
            if union == 0 or (fine_mask & ref).sum() / union < 0.5:
                continue
            logits[here] = np.where(band[here], fine, logits[here])
            used += 1
        mask = logits > self.predictor.mask_threshold
        m, lg, b = (mask, logits, box) if full else _tighten(mask, logits, box)
        return Region(m, lg, b, coarse.score, coarse.window, coarse.low_res_logits, used)


def _intersect(a, b):
    """The intersection of two (x0, y0, x1, y1) boxes, or None when it is empty."""
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


# ---------------------------------------------------------------------------------------------
# Everything mode


@dataclass
class TilePiece:
    """One automatic mask of one level-0 window, as a crop: mask (h, w) bool over box (x0, y0, x1, y1)
    image pixels; touches: which of the window's cut edges (left, top, right, bottom) it reaches."""

    mask: np.ndarray
    box: tuple[int, int, int, int]
    window: Window
    predicted_iou: float
    stability_score: float
    point: tuple[float, float]
    touches: tuple[bool, bool, bool, bool]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def _area_in(p: TilePiece, box) -> int:
    both = _intersect(p.box, box)
    if both is None:
        return 0
    x0, y0, x1, y1 = both
    return int(p.mask[y0 - p.box[1]:y1 - p.box[1], x0 - p.box[0]:x1 - p.box[0]].sum())


def _overlap_in(a: TilePiece, b: TilePiece, box) -> int:
    both = _intersect(a.box, b.box)
    both = both and _intersect(both, box)
    if not both:
        return 0
    x0, y0, x1, y1 = both
    ma = a.mask[y0 - a.box[1]:y1 - a.box[1], x0 - a.box[0]:x1 - a.box[0]]
    mb = b.mask[y0 - b.box[1]:y1 - b.box[1], x0 - b.box[0]:x1 - b.box[0]]
    return int((ma & mb).sum())


def _iou_in(a: TilePiece, b: TilePiece, box) -> float:
    inter = _overlap_in(a, b, box)
    union = _area_in(a, box) + _area_in(b, box) - inter
    return inter / union if union else 0.0


def _union(pieces: list[TilePiece]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    x0, y0 = min(p.box[0] for p in pieces), min(p.box[1] for p in pieces)
    x1, y1 = max(p.box[2] for p in pieces), max(p.box[3] for p in pieces)
    out = np.zeros((y1 - y0, x1 - x0), bool)
    for p in pieces:
        out[p.box[1] - y0:p.box[3] - y0, p.box[0] - x0:p.box[2] - x0] |= p.mask
    return out, (x0, y0, x1, y1)


def merge_tile_masks(pieces: list[TilePiece], iou_thresh: float = 0.5, nms_thresh: float = 0.7) -> list[dict]:
    """Merge automatic masks of overlapping windows into objects in image coordinates.

    A piece's match in another window is the piece there with the highest IoU *within the two
    windows' overlap*, if above iou_thresh. An object grows from each piece by following matches to
    windows not yet in it (so it holds at most one piece per window). If one of its pieces touches no
    cut edge, that window saw the whole object: the best such piece (by predicted IoU) is the
    object, the others are duplicates. Otherwise the object was cut in every window and is the union
    of its pieces (scores area-weighted). Objects reached from several pieces count once; then,
    as the generator does, box NMS at nms_thresh keeps the better of two overlapping objects.
    Returns dicts with `mask` (crop), `box` (x0, y0, x1, y1, end exclusive), `area`,
    `predicted_iou`, `stability_score`, `point`, `window` (of the piece kept, or the largest piece)
    and `pieces` (how many window masks it merges).
    """
    n = len(pieces)
    boxes = np.array([p.box for p in pieces], dtype=np.int64).reshape(-1, 4)
    best: list[dict] = [{} for _ in range(n)]  # piece -> {window index: (iou, other piece)}
    for i in range(n):
        a = pieces[i]
        cand = np.flatnonzero((boxes[i + 1:, 0] < a.box[2]) & (boxes[i + 1:, 2] > a.box[0]) &
                              (boxes[i + 1:, 1] < a.box[3]) & (boxes[i + 1:, 3] > a.box[1])) + i + 1
        for j in cand.tolist():
            b = pieces[j]
            if b.window.index == a.window.index:
                continue
            shared = _intersect(a.window.box, b.window.box)
            iou = _iou_in(a, b, shared) if shared is not None else 0.0
            if iou <= iou_thresh:
                continue
            for x, y in ((i, j), (j, i)):
                w = pieces[y].window.index
                if w not in best[x] or (iou, pieces[y].predicted_iou) > (best[x][w][0], pieces[best[x][w][1]].predicted_iou):
                    best[x][w] = (iou, y)
    seen, objects = set(), []
    for seed in range(n):
        members, by_window, frontier = [seed], {pieces[seed].window.index}, [seed]
        while frontier:
            x = frontier.pop()
            for w, (_, y) in best[x].items():
                if w not in by_window:
                    by_window.add(w)
                    members.append(y)
                    frontier.append(y)
        group = [pieces[i] for i in members]
        whole = [i for i in members if not any(pieces[i].touches)]
        key = (max(whole, key=lambda i: pieces[i].predicted_iou),) if whole else tuple(sorted(members))
        if key in seen:
            continue
        seen.add(key)
        if whole:
            p = pieces[key[0]]
            objects.append(dict(mask=p.mask, box=p.box, area=p.area, predicted_iou=p.predicted_iou,
                                stability_score=p.stability_score, point=p.point, window=p.window, pieces=len(group)))
            continue
        mask, box = _union(group)
        areas = np.array([p.area for p in group], dtype=np.float64)
        w = areas / areas.sum() if areas.sum() else np.full(len(group), 1 / len(group))
        largest = group[int(np.argmax(areas))]
        objects.append(dict(mask=mask, box=box, area=int(mask.sum()), predicted_iou=float(w @ [p.predicted_iou for p in group]),
                            stability_score=float(w @ [p.stability_score for p in group]), point=largest.point,
                            window=largest.window, pieces=len(group)))
    if not objects:
        return []
    # boxes as the generator compares them: inclusive pixel indices
    xyxy = torch.tensor([[o["box"][0], o["box"][1], o["box"][2] - 1, o["box"][3] - 1] for o in objects], dtype=torch.float)
    keep = M.box_nms(xyxy, torch.tensor([o["predicted_iou"] for o in objects]), nms_thresh)
    return [objects[i] for i in keep.tolist()]


class TiledMaskGenerator:
    """Segment everything in a huge image: `SamHQAutomaticMaskGenerator` on every level-0 window, merged across borders.

        gen = TiledMaskGenerator(model, points_per_side=16)      # any SamHQAutomaticMaskGenerator option
        records = gen.generate(big_image)                        # image coordinates, like generate()'s records

    tile_size and overlap as in `TiledPredictor` (the overlap should exceed the objects you expect to
    see whole: an object smaller than the overlap always lies whole in some window); merge_iou_thresh,
    the IoU within two windows' overlap above which their masks are one object; edge_tolerance,
    native pixels from a cut edge within which a mask counts as cut (default: one low-res mask cell,
    tile_size / mask size, 4 px for the released models at their input size); output_mode as the generator's
    ("binary_mask" full-size bool arrays, "uncompressed_rle" or "coco_rle", built from the crops
    without a full-size array). Records also carry `crop_box`, the window [x, y, w, h] the mask came
    from, and `tile_pieces`, how many window masks it merges.
    """

    def __init__(self, model, tile_size: int | None = None, overlap: int | None = None, merge_iou_thresh: float = 0.5,
                 edge_tolerance: float | None = None, output_mode: str = "binary_mask", **generator_kwargs) -> None:
        from .automatic import OUTPUT_MODES, SamHQAutomaticMaskGenerator

        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}; got {output_mode!r}")
        if generator_kwargs.get("output_mode") is not None:
            raise ValueError("give output_mode once")
        self.generator = SamHQAutomaticMaskGenerator(model, output_mode="binary_mask", **generator_kwargs)
        self.tile_size = int(tile_size or self.generator.predictor.image_size)
        self.overlap = int(self.tile_size // 4 if overlap is None else overlap)
        _check_tiling(self.tile_size, self.overlap)
        p = self.generator.predictor
        # default: one low-res mask cell, in native pixels (masks fade out about that far from where they are cut)
        self.edge_tolerance = self.tile_size / p.mask_size if edge_tolerance is None else float(edge_tolerance)
        self.merge_iou_thresh, self.output_mode = merge_iou_thresh, output_mode
        if output_mode == "coco_rle":
            M._coco_mask_api()

    def tile_pieces(self, source, multimask_output: bool = True, hq_token_only: bool = False, progress=None) -> list[TilePiece]:
        """Every window's automatic masks, as crops in image coordinates."""
        h, w = source.shape
        windows = tile_windows(h, w, self.tile_size, self.overlap, 0)
        pieces = []
        for win in windows if progress is None else progress(windows):
            tile = source.read(win.box)
            for r in self.generator.generate(tile, multimask_output, hq_token_only):
                bx, by, bw, bh = (int(v) for v in r["bbox"])
                crop = r["segmentation"][by:by + bh + 1, bx:bx + bw + 1]
                box = (win.box[0] + bx, win.box[1] + by, win.box[0] + bx + crop.shape[1], win.box[1] + by + crop.shape[0])
                px, py = r["point_coords"][0]
                pieces.append(TilePiece(crop, box, win, float(r["predicted_iou"]), float(r["stability_score"]),
                                        (win.box[0] + px, win.box[1] + py), _touches(crop, box, win, self.edge_tolerance)))
        return pieces

    def objects(self, image, multimask_output: bool = True, hq_token_only: bool = False, progress=None) -> list[dict]:
        """The merged objects as crops (`merge_tile_masks`' dicts: mask, box, area, scores, ...): no full-size
        array is made, so this suits images of any size (`samhq.geo` writes them out)."""
        source = as_source(image)
        return merge_tile_masks(self.tile_pieces(source, multimask_output, hq_token_only, progress),
                                self.merge_iou_thresh, self.generator.box_nms_thresh)

    def generate(self, image, multimask_output: bool = True, hq_token_only: bool = False, progress=None) -> list[dict]:
        """Records like `SamHQAutomaticMaskGenerator.generate`'s, in image coordinates, for an image or a window source.

        progress: optional wrapper for the window loop (e.g. tqdm). Records are sorted by predicted IoU.
        """
        source = as_source(image)
        return self.records(self.objects(source, multimask_output, hq_token_only, progress), *source.shape)

    def records(self, objects: list[dict], height: int, width: int) -> list[dict]:
        """`objects`' merged crops as `generate`'s records for a (height, width) image (segmentation per output_mode)."""
        h, w = height, width
        records = []
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            if self.output_mode == "binary_mask":
                seg = np.zeros((h, w), bool)
                seg[y0:y1, x0:x1] = o["mask"]
            else:
                seg = M.crop_to_rle(o["mask"], x0, y0, h, w)
                if self.output_mode == "coco_rle":
                    seg = M.rle_to_coco(seg)
            bx = M.mask_bbox(o["mask"])
            win = o["window"].box
            records.append({  # bbox as the generator gives it: [x, y, x_last - x, y_last - y] (SAM's convention)
                "segmentation": seg, "area": o["area"], "bbox": [x0 + bx[0], y0 + bx[1], max(0, bx[2] - 1), max(0, bx[3] - 1)],
                "predicted_iou": o["predicted_iou"], "point_coords": [list(o["point"])],
                "stability_score": o["stability_score"], "crop_box": [win[0], win[1], win[2] - win[0], win[3] - win[1]],
                "tile_pieces": o["pieces"],
            })
        return records
