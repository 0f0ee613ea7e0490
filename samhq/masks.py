"""Mask utilities for automatic mask generation.

Point grids and crop boxes, stability scores, boxes from masks, box NMS (torch, no torchvision),
run-length encoding (uncompressed, and COCO via pycocotools), small-region removal (scipy).
Boxes are XYXY pixel coordinates unless a name says XYWH. An uncompressed RLE is
`{"size": [H, W], "counts": [...]}` over the column-major (Fortran-order) pixels, starting with a
run of zeros, as pycocotools expects.
"""
from __future__ import annotations

import math
import warnings
from itertools import product

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Prompt points and crops


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) (x, y) points on a regular grid in [0, 1]^2, cell centres, x varying fastest."""
    half = 1 / (2 * n_per_side)
    side = np.linspace(half, 1 - half, n_per_side)
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def build_point_grids(n_per_side: int, n_layers: int, downscale: int) -> list[np.ndarray]:
    """One grid per crop layer; layer i has int(n_per_side / downscale**i) points a side."""
    return [build_point_grid(int(n_per_side / downscale**i)) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: tuple[int, int], n_layers: int, overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """XYXY crop boxes and their layer index: the whole image, then (2^i)^2 overlapping crops for layer i."""
    im_h, im_w = im_size
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * min(im_h, im_w) * 2 / n)
        crop_w = math.ceil((overlap * (n - 1) + im_w) / n)
        crop_h = math.ceil((overlap * (n - 1) + im_h) / n)
        x0s = [int((crop_w - overlap) * i) for i in range(n)]
        y0s = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer)
    return boxes, layers


# ---------------------------------------------------------------------------------------------
# Scores and boxes


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float, empty: float | None = None) -> torch.Tensor:
    """IoU of the masks thresholded at mask_threshold +- offset: (..., H, W) -> (...).

    A mask empty at both thresholds scores NaN (SAM's automatic generator), or `empty` when given
    (SAM 2's dynamic multimask selection uses 1).
    """
    inner = (logits > mask_threshold + offset).sum((-2, -1)).float()
    outer = (logits > mask_threshold - offset).sum((-2, -1)).float()
    if empty is None:
        return inner / outer
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.full_like(outer, empty))


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (inclusive pixel indices) around bool masks (..., H, W) -> (..., 4) int64; empty -> 0s."""
    h, w = masks.shape[-2:]
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, dtype=torch.int64, device=masks.device)
    rows, cols = masks.any(-1), masks.any(-2)
    top = rows.int().argmax(-1)
    bottom = h - 1 - rows.flip(-1).int().argmax(-1)
    left = cols.int().argmax(-1)
    right = w - 1 - cols.flip(-1).int().argmax(-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    return boxes * rows.any(-1, keepdim=True)


def box_xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) XYXY -> XYWH."""
    return torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (N, 4) XYXY boxes -> (N, N), computed in the boxes' float dtype."""
    area = box_area(boxes)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area[:, None] + area[None, :] - inter)


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first.

    Ties in score keep their input order; a box is dropped when its IoU with a kept, better box
    is above iou_threshold (torchvision.ops.nms semantics). boxes (N, 4) XYXY, scores (N,).
    """
    if len(boxes) == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    over = (box_iou(boxes[order].float()) > iou_threshold).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= over[i]
    return order[torch.as_tensor(keep, device=order.device)]


def is_box_near_crop_edge(boxes: torch.Tensor, crop_box: list[int], orig_box: list[int], atol: float = 20.0) -> torch.Tensor:
    """(N,) True where a box (XYXY, crop frame) lies within atol of a crop edge that is not an image edge."""
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float32, device=boxes.device)
    boxes = (boxes + crop[[0, 1, 0, 1]]).float()
    near_crop = (boxes - crop).abs() <= atol
    near_image = (boxes - orig).abs() <= atol
    return (near_crop & ~near_image).any(dim=-1)


def uncrop_masks(masks: torch.Tensor, crop_box: list[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Place (N, h, w) crop masks into zero (N, orig_h, orig_w) masks."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    return torch.nn.functional.pad(masks, (x0, orig_w - x1, y0, orig_h - y1), value=0)


# ---------------------------------------------------------------------------------------------
# Run-length encoding


def mask_to_rle(masks: torch.Tensor) -> list[dict]:
    """Bool masks (N, H, W) -> N uncompressed RLEs (pycocotools' column-major runs, zeros first)."""
    n, h, w = masks.shape
    flat = masks.transpose(1, 2).reshape(n, h * w)
    which, where = (flat[:, 1:] != flat[:, :-1]).nonzero(as_tuple=True)
    per_mask = torch.bincount(which, minlength=n).tolist()
    ends = np.split((where + 1).cpu().numpy(), np.cumsum(per_mask)[:-1])
    first = flat[:, 0].tolist() if h * w else [False] * n
    out = []
    for i in range(n):
        counts = np.diff(np.concatenate([[0], ends[i], [h * w]])).tolist()
        out.append({"size": [h, w], "counts": ([0] + counts) if first[i] else counts})
    return out


def rle_to_mask(rle: dict) -> np.ndarray:
    """Uncompressed RLE -> bool (H, W) mask."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size} pixels but its size is {h}x{w}")
    return np.ascontiguousarray(flat.reshape(w, h).T)


def area_from_rle(rle: dict) -> int:
    return int(sum(rle["counts"][1::2]))


def _coco_mask_api():
    """pycocotools.mask, or an ImportError that says how to install it."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise ImportError("COCO RLE needs pycocotools, which is not installed: "
                          "pip install 'samhq[amg]' (or pip install pycocotools)") from None
    return mask_utils


def _json_ready(coco: dict) -> dict:
    return {"size": [int(s) for s in coco["size"]], "counts": coco["counts"].decode("ascii")}


def mask_to_coco(mask: np.ndarray) -> dict:
    """Bool (H, W) mask -> COCO compressed RLE {"size": [H, W], "counts": str} (JSON-ready). Needs pycocotools."""
    return _json_ready(_coco_mask_api().encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8))))


def rle_to_coco(rle: dict) -> dict:
    """Uncompressed RLE -> COCO compressed RLE with a str `counts` (JSON-ready). Needs pycocotools."""
    h, w = rle["size"]
    return _json_ready(_coco_mask_api().frPyObjects(rle, h, w))


def coco_to_mask(rle: dict) -> np.ndarray:
    """COCO compressed RLE (str or bytes counts) -> bool (H, W) mask. Needs pycocotools."""
    mask_utils = _coco_mask_api()
    counts = rle["counts"]
    rle = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():  # pycocotools' own NumPy-2 copy-keyword deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


# ---------------------------------------------------------------------------------------------
# Binary morphology with square structuring elements (numpy only: the synthetic data and the
# metrics need no scipy or OpenCV)


def _shift_reduce(mask: np.ndarray, radius: int, op, fill: bool) -> np.ndarray:
    """Apply `op` (np.maximum / np.minimum) over a (2r+1)^2 square, separably; outside pixels are `fill`."""
    out = mask.astype(bool, copy=True)
    if radius <= 0:
        return out
    for axis in (0, 1):
        src = out
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(src, pad, constant_values=fill)
        n = src.shape[axis]
        acc = src.copy()
        for k in range(2 * radius + 1):
            if k == radius:
                continue
            window = padded[k:k + n] if axis == 0 else padded[:, k:k + n]
            op(acc, window, out=acc)
        out = acc
    return out


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of an (H, W) mask by a (2r+1) x (2r+1) square."""
    return _shift_reduce(mask, radius, np.maximum, False)


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion of an (H, W) mask by a (2r+1) x (2r+1) square; outside the image counts as background."""
    return _shift_reduce(mask, radius, np.minimum, False)


# ---------------------------------------------------------------------------------------------
# Small regions

_EIGHT = np.ones((3, 3), dtype=bool)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes ("holes") or drop islands ("islands") smaller than area_thresh pixels (8-connected).

    When every island is small the largest one is kept. Returns the new (H, W) bool mask and
    whether anything changed.
    """
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    labels, n = ndimage.label(~mask if holes else mask, structure=_EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    if holes:
        fill = np.concatenate([[True], small])  # the mask itself (label 0) plus the small holes
    else:
        big = ~small if (~small).any() else np.arange(n) == np.argmax(sizes)
        fill = np.concatenate([[False], big])
    return fill[labels], True


def best_mask(masks: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One mask per prompt from `SamHQPredictor.predict`'s output: masks (..., C, H, W), scores (..., K).

    With C == K (plain SAM / SAM 2 multimask: three candidates; or one mask and one score) the best-scored
    candidate; with C = 1 < K (HQ-SAM 2's HQ mask alone with multimask: one mask, its three SAM tokens'
    scores) that mask. Returns (masks (..., H, W), scores (...)), the score being the highest of K.
    """
    masks, scores = np.asarray(masks), np.asarray(scores)
    best = scores.argmax(-1) if masks.shape[-3] == scores.shape[-1] else np.zeros(scores.shape[:-1], dtype=int)
    picked = np.take_along_axis(masks, best[..., None, None, None], axis=-3)[..., 0, :, :]
    return picked, scores.max(-1)


def mask_bbox(mask) -> list[int]:
    """(H, W) bool -> [x, y, width, height] of the mask's pixels ([0, 0, 0, 0] when empty)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def crop_to_rle(crop: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict:
    """A bool mask crop placed at column x0, row y0 of an all-zero (height, width) image -> uncompressed RLE.

    The full-size mask is never built, so this is cheap for a small object in a huge image. Runs are
    pycocotools' column-major runs, zeros first (as `mask_to_rle`).
    """
    crop = np.asarray(crop, dtype=bool)
    h, w = crop.shape
    if x0 < 0 or y0 < 0 or x0 + w > width or y0 + h > height:
        raise ValueError(f"a {w}x{h} crop at ({x0}, {y0}) does not fit in a {width}x{height} image")
    # zero rows above and below separate the columns, so every run starts and ends inside one column
    padded = np.zeros((h + 2, w), dtype=np.int8)
    padded[1:-1] = crop
    change = np.diff(padded.T.reshape(-1))
    col_len = h + 2
    starts, ends = np.flatnonzero(change == 1) + 1, np.flatnonzero(change == -1) + 1
    cols, rows0, rows1 = starts // col_len, starts % col_len - 1, ends % col_len - 1  # crop rows [rows0, rows1)
    begin = (x0 + cols) * height + y0 + rows0
    end = (x0 + cols) * height + y0 + rows1
    if len(begin) > 1:  # a run reaching the bottom of a column continues at the top of the next one
        joined = np.concatenate([[False], begin[1:] == end[:-1]])
        keep_begin, keep_end = ~joined, np.concatenate([~joined[1:], [True]])
        begin, end = begin[keep_begin], end[keep_end]
    edges = np.stack([begin, end], 1).reshape(-1)
    counts = np.diff(np.concatenate([[0], edges, [height * width]])).tolist()
    if len(counts) > 1 and counts[-1] == 0:  # the mask reaches the last pixel
        counts.pop()
    return {"size": [int(height), int(width)], "counts": counts}
