"""Image and prompt preprocessing shared by the predictor and `SamHQProcessor`.

The pipeline both references use: resize the longest side to the model's image size (PIL bilinear),
normalise with ImageNet mean / std (on the 0..255 scale), pad bottom / right to a square. Prompt
coordinates are scaled by new / old size per axis. Low-resolution mask logits go back to the
original size by upsampling to the padded square, cropping the padding, and resizing.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from .modeling.prompt_encoder import check_prompts

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The official code normalises on the 0..255 scale with these float32 constants.
PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to `long_side`, rounded half up as SAM does."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_rgb(image: np.ndarray, long_side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with the longest side `long_side` (PIL bilinear, antialiased)."""
    h, w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def normalize_and_pad(pixels: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 3, h, w) values in 0..255 -> (B, 3, S, S) float32, normalised and zero-padded bottom / right."""
    x = (pixels.float() - PIXEL_MEAN.to(pixels.device)) / PIXEL_STD.to(pixels.device)
    h, w = x.shape[-2:]
    return F.pad(x, (0, image_size - w, 0, image_size - h))


def scale_coords(coords, original_size: tuple[int, int], long_side: int):
    """Scale (..., 2) x, y coordinates from the original (H, W) frame to the resized input frame.

    Works on numpy arrays (returns float64) and torch tensors (returns float32); the input is not modified.
    """
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(old_h, old_w, long_side)
    factor = [new_w / old_w, new_h / old_h]
    if isinstance(coords, torch.Tensor):
        return coords.to(torch.float) * torch.tensor(factor, dtype=torch.float, device=coords.device)
    return np.asarray(coords, dtype=np.float64) * np.asarray(factor)


def low_res_read(low_hw, input_size, pad_size) -> tuple[int, int]:
    """How many leading rows and columns of low-res logits (..., h, w) `upscale_logits` reads, for an image resized
    to input_size (h_in, w_in) and padded to pad_size (an int S or (S_h, S_w)).

    Along an axis the padding enlarges by a whole factor s, the bilinear upsampling's pixels below k (the crop) read
    low-res pixels below ceil(k / s) + 1 only, at the same source coordinates as in the full upsampling (its scale
    n / (n * s) is the same float for every n); along any other axis, all of them.
    """
    pad = (pad_size, pad_size) if isinstance(pad_size, int) else tuple(pad_size)
    out = []
    for n, k, p in zip((int(v) for v in low_hw), (int(v) for v in input_size), (int(v) for v in pad)):
        out.append(min(n, -(-k // (p // n)) + 1) if p >= n and p % n == 0 else n)
    return out[0], out[1]


def upscale_logits(
    low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], pad_size
) -> torch.Tensor:
    """Low-res logits (..., h, w) -> (..., H, W) at the original size: upsample to the padded input
    (`pad_size`, an int S or (S_h, S_w)), crop the padding to `input_size`, then resize to
    `original_size` (bilinear, float32)."""
    pad = (pad_size, pad_size) if isinstance(pad_size, int) else tuple(pad_size)
    lead = low_res.shape[:-2]
    x = low_res.float().reshape(1, -1, *low_res.shape[-2:])
    # only the part the crop keeps is upsampled (see low_res_read): the full upsampling's values, up to rounding
    h, w = x.shape[-2:]
    rows, cols = low_res_read((h, w), input_size, pad)
    x = F.interpolate(x[..., :rows, :cols], (pad[0] * rows // h, pad[1] * cols // w), mode="bilinear", align_corners=False)
    x = x[..., : int(input_size[0]), : int(input_size[1])]
    if tuple(x.shape[-2:]) != tuple(int(v) for v in original_size):  # a same-size bilinear resize is the identity
        x = F.interpolate(x, tuple(int(v) for v in original_size), mode="bilinear", align_corners=False)
    return x.reshape(*lead, *x.shape[-2:])


class ResizeLongestSide:
    """SAM's image transform (official name and methods): resize so the longest side is `target_length`
    (PIL bilinear), scale prompt coordinates by new / old size per axis, normalise and zero-pad to a
    square for the encoder, and bring low-resolution mask logits back to the original size.
    Sizes are (H, W); coordinates are x, y pixels."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        return preprocess_shape(oldh, oldw, long_side_length)

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of an image of `original_size` after resizing."""
        return preprocess_shape(int(original_size[0]), int(original_size[1]), self.target_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) uint8, PIL bilinear."""
        return resize_rgb(np.ascontiguousarray(image), self.target_length)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float -> (B, C, h, w), antialiased bilinear (close to, not equal to, `apply_image`)."""
        size = preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)

    def pixel_values(self, resized: torch.Tensor) -> torch.Tensor:
        """The encoder's input from a resized image (1, 3, h, w) with values 0..255: (1, 3, S, S) float32."""
        return normalize_and_pad(resized, self.target_length)

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> the encoder's input (1, 3, S, S) float32: resized, normalised, padded."""
        return self.pixel_values(torch.from_numpy(self.apply_image(rgb)).permute(2, 0, 1)[None])

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) x, y in the original (H, W) image -> the resized frame (float64)."""
        return scale_coords(coords, original_size, self.target_length)

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(B, 4) or (4,) x0, y0, x1, y1 -> (B, 4) in the resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        return scale_coords(coords, original_size, self.target_length)

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def postprocess_masks(self, low_res: torch.Tensor, input_size, original_size) -> torch.Tensor:
        """Low-res logits (..., m, m) -> float32 logits (..., H, W) at the original size (`upscale_logits`)."""
        return upscale_logits(low_res, input_size, original_size, self.target_length)

    def low_res_read(self, low_hw, input_size) -> tuple[int, int]:
        """The leading rows and columns of low-res logits (..., m, m) `postprocess_masks` reads (`low_res_read`)."""
        return low_res_read(low_hw, input_size, self.target_length)


class ResizeSquare:
    """SAM 2's image transform: resize the image to `target_length` squared without keeping its aspect
    ratio (bilinear with antialiasing on the [0, 1] float image, as torchvision's `Resize` on a tensor),
    normalise with ImageNet mean / std, no padding; prompt coordinates scale by S / W and S / H; mask
    logits go back by one bilinear resize to the original size (Meta's `SAM2Transforms`).

    `logits_limit`: Meta's `SAM2ImagePredictor` returns its low-resolution logits clamped to +-32 (the
    full-size masks come from the unclamped ones).
    """

    logits_limit = 32.0

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return self.target_length, self.target_length

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> the encoder's input (1, 3, S, S) float32."""
        x = torch.tensor(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0  # a copy: the array may be read-only
        s = self.target_length
        x = F.interpolate(x, (s, s), mode="bilinear", align_corners=False, antialias=True)
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) x, y in the original (H, W) image -> the S x S frame (float64)."""
        h, w = original_size
        return np.asarray(coords, dtype=np.float64) * np.array([self.target_length / w, self.target_length / h])

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        h, w = original_size
        factor = torch.tensor([self.target_length / w, self.target_length / h], device=coords.device)
        return coords.to(torch.float) * factor

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def postprocess_masks(self, low_res: torch.Tensor, input_size, original_size) -> torch.Tensor:
        """Low-res logits (..., m, m) -> float32 logits (..., H, W) at the original size."""
        x = low_res.float()
        lead = x.shape[:-2]
        x = F.interpolate(x.reshape(1, -1, *x.shape[-2:]), tuple(int(v) for v in original_size), mode="bilinear",
                          align_corners=False)
        return x.reshape(*lead, *x.shape[-2:])

    def low_res_read(self, low_hw, input_size) -> tuple[int, int]:
        """The low-res rows and columns `postprocess_masks` reads: all of them (nothing is padded)."""
        return int(low_hw[0]), int(low_hw[1])


def fill_holes_and_sprinkles(logits: torch.Tensor, max_hole_area: float, max_sprinkle_area: float,
                             threshold: float = 0.0, hole_value: float | None = None) -> torch.Tensor:
    """SAM 2's mask clean-up (Meta's `SAM2Transforms.postprocess_masks`) on logits (..., H, W).

    Regions are 8-connected components, found on the logits as given: background regions (logit <=
    threshold) of at most `max_hole_area` pixels become foreground (`hole_value`, default threshold + 10;
    SAM 2's video predictor uses 0.1), and foreground regions (logit > threshold) of at most
    `max_sprinkle_area` pixels become background (threshold - 10); a region touching the border counts
    as well. Both sets of regions come from the input, not from the result of the other step (as Meta
    computes them), so a speck around a filled hole is removed while the hole stays filled. Area 0 turns
    a step off. Needs scipy (Meta uses its own CUDA kernel and skips the step where that fails). Returns
    a new float32 tensor on the input's device.
    """
    try:
        from scipy import ndimage
    except ImportError:
        raise ImportError("filling holes and removing sprinkles needs scipy: pip install 'samhq[amg]'") from None
    src = logits.detach().float().cpu()
    out = src.clone()
    eight = np.ones((3, 3), bool)
    hole = threshold + 10.0 if hole_value is None else hole_value
    for step, area, value in (("holes", max_hole_area, hole), ("sprinkles", max_sprinkle_area, threshold - 10.0)):
        if area <= 0:
            continue
        for m, o in zip(src.reshape(-1, *src.shape[-2:]), out.view(-1, *out.shape[-2:])):
            region = (m <= threshold).numpy() if step == "holes" else (m > threshold).numpy()
            labels, n = ndimage.label(region, structure=eight)
            if n:
                sizes = np.bincount(labels.ravel(), minlength=n + 1)
                small = (labels > 0) & (sizes[labels] <= area)
                o[torch.from_numpy(small)] = value
    return out.to(logits.device)


class BatchFeature(dict):
    """The processor's output: a dict (so `model(**batch)` works) with attribute access and `.to()`."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device=None, dtype=None) -> "BatchFeature":
        """Move every tensor to `device`; `dtype` applies to floating-point tensors only."""
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                self[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        return self


def _is_batch(images) -> bool:
    if isinstance(images, (list, tuple)):
        return True
    return isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4


def _nested(x):
    return x.tolist() if isinstance(x, (np.ndarray, torch.Tensor)) else x


def _depth(x) -> int:
    d = 0
    while isinstance(x, (list, tuple)):
        if not x:
            raise ValueError("prompt lists must not be empty")
        x, d = x[0], d + 1
    return d


class SamHQImageProcessor:
    """Images to `pixel_values` (B, 3, S, S), segmentation maps to `labels`; masks back to full size.

    S is the model's input size (1024 for the released models). Images are converted to RGB by
    `samhq.image_io.to_rgb_array` (see there for every accepted kind), resized so the longest side
    is S (PIL bilinear), rescaled to [0, 1], normalised with ImageNet mean / std and zero-padded
    bottom / right. Segmentation maps are resized (nearest) so the longest side is S / 4 and
    padded with 0 to S / 4 x S / 4.
    """

    def __init__(self, image_size: int = 1024):
        self.size = {"longest_edge": image_size}
        self.pad_size = {"height": image_size, "width": image_size}
        self.mask_size = {"longest_edge": image_size // 4}
        self.mask_pad_size = {"height": image_size // 4, "width": image_size // 4}
        self.image_mean, self.image_std = list(IMAGENET_MEAN), list(IMAGENET_STD)

    def __call__(self, images, segmentation_maps=None, return_tensors="pt") -> BatchFeature:
        return self.preprocess(images, segmentation_maps, return_tensors)

    def preprocess(self, images, segmentation_maps=None, return_tensors="pt") -> BatchFeature:
        from .image_io import check_image_size, to_rgb_array

        s = self.size["longest_edge"]
        images = list(images) if _is_batch(images) else [images]
        if not images:
            raise ValueError("no images given")
        pixels, original, reshaped = [], [], []
        for image in images:
            rgb = to_rgb_array(image)
            check_image_size(rgb.shape[0], rgb.shape[1], s)
            resized = resize_rgb(rgb, s)
            original.append(rgb.shape[:2])
            reshaped.append(resized.shape[:2])
            pixels.append(normalize_and_pad(torch.from_numpy(resized).permute(2, 0, 1)[None], s)[0])
        data = {
            "pixel_values": torch.stack(pixels),
            "original_sizes": torch.tensor(original, dtype=torch.int64),
            "reshaped_input_sizes": torch.tensor(reshaped, dtype=torch.int64),
        }
        if segmentation_maps is not None:
            maps = list(segmentation_maps) if _is_batch(segmentation_maps) else [segmentation_maps]
            if len(maps) != len(images):
                raise ValueError(f"got {len(images)} images but {len(maps)} segmentation maps")
            data["labels"] = torch.stack([self._label(m, size) for m, size in zip(maps, original)])
        out = BatchFeature(data)
        return out if return_tensors == "pt" else BatchFeature({k: v.numpy() for k, v in out.items()})

    def _label(self, seg, image_size) -> torch.Tensor:
        arr = np.asarray(seg.convert("I") if isinstance(seg, Image.Image)
                         else _nested(seg) if isinstance(seg, torch.Tensor) else seg)
        if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
            arr = arr.squeeze(0 if arr.shape[0] == 1 else -1)
        if arr.ndim != 2:
            raise ValueError(f"a segmentation map must be (H, W), got shape {arr.shape}")
        if tuple(arr.shape) != tuple(image_size):
            raise ValueError(f"segmentation map is {arr.shape[1]}x{arr.shape[0]} "
                             f"but its image is {image_size[1]}x{image_size[0]}")
        m = self.mask_size["longest_edge"]
        h, w = preprocess_shape(arr.shape[0], arr.shape[1], m)
        small = np.asarray(Image.fromarray(arr.astype(np.int32)).resize((w, h), Image.NEAREST)).astype(np.int64)
        out = np.zeros((self.mask_pad_size["height"], self.mask_pad_size["width"]), np.int64)
        out[:h, :w] = small
        return torch.from_numpy(out)

    def post_process_masks(self, masks, original_sizes, reshaped_input_sizes, mask_threshold=0.0, binarize=True,
                           pad_size=None) -> list[torch.Tensor]:
        """Low-res logits per image (..., h, w) -> masks (..., H, W) at each original size.

        masks: a list (one entry per image) or a batched tensor; sizes (B, 2) as returned by the
        processor. Returns a list of bool masks (or float logits when `binarize=False`).
        """
        pad = self.pad_size if pad_size is None else pad_size
        pad = (pad["height"], pad["width"]) if isinstance(pad, dict) else pad
        original_sizes, reshaped_input_sizes = _nested(original_sizes), _nested(reshaped_input_sizes)
        if len(masks) != len(original_sizes) or len(original_sizes) != len(reshaped_input_sizes):
            raise ValueError(f"got masks for {len(masks)} images but {len(original_sizes)} original sizes "
                             f"and {len(reshaped_input_sizes)} reshaped sizes")
        out = []
        for m, original, reshaped in zip(masks, original_sizes, reshaped_input_sizes):
            m = torch.as_tensor(m)
            full = upscale_logits(m, reshaped, original, pad)
            out.append(full > mask_threshold if binarize else full)
        return out


class SamHQProcessor:
    """transformers' `SamHQProcessor` call: images and prompts in, model inputs out.

        processor = SamHQProcessor()
        batch = processor(image, input_points=[[[450, 600]]], return_tensors="pt")
        out = model(**batch)
        masks = processor.image_processor.post_process_masks(out.pred_masks, batch["original_sizes"],
                                                             batch["reshaped_input_sizes"])

    Prompts are in original-image pixels and nested per image: points `[image][object][point][x, y]`
    (or `[image][point][x, y]` for one object), labels `[image][object][point]` (default: all 1),
    boxes `[image][box][x0, y0, x1, y1]`. They are scaled to the resized frame. Objects with fewer
    points are padded with `point_pad_value` (coordinates and label), which the model ignores.
    """

    def __init__(self, image_processor: SamHQImageProcessor | None = None, point_pad_value: int = -10):
        self.image_processor = image_processor or SamHQImageProcessor()
        self.point_pad_value = point_pad_value

    @property
    def target_size(self) -> int:
        return self.image_processor.size["longest_edge"]

    @classmethod
    def for_model(cls, model) -> "SamHQProcessor":
        """A processor for a model's input size (`config.vision_config.image_size`)."""
        return cls(SamHQImageProcessor(model.config.vision_config.image_size))

    @classmethod
    def from_pretrained(cls, source, **kwargs) -> "SamHQProcessor":
        """A processor for a checkpoint (anything `SamHQModel.from_pretrained` takes), sized from its config."""
        from .checkpoints import infer_config, read_checkpoint, resolve_source
        from .config import SamHQConfig

        path = resolve_source(source)
        if path.is_dir() and (path / "config.json").exists():
            config = SamHQConfig.from_json_file(path / "config.json")
        else:
            state, config, _ = read_checkpoint(path)
            config = config or infer_config(state, str(path))
        return cls(SamHQImageProcessor(config.vision_config.image_size), **kwargs)

    def __call__(self, images=None, segmentation_maps=None, input_points=None, input_labels=None, input_boxes=None,
                 point_pad_value=None, return_tensors="pt") -> BatchFeature:
        if images is None:
            raise ValueError("images are required")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        batch = self.image_processor(images, segmentation_maps, return_tensors="pt")
        sizes = batch["original_sizes"].tolist()
        pad = self.point_pad_value if point_pad_value is None else point_pad_value
        if input_points is not None:
            batch["input_points"], batch["input_labels"] = self._points(input_points, input_labels, sizes, pad)
        elif input_labels is not None:
            raise ValueError("input_labels were given without input_points")
        if input_boxes is not None:
            batch["input_boxes"] = self._boxes(input_boxes, sizes)
        check_prompts(batch.get("input_points"), batch.get("input_labels"), batch.get("input_boxes"))
        return batch if return_tensors == "pt" else BatchFeature({k: v.numpy() for k, v in batch.items()})

    def post_process_masks(self, *args, **kwargs):
        return self.image_processor.post_process_masks(*args, **kwargs)

    def _points(self, points, labels, sizes, pad):
        points = _nested(points)
        if not isinstance(points, (list, tuple)) or len(points) != len(sizes):
            raise ValueError(f"input_points must be nested per image: {len(sizes)} image(s), "
                             f"got {len(points) if isinstance(points, (list, tuple)) else type(points).__name__}")
        depth = _depth(points)
        if depth not in (3, 4):
            raise ValueError("input_points must be nested [image][object][point][x, y] or [image][point][x, y]")
        if depth == 3:
            points = [[obj] for obj in points]
        labels = _nested(labels)
        if labels is None:
            labels = [[[1] * len(obj) for obj in img] for img in points]
        elif not isinstance(labels, (list, tuple)) or _depth(labels) != depth - 1:
            raise ValueError("input_labels must be nested like input_points without the x, y level")
        elif depth == 3:
            labels = [[obj] for obj in labels]
        counts = {len(img) for img in points}
        if len(counts) > 1:
            raise ValueError(f"every image needs the same number of point prompts, got {sorted(counts)}")
        n = max(len(obj) for img in points for obj in img)
        out_p, out_l = [], []
        for i, (img_pts, img_lab, size) in enumerate(zip(points, labels, sizes)):
            if len(img_lab) != len(img_pts):
                raise ValueError(f"image {i}: {len(img_pts)} point prompts but {len(img_lab)} label lists")
            rows_p, rows_l = [], []
            for j, (obj, lab) in enumerate(zip(img_pts, img_lab)):
                arr = np.asarray(obj, dtype=np.float64)
                if arr.ndim != 2 or arr.shape[1] != 2:
                    raise ValueError(f"image {i}, prompt {j}: points must be [x, y] pairs, got shape {arr.shape}")
                if len(lab) != len(arr):
                    raise ValueError(f"image {i}, prompt {j}: {len(arr)} points but {len(lab)} labels")
                arr = scale_coords(arr, size, self.target_size)
                rows_p.append(np.concatenate([arr, np.full((n - len(arr), 2), float(pad))]))
                rows_l.append(list(lab) + [pad] * (n - len(arr)))
            out_p.append(rows_p)
            out_l.append(rows_l)
        return torch.tensor(np.array(out_p), dtype=torch.float32), torch.tensor(out_l, dtype=torch.int64)

    def _boxes(self, boxes, sizes):
        boxes = _nested(boxes)
        if not isinstance(boxes, (list, tuple)) or len(boxes) != len(sizes) or _depth(boxes) != 3:
            raise ValueError(f"input_boxes must be nested [image][box][x0, y0, x1, y1] for {len(sizes)} image(s)")
        counts = {len(img) for img in boxes}
        if len(counts) > 1:
            raise ValueError(f"every image needs the same number of boxes, got {sorted(counts)}")
        out = []
        for i, (img, size) in enumerate(zip(boxes, sizes)):
            arr = np.asarray(img, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[1] != 4:
                raise ValueError(f"image {i}: boxes must be [x0, y0, x1, y1], got shape {arr.shape}")
            out.append(scale_coords(arr.reshape(-1, 2, 2), size, self.target_size).reshape(-1, 4))
        return torch.tensor(np.array(out), dtype=torch.float32)
