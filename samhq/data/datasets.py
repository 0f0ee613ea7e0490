"""Datasets of real images with masks: an image/mask folder pair (DIS5K, HQSeg-44K) and COCO instance JSON.

Every dataset yields dicts like `SyntheticShapes`: image uint8 (H, W, 3), masks list of bool (H, W)
(one per object) and name. Files that cannot be used are skipped, never fatal: each skip is kept in
`dataset.skipped` as (name, reason). Pairs are checked when the dataset is built (file headers, sizes,
annotations); an image whose data turns out to be corrupt only when decoded raises `SkippedItem` from
`dataset[i]`, and iterating the dataset (`for item in dataset`) skips it and records it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..image_io import image_size, open_image, to_rgb_array

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_READ_ERRORS = (OSError, ValueError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError)


class SkippedItem(ValueError):
    """An item whose files could not be read; iteration skips it."""


class _SkippingDataset:
    """Shared bookkeeping: `skipped` list, iteration that skips unreadable items."""

    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        raise NotImplementedError

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __iter__(self):
        for i in range(len(self)):
            try:
                yield self[i]
            except SkippedItem:
                continue  # recorded by __getitem__

    def _skip(self, name: str, reason: str) -> None:
        if (name, reason) not in self.skipped:
            self.skipped.append((name, reason))


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image will be read (EXIF orientation applied), from the file header;
    raises one of _READ_ERRORS if it is not an image or is over the pixel limit (`samhq.limits`)."""
    return image_size(path)


def _read_mask(path: Path, threshold: int) -> np.ndarray:
    """A mask file (any mode; colour is converted to grey) -> bool (H, W): grey value > threshold.

    Read through the image intake like the images (`samhq.image_io.open_image`: EXIF orientation, pixel limit)."""
    with open_image(path) as im:
        arr = np.asarray(im.convert("L") if im.mode not in ("L", "1", "I", "I;16") else im)
    if arr.dtype == bool:
        return arr.copy()
    if arr.dtype != np.uint8:  # 16-bit masks: scale to 0..255 first
        arr = (arr.astype(np.float64) / 257).round()
    return arr > threshold


class MaskFolder(_SkippingDataset):
    """Images with one foreground mask each, paired by file name: `root/im/x.jpg` + `root/gt/x.png`.

    `MaskFolder(root)` uses the DIS5K layout (sub-folders `im` and `gt`); `MaskFolder(images, masks=dir)`
    takes any two folders, which may be the same one (HQSeg-44K's cascade_psp: `x.jpg` next to `x.png`).
    A mask pixel is foreground when its grey value is > `threshold` (128, as SAM-HQ's evaluation).
    Images without a mask, unreadable files and image/mask size mismatches are skipped.
    """

    def __init__(self, root, masks=None, image_exts=IMAGE_EXTS, mask_ext: str = ".png", threshold: int = 128):
        root = Path(root)
        if masks is None:
            if not (root / "im").is_dir() or not (root / "gt").is_dir():
                raise ValueError(
                    f"{root} has no im/ and gt/ sub-folders; pass the mask folder too: MaskFolder(images_dir, masks=masks_dir)"
                )
            image_dir, mask_dir = root / "im", root / "gt"
        else:
            image_dir, mask_dir = root, Path(masks)
        for d in (image_dir, mask_dir):
            if not d.is_dir():
                raise ValueError(f"{d} is not a folder")
        self.image_dir, self.mask_dir, self.threshold = image_dir, mask_dir, threshold
        self.skipped = []
        same = image_dir.resolve() == mask_dir.resolve()
        exts = {e.lower() for e in image_exts} - ({mask_ext.lower()} if same else set())
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in exts and p.is_file())
        self.pairs: list[tuple[Path, Path]] = []
        for img in images:
            mask = mask_dir / (img.stem + mask_ext)
            if not mask.is_file():
                self._skip(img.name, f"no mask {mask.name} in {mask_dir}")
                continue
            try:
                size = _header_size(img)
            except _READ_ERRORS as e:
                self._skip(img.name, f"unreadable image: {e}")
                continue
            try:
                msize = _header_size(mask)
            except _READ_ERRORS as e:
                self._skip(img.name, f"unreadable mask {mask.name}: {e}")
                continue
            if size != msize:
                self._skip(img.name, f"image is {size[0]}x{size[1]} but mask {mask.name} is {msize[0]}x{msize[1]}")
                continue
            self.pairs.append((img, mask))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        img_path, mask_path = self.pairs[index]
        try:
            image = to_rgb_array(img_path)
            mask = _read_mask(mask_path, self.threshold)
        except _READ_ERRORS as e:
            self._skip(img_path.name, f"cannot decode: {e}")
            raise SkippedItem(f"{img_path.name}: cannot decode: {e}") from None
        return {"image": image, "masks": [mask] if mask.any() else [], "name": img_path.stem}


class CocoInstances(_SkippingDataset):
    """COCO instance annotations (polygons, uncompressed and compressed RLE), one item per image.

    Images are looked up as `image_dir / file_name` (default: the JSON file's folder). Crowd regions are
    left out unless `include_crowd`; objects smaller than `min_area` pixels are dropped. Images with no
    usable annotation, missing or unreadable image files, size mismatches with the JSON and annotations
    that cannot be decoded are skipped and recorded.
    """

    def __init__(self, annotation_file, image_dir=None, min_area: int = 1, include_crowd: bool = False,
                 category_ids=None):
        path = Path(annotation_file)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"COCO annotation file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if (not isinstance(data, dict) or not isinstance(data.get("images"), list)
                or not isinstance(data.get("annotations"), list)):
            raise ValueError(f"{path} is not a COCO instance file: it needs 'images' and 'annotations' lists")
        self.image_dir = Path(image_dir) if image_dir is not None else path.parent
        self.min_area, self.skipped = min_area, []
        cats = set(category_ids) if category_ids is not None else None
        by_image: dict = {}
        for ann in data["annotations"]:
            if not isinstance(ann, dict) or "image_id" not in ann or "segmentation" not in ann:
                self._skip(str(ann.get("id", "?")) if isinstance(ann, dict) else "?", "annotation without image_id/segmentation")
                continue
            if (ann.get("iscrowd", 0) and not include_crowd) or (cats is not None and ann.get("category_id") not in cats):
                continue
            by_image.setdefault(ann["image_id"], []).append(ann)
        self.entries: list[tuple[dict, list[dict]]] = []
        for info in data["images"]:
            anns = by_image.get(info.get("id")) if isinstance(info, dict) else None
            if not anns:
                continue  # nothing to segment in this image; not an error
            name = str(info.get("file_name", info.get("id")))
            file = self.image_dir / name
            try:
                w, h = _header_size(file)
            except FileNotFoundError:
                self._skip(name, f"image file not found in {self.image_dir}")
                continue
            except _READ_ERRORS as e:
                self._skip(name, f"unreadable image: {e}")
                continue
            if (info.get("width", w), info.get("height", h)) != (w, h):
                self._skip(name, f"file is {w}x{h} (EXIF orientation applied) but the JSON says "
                                 f"{info.get('width')}x{info.get('height')}")
                continue
            self.entries.append(({"file": file, "name": name, "height": h, "width": w}, anns))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        info, anns = self.entries[index]
        try:
            image = to_rgb_array(info["file"])
        except _READ_ERRORS as e:
            self._skip(info["name"], f"cannot decode: {e}")
            raise SkippedItem(f"{info['name']}: cannot decode: {e}") from None
        masks, ids, categories = [], [], []
        for ann in anns:
            try:
                m = decode_segmentation(ann["segmentation"], info["height"], info["width"])
            except (ValueError, TypeError, KeyError) as e:
                self._skip(f"{info['name']}#{ann.get('id', '?')}", f"bad segmentation: {e}")
                continue
            if m.sum() < self.min_area:
                continue
            masks.append(m), ids.append(ann.get("id")), categories.append(ann.get("category_id"))
        return {"image": image, "masks": masks, "name": Path(info["name"]).stem, "ids": ids, "categories": categories}


def decode_segmentation(segm, height: int, width: int) -> np.ndarray:
    """A COCO `segmentation` (polygon list, uncompressed RLE or compressed RLE) -> bool (height, width)."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise ImportError("reading COCO masks needs pycocotools: pip install pycocotools") from None
    if isinstance(segm, list):
        polys = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            raise ValueError("no polygon with at least 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            raise ValueError(f"RLE size {segm['size']} differs from the image's {[height, width]}")
        if isinstance(segm["counts"], list):
            if sum(segm["counts"]) != height * width:
                raise ValueError("uncompressed RLE counts do not add up to height x width")
            rle = mask_utils.frPyObjects(segm, height, width)
        else:
            counts = segm["counts"].encode() if isinstance(segm["counts"], str) else segm["counts"]
            rle = {"size": [height, width], "counts": counts}
    else:
        raise ValueError(f"unknown segmentation format {type(segm).__name__}")
    return mask_utils.decode(rle).astype(bool)
