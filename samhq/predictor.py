"""`SamHQPredictor`: embed an image once, then answer many prompts, as the official `SamPredictor`.

    predictor = SamHQPredictor.from_pretrained("sam_hq_vit_b.pth")
    predictor.set_image(image)                       # (H, W, 3) uint8 RGB, PIL image, path, ...
    masks, scores, logits = predictor.predict(point_coords=np.array([[500, 375]]), point_labels=np.array([1]))
    # masks (C, H, W) bool at the original size, scores (C,), logits (C, 256, 256) for a later mask_input

Results equal the official predictor's for the same weights: `multimask_output=True` returns the best
of SAM's three masks plus the HQ mask, `hq_token_only=True` the HQ mask alone.

This is the one front end of samhq: it owns image intake (`samhq.image_io`), resizing and
normalisation (the engine's `transform`), prompt checks and their conversion to the resized frame,
post-processing back to the original size, and embedding files. What runs the model is an engine
(`samhq.engines`): torch (`SamHQPredictor(model)`), onnxruntime (`SamHQPredictor.from_onnx(dir)`) or
OpenVINO (`SamHQPredictor.from_openvino(dir)`); engines only embed images and decode prompts. The
automatic generator, the evaluation and the server use this class's public methods.

The same class runs SAM 2.1 and HQ-SAM 2 models (`SamHQ2Model`) with the API of Meta's
`SAM2ImagePredictor`: the engine brings the family's resize (`ResizeSquare`) and output selection,
and `set_image_batch` / `predict_batch`, `normalize_coords`, batched prompts in `predict` and
`max_hole_area` / `max_sprinkle_area` work for both generations.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .engines import OnnxEngine, OpenVinoEngine, TorchEngine, model_fingerprint
from .image_io import check_image_size, to_rgb_array
from .limits import check_prompt_count
from .modeling.prompt_encoder import check_prompts
from .processing import fill_holes_and_sprinkles

EMBEDDING_FORMAT = "samhq-image-embedding/1"
_NAMES = {"points": "point_coords", "labels": "point_labels", "boxes": "boxes", "masks": "mask_input"}


@dataclass
class ImageEmbedding:
    """What `set_image` computes for one image, in a form that can be saved and loaded.

    tensors: the engine's saved image features ("features" (1, 256, h, w) and, for SAM-HQ's torch engine,
    "early_features" (1, h, w, C), the first global-attention layer's output the HQ branch fuses;
    for its ONNX-file engines "hq_features" (1, 32, 4h, 4w); for SAM 2 models, every engine,
    "high_res_s0" (1, 32, 4h, 4w) and "high_res_s1" (1, 64, 2h, 2w)); sizes are (H, W); `fingerprint`
    identifies the weights that made them (`engines.model_fingerprint`).
    """

    tensors: dict[str, torch.Tensor]
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    image_size: int
    fingerprint: str

    @property
    def features(self) -> torch.Tensor:
        return self.tensors["features"]

    def save(self, path, overwrite: bool = False) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        meta = {
            "format": EMBEDDING_FORMAT,
            "fingerprint": self.fingerprint,
            "image_size": str(self.image_size),
            "original_size": "{},{}".format(*self.original_size),
            "input_size": "{},{}".format(*self.input_size),
        }
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.tensors.items()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path) -> "ImageEmbedding":
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"image embedding file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if meta.get("format") != EMBEDDING_FORMAT or "features" not in tensors:
            raise ValueError(f"{path}: not a samhq image embedding (write one with SamHQPredictor.save_image_embedding)")
        try:
            return cls(
                tensors=tensors,
                original_size=tuple(int(v) for v in meta["original_size"].split(",")),
                input_size=tuple(int(v) for v in meta["input_size"].split(",")),
                image_size=int(meta["image_size"]),
                fingerprint=meta["fingerprint"],
            )
        except (KeyError, ValueError):
            raise ValueError(f"{path}: image embedding metadata is damaged: {meta}") from None


def embedding_bytes(value) -> int:
    """Memory held by an `ImageEmbedding` (its tensors), or by any object with an `nbytes` attribute."""
    if isinstance(value, ImageEmbedding):
        return sum(t.numel() * t.element_size() for t in value.tensors.values())
    return int(getattr(value, "nbytes", 0))


class EmbeddingCache:
    """The one in-memory cache of image embeddings: least recently used dropped first, keyed by the caller.

    max_items: the most entries kept; max_bytes: the most memory (`embedding_bytes` of the entries);
    None for no bound (both None: unbounded). The newest entry is always kept, even when it alone
    exceeds max_bytes. Values are `ImageEmbedding`s, or objects with an `nbytes` attribute (what a
    caller keeps per image, e.g. the server's tiled images). `get` and `put` mark an entry as used.
    Not thread-safe: callers that share one hold their own lock.
    """

    def __init__(self, max_items: int | None = None, max_bytes: int | None = None) -> None:
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_items, self.max_bytes = max_items, max_bytes
        self.items: OrderedDict = OrderedDict()
        self.nbytes = 0

    def __contains__(self, key) -> bool:
        return key in self.items

    def __len__(self) -> int:
        return len(self.items)

    def get(self, key, default=None):
        """The entry for key (marked as just used), or default."""
        if key not in self.items:
            return default
        self.items.move_to_end(key)
        return self.items[key]

    def put(self, key, value) -> None:
        """Keep value under key (replacing any), then drop least recently used entries beyond the bounds."""
        self.pop(key)
        self.items[key] = value
        self.nbytes += embedding_bytes(value)
        while len(self.items) > 1 and ((self.max_items is not None and len(self.items) > self.max_items)
                                       or (self.max_bytes is not None and self.nbytes > self.max_bytes)):
            _, old = self.items.popitem(last=False)
            self.nbytes -= embedding_bytes(old)

    def pop(self, key, default=None):
        if key not in self.items:
            return default
        value = self.items.pop(key)
        self.nbytes -= embedding_bytes(value)
        return value

    def clear(self) -> None:
        self.items.clear()
        self.nbytes = 0


def _as_array(x, name: str, dtype=np.float64) -> np.ndarray:
    try:
        arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=dtype)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric, got {type(x).__name__}") from None
    return arr


def _as_tensor(x, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    if x is None or isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(_as_array(x, name)).to(dtype)


def check_prompt_batch(points=None, labels=None, boxes=None, masks=None, mask_size: int = 256):
    """The predictor's check of B prompts in `predict_torch`'s layout (point_coords (B, N, 2), point_labels
    (B, N), boxes (B, 4), mask_input (B, 1, m, m); tensors or arrays), in any one pixel frame.

    Returns them as tensors (float32 points, boxes and masks, int32 labels; boxes as (B, 4)). Raises
    ValueError for malformed prompts (one line each) and `samhq.limits.LimitError` over `max_prompts`.
    """
    points, boxes, masks = (_as_tensor(t, n, torch.float) for t, n in
                            ((points, "point_coords"), (boxes, "boxes"), (masks, "mask_input")))
    labels = _as_tensor(labels, "point_labels", torch.int)
    sizes = []
    if points is not None:
        if labels is None:
            raise ValueError("point_labels are required with point_coords: 1 for foreground, 0 for background")
        if points.ndim != 3 or points.shape[-1] != 2:
            raise ValueError(f"point_coords must be (B, N, 2), got {tuple(points.shape)}")
        if tuple(labels.shape) != tuple(points.shape[:2]):
            raise ValueError(f"point_labels {tuple(labels.shape)} must be (B, N) to match point_coords {tuple(points.shape)}")
        sizes.append(points.shape[0])
    elif labels is not None:
        raise ValueError("point_labels were given without point_coords")
    if boxes is not None:
        if boxes.shape[-1] != 4 or boxes.ndim not in (1, 2, 3) or (boxes.ndim == 3 and boxes.shape[1] != 1):
            raise ValueError(f"boxes must be (B, 4), got {tuple(boxes.shape)}")
        boxes = boxes.reshape(-1, 4)
        sizes.append(boxes.shape[0])
    if masks is not None:
        if masks.ndim != 4 or tuple(masks.shape[1:]) != (1, mask_size, mask_size):
            raise ValueError(f"mask_input must be (B, 1, {mask_size}, {mask_size}) low-res logits, got {tuple(masks.shape)}")
        sizes.append(masks.shape[0])
    if not sizes:
        raise ValueError("give a prompt: point_coords with point_labels, boxes, or mask_input")
    if len(set(sizes)) > 1:
        raise ValueError(f"prompt batch sizes disagree (points, boxes, masks): {sizes}")
    check_prompt_count(0 if points is None else points.shape[0] * points.shape[1], 0 if boxes is None else len(boxes))
    check_prompts(None if points is None else points[None], None if labels is None else labels[None],
                  None if boxes is None else boxes[None], masks, mask_size, _NAMES)
    return points, labels, boxes, masks


def one_prompt(point_coords=None, point_labels=None, box=None, batched: bool = False):
    """`predict`'s prompt (point_coords (N, 2), point_labels (N,), box (4,); arrays, lists or tensors) as
    float64 arrays, checked for shape: (points (N, 2) or None, labels (N,) or None, box (4,) or None).
    batched=True also takes B prompts, point_coords (B, N, 2) with point_labels (B, N) and boxes (B, 4),
    and returns points (B, N, 2), labels (B, N), boxes (B, 4) (B = 1 for one prompt). Values (finite,
    labels, box corners) are checked by `check_prompt_batch` afterwards. Raises ValueError."""
    pts = lab = b = None
    if point_coords is not None:
        pts = _as_array(point_coords, "point_coords")
        dims = (2, 3) if batched else (2,)
        if pts.ndim not in dims or pts.shape[-1] != 2 or pts.size == 0:
            more = " (or (B, N, 2) for B prompts)" if batched else ""
            raise ValueError(f"point_coords must be an (N, 2) array of x, y with N >= 1{more}, got shape {pts.shape}")
        if point_labels is None:
            raise ValueError("point_labels are required with point_coords: 1 for foreground, 0 for background")
        lab = _as_array(point_labels, "point_labels")
        if lab.size != pts.size // 2:
            raise ValueError(f"got {pts.size // 2} points but {lab.size} labels; give one label (1 or 0) per point")
        if batched:
            pts = pts.reshape(-1, *pts.shape[-2:])
            lab = lab.reshape(pts.shape[:2])
        else:
            lab = lab.reshape(-1)
    elif point_labels is not None:
        raise ValueError("point_labels were given without point_coords")
    if box is not None:
        b = _as_array(box, "box")
        if not batched and b.size != 4:
            raise ValueError(f"box must be 4 numbers x0, y0, x1, y1, got shape {b.shape}; use predict_torch for many boxes")
        if batched and (b.size == 0 or b.size % 4 or (b.ndim > 1 and b.shape[-1] != 4)):
            raise ValueError(f"box must be 4 numbers x0, y0, x1, y1 (or (B, 4) for B boxes), got shape {b.shape}")
        b = b.reshape(-1, 4) if batched else b.reshape(4)
    return pts, lab, b


class SamHQPredictor:
    """Embed an image once with `set_image`, then `predict` masks for any number of prompts.

    model: a `SamHQModel` or `SamHQ2Model` (the torch engine), or an engine from `samhq.engines`.
    `engine="onnxruntime"` / `engine="openvino"` exports the model to ONNX and runs it with that runtime
    (f32; for other options make the engine: `OpenVinoEngine.from_model(model, precision="bf16")`).
    mask_threshold: the logit above which a pixel is in the mask (0.0). max_hole_area / max_sprinkle_area:
    SAM 2's post-processing (`SAM2ImagePredictor`'s options, for either generation here): before the
    low-res logits are upscaled, background regions of at most that many low-res pixels inside or beside a
    mask are filled and foreground specks of at most that many are removed (8-connected; 0 = off;
    `samhq.processing.fill_holes_and_sprinkles`, needs scipy). The returned low-res logits are not
    changed by it. Attributes after `set_image`: `original_size` and `input_size` (H, W), `features`
    (1, 256, h, w), `hq_features` (1, 32, 4h, 4w) or None (SAM-HQ v1's torch engine), `interm_features`.
    """

    def __init__(self, model, engine: str = "torch", mask_threshold: float = 0.0, max_hole_area: float = 0.0,
                 max_sprinkle_area: float = 0.0) -> None:
        engines = {"onnxruntime": OnnxEngine, "openvino": OpenVinoEngine}
        if engine not in ("torch", *engines):
            raise ValueError(f"engine must be 'torch', 'onnxruntime' or 'openvino', got {engine!r}")
        if hasattr(model, "embed") and hasattr(model, "decode"):
            self.engine = model
        elif engine in engines:
            self.engine = engines[engine].from_model(model)
        else:
            self.engine = TorchEngine(model)
        if max_hole_area < 0 or max_sprinkle_area < 0:
            raise ValueError(f"max_hole_area and max_sprinkle_area must be >= 0 (0 = off), got {max_hole_area} "
                             f"and {max_sprinkle_area}")
        self.mask_threshold = float(mask_threshold)
        self.max_hole_area = max_hole_area
        self.max_sprinkle_area = max_sprinkle_area
        self.transform = self.engine.transform
        self.selection = self.engine.selection  # the family's official predictor (see samhq.modeling.mask_selection)
        self.family = self.engine.family  # "sam" (SAM-HQ, SAM) or "sam2" (HQ-SAM 2, SAM 2.1)
        self.image_size = self.engine.image_size
        self.mask_size = self.engine.mask_size
        self.reset_image()

    @classmethod
    def from_pretrained(cls, source, device=None, dtype=None, strict_hq: bool = False, low_memory: bool = False,
                        **kwargs) -> "SamHQPredictor":
        """A predictor over `samhq.load_model(source, device=..., dtype=..., strict_hq=..., low_memory=...)`: a
        checkpoint of either generation (SAM-HQ / SAM, HQ-SAM 2 / SAM 2.1); dtype is the encoder's. Other keyword
        arguments go to the constructor (engine, mask_threshold, max_hole_area, max_sprinkle_area)."""
        from .modeling.auto import load_model

        return cls(load_model(source, device=device, dtype=dtype, strict_hq=strict_hq, low_memory=low_memory), **kwargs)

    @classmethod
    def from_onnx(cls, onnx_dir, threads: int | None = None, providers=None) -> "SamHQPredictor":
        """A predictor over models written by `samhq export onnx SRC onnx_dir`, run with onnxruntime."""
        return cls(OnnxEngine(onnx_dir, threads=threads, providers=providers))

    @classmethod
    def from_openvino(cls, onnx_dir, threads: int | None = None, precision: str = "f32") -> "SamHQPredictor":
        """A predictor over models written by `samhq export onnx SRC onnx_dir`, run with OpenVINO on the CPU.
        precision: "f32" (default, exact) or "bf16" (OpenVINO's inference precision hint; used where the CPU
        has BF16 units, else f32: see `predictor.engine.inference_precision`). Needs `pip install 'samhq[openvino]'`."""
        return cls(OpenVinoEngine(onnx_dir, threads=threads, precision=precision))

    @property
    def model(self):
        """The torch `SamHQModel` (None for an ONNX-file engine loaded from files)."""
        return self.engine.model

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def reset_image(self) -> None:
        """Forget the current image (or batch of images)."""
        self._clear_current()
        self._batch: list[tuple[dict, tuple[int, int], tuple[int, int]]] = []

    reset_predictor = reset_image  # SAM2ImagePredictor's name

    def _clear_current(self) -> None:
        self.is_image_set = False
        self._features: dict[str, torch.Tensor] = {}
        self.original_size = None
        self.input_size = None

    @property
    def batch_size(self) -> int:
        """How many images `set_image_batch` embedded (0 when none, e.g. after `set_image`)."""
        return len(self._batch)

    # The official predictor's attributes; assigning `features` (as some segment_anything code does)
    # drops what the engine derived from the old one.
    @property
    def features(self) -> torch.Tensor | None:
        return self._features.get("features")

    @features.setter
    def features(self, value: torch.Tensor) -> None:
        self._features = {k: v for k, v in self._features.items() if k in self.engine.saved_features}
        self._features["features"] = value

    @property
    def hq_features(self) -> torch.Tensor | None:
        if self.is_image_set:
            self.engine.prepare(self._features)
        return self._features.get("hq_features")

    @hq_features.setter
    def hq_features(self, value: torch.Tensor) -> None:
        self._features["hq_features"] = value

    @property
    def interm_features(self) -> list[torch.Tensor] | None:
        early = self._features.get("early_features")
        return None if early is None else [early]

    # ------------------------------------------------------------------ images

    def set_image(self, image, image_format: str = "RGB", bit_depth: str = "dtype") -> None:
        """Embed one image: (H, W, 3) uint8 array, or anything `samhq.image_io.to_rgb_array` accepts.

        `image_format` ("RGB" or "BGR", e.g. from OpenCV) is the channel order of an array or tensor;
        a file or PIL image is decoded as RGB, and "BGR" with one is a ValueError. `bit_depth` ("dtype",
        "minmax", "percentile") says how images with more than 8 bits become 8 (`samhq.image_io`).
        """
        rgb = to_rgb_array(image, image_format=image_format, bit_depth=bit_depth)
        check_image_size(rgb.shape[0], rgb.shape[1], self.image_size)
        self.reset_image()
        with torch.no_grad():
            features = self.engine.embed(self.transform.preprocess(rgb).to(self.device))
        self._set(features, rgb.shape[:2], self.transform.input_size(rgb.shape[:2]))

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, int]) -> None:
        """Embed an image already resized with `transform.apply_image`: (1, 3, h, w), values 0..255, long side =
        image size (SAM's API; SAM 2 models take `set_image`)."""
        if not hasattr(self.transform, "pixel_values"):
            raise ValueError("set_torch_image is SAM's API for images resized by transform.apply_image; "
                             "give this SAM 2 model the image itself with set_image")
        s = self.image_size
        if transformed_image.ndim != 4 or transformed_image.shape[:2] != (1, 3) or max(transformed_image.shape[2:]) != s:
            raise ValueError(
                f"set_torch_image expects (1, 3, h, w) with long side {s}, got {tuple(transformed_image.shape)}; "
                "resize it with predictor.transform.apply_image first"
            )
        self.reset_image()
        features = self.engine.embed(self.transform.pixel_values(transformed_image))
        self._set(features, tuple(original_image_size), tuple(transformed_image.shape[-2:]))

    def set_image_batch(self, images, image_format: str = "RGB") -> None:
        """Embed several images for `predict_batch` (Meta's `SAM2ImagePredictor.set_image_batch`).

        images: a list of anything `set_image` takes, each of its own size. The images are embedded one
        after another (the peak memory of one image); `predict` needs `set_image` afterwards.
        """
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("set_image_batch takes a non-empty list of images")
        self.reset_image()
        batch = []
        for image in images:
            rgb = to_rgb_array(image, image_format=image_format)
            check_image_size(rgb.shape[0], rgb.shape[1], self.image_size)
            with torch.no_grad():
                features = self.engine.embed(self.transform.preprocess(rgb).to(self.device))
            batch.append((features, tuple(int(v) for v in rgb.shape[:2]), self.transform.input_size(rgb.shape[:2])))
        self._batch = batch

    def predict_batch(
        self,
        point_coords_batch=None,
        point_labels_batch=None,
        box_batch=None,
        mask_input_batch=None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
        hq_token_only: bool = False,
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """`predict` for each image of `set_image_batch` (Meta's `SAM2ImagePredictor.predict_batch`).

        Each `*_batch` is None or a list with one entry per image (an entry may be None), each entry what
        `predict` takes for that image (one prompt, or a batch of them). Returns three lists, one item per
        image: masks, scores and low-res logits as `predict` returns them.
        """
        if not self._batch:
            raise RuntimeError("no image batch is set: call predictor.set_image_batch(images) first")
        n = len(self._batch)
        lists = []
        for name, value in (("point_coords_batch", point_coords_batch), ("point_labels_batch", point_labels_batch),
                            ("box_batch", box_batch), ("mask_input_batch", mask_input_batch)):
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != n):
                raise ValueError(f"{name} must be a list with one entry per image ({n}), got "
                                 f"{len(value) if isinstance(value, (list, tuple)) else type(value).__name__}")
            lists.append(value if value is not None else [None] * n)
        batch, out = self._batch, ([], [], [])
        try:
            for i, ((features, original, input_size), *prompt) in enumerate(zip(batch, *lists)):
                self._set(features, original, input_size)
                try:
                    result = self.predict(*prompt, multimask_output=multimask_output, return_logits=return_logits,
                                          normalize_coords=normalize_coords, hq_token_only=hq_token_only)
                except ValueError as e:
                    raise ValueError(f"image {i}: {e}") from None
                for lst, r in zip(out, result):
                    lst.append(r)
        finally:
            self._clear_current()
        return out

    def _set(self, features: dict, original_size, input_size) -> None:
        self._features = features
        self.original_size = tuple(int(v) for v in original_size)
        self.input_size = tuple(int(v) for v in input_size)
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's embedding, (1, 256, h, w)."""
        self._require_image()
        return self.features

    def _require_image(self) -> None:
        if not self.is_image_set:
            if self._batch:
                raise RuntimeError("a batch of images is set (set_image_batch): use predict_batch, or set_image for one image")
            raise RuntimeError("no image is set: call predictor.set_image(image) (or load_image_embedding) first")

    # ------------------------------------------------------------------ saved embeddings

    def export_image_embedding(self) -> ImageEmbedding:
        """The current image's embedding as an `ImageEmbedding` (kept in memory, or `.save(path)`)."""
        self._require_image()
        tensors = {k: v for k, v in self._features.items() if k in self.engine.saved_features}
        return ImageEmbedding(tensors, self.original_size, self.input_size, self.image_size, self.engine.fingerprint())

    def save_image_embedding(self, path, overwrite: bool = False) -> Path:
        """Write the current image's embedding to a safetensors file (refuses to overwrite unless asked)."""
        return self.export_image_embedding().save(path, overwrite=overwrite)

    @torch.no_grad()
    def set_image_embedding(self, embedding: ImageEmbedding, original_size: tuple[int, int] | None = None) -> None:
        """Use a saved embedding instead of `set_image`.

        Refused (ValueError) when it was made by other weights or another engine kind, for another model
        image size, or, when `original_size` (H, W) is given, for an image of another size.
        """
        mine = self.engine.fingerprint()
        if embedding.fingerprint != mine:
            raise ValueError(
                f"the image embedding was made by another model (encoder fingerprint {embedding.fingerprint}, "
                f"this model {mine}); embed the image again with this model"
            )
        if embedding.image_size != self.image_size:
            raise ValueError(
                f"the image embedding is for {embedding.image_size}-pixel model inputs, this model uses {self.image_size}"
            )
        if original_size is not None and tuple(original_size) != tuple(embedding.original_size):
            raise ValueError(
                "the image embedding was made for a {}x{} (HxW) image, not {}x{}".format(*embedding.original_size, *original_size)
            )
        grid = self.mask_size // 4
        shape = tuple(embedding.features.shape)
        if len(shape) != 4 or shape[0] != 1 or shape[2:] != (grid, grid):
            raise ValueError(f"image embedding features have shape {shape}, this model needs (1, C, {grid}, {grid})")
        features = self.engine.load_features(embedding.tensors)
        self.reset_image()
        self._set(features, embedding.original_size, embedding.input_size)

    def load_image_embedding(self, path, original_size: tuple[int, int] | None = None) -> None:
        """`set_image_embedding` from a file written by `save_image_embedding`."""
        self.set_image_embedding(ImageEmbedding.load(path), original_size)

    # ------------------------------------------------------------------ prompts

    def predict(
        self,
        point_coords=None,
        point_labels=None,
        box=None,
        mask_input=None,
        multimask_output: bool = True,
        return_logits: bool = False,
        hq_token_only: bool = False,
        normalize_coords: bool = True,
        return_low_res: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Masks for one prompt (or a batch of B prompts), in original-image coordinates.

        point_coords (N, 2) x, y; point_labels (N,) 1 foreground / 0 background; box (4,) x0, y0, x1, y1;
        mask_input (1, 256, 256) low-res logits from a previous call. As in Meta's `SAM2ImagePredictor`,
        B prompts at once are point_coords (B, N, 2) with point_labels (B, N), boxes (B, 4), mask_input
        (B, 1, 256, 256). normalize_coords=True (default): coordinates are pixels of the original image;
        False: they are relative, x / W and y / H in [0, 1] (SAM 2's meaning). Returns masks (C, H, W)
        (bool, or float logits with `return_logits`), scores (C,) and low-res logits (C, 256, 256), with a
        leading B for B > 1 prompts; C = 3 with multimask_output for plain SAM and the SAM 2 family, else
        1 (SAM-HQ's official predictor returns its best mask). SAM 2 models return low-res logits clamped
        to +-32, as Meta's predictor. return_low_res=False returns None for the low-res logits, and the masks and
        scores come sooner (`predict_torch`). Raises ValueError for malformed prompts.
        """
        self._require_image()
        if point_coords is None and box is None and mask_input is None:
            raise ValueError("give a prompt: point_coords with point_labels, a box, or a mask_input")
        h, w = self.original_size
        scale = np.array([1.0, 1.0]) if normalize_coords else np.array([w, h], dtype=np.float64)
        coords = labels = boxes = masks = None
        pts, lab, b = one_prompt(point_coords, point_labels, box, batched=True)
        if pts is not None:
            coords = torch.as_tensor(self.transform.apply_coords(pts * scale, self.original_size), dtype=torch.float)
            labels = torch.as_tensor(lab, dtype=torch.int)
        if b is not None:
            boxes = torch.as_tensor(self.transform.apply_boxes(b * np.tile(scale, 2), self.original_size), dtype=torch.float)
        if mask_input is not None:
            m, size = _as_array(mask_input, "mask_input", np.float32), self.mask_size
            if m.shape[-2:] != (size, size) or m.ndim not in (2, 3, 4) or (m.ndim >= 3 and m.shape[-3] != 1):
                raise ValueError(f"mask_input must be (1, {size}, {size}) low-res logits (as returned by predict; "
                                 f"(B, 1, {size}, {size}) for B prompts), got shape {m.shape}")
            masks = torch.as_tensor(m).reshape(-1, 1, size, size)
        out = self.predict_torch(*(None if t is None else t.to(self.device) for t in (coords, labels, boxes, masks)),
                                 multimask_output=multimask_output, return_logits=return_logits, hq_token_only=hq_token_only,
                                 return_low_res=return_low_res)
        return tuple(None if t is None else (t[0] if len(t) == 1 else t).cpu().numpy() for t in out)

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        hq_token_only: bool = False,
        return_low_res: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Masks for B prompts at once, coordinates already in the resized frame (`transform.apply_coords_torch`).

        point_coords (B, N, 2), point_labels (B, N), boxes (B, 4), mask_input (B, 1, 256, 256); tensors or
        arrays. Returns masks (B, C, H, W) at the original size (bool, or logits with `return_logits`),
        scores (B, C) and low-res logits (B, C, 256, 256), float32 (clamped to +-32 for SAM 2 models, as Meta's
        `SAM2ImagePredictor._predict`).
        return_low_res=False: None in place of the low-res logits, for callers that want only the masks and
        scores (which are the same). The decoder then skips the rows and columns of the padded square that the
        masks never read (`decode(upscaled_only=True)`): for a 4:3 image a quarter of its upscaling and HQ branch,
        most of a prompt's time on a CPU.
        """
        low_res, scores = self.decode(point_coords, point_labels, boxes, mask_input, multimask_output, hq_token_only,
                                      upscaled_only=not return_low_res)
        full = self.upscale_masks(low_res)
        if not return_logits:
            full = full > self.mask_threshold
        if not return_low_res:
            return full, scores, None
        limit = getattr(self.transform, "logits_limit", None)  # SAM 2's predictor clamps the logits it returns
        return full, scores, low_res if limit is None else low_res.clamp(-limit, limit)

    @torch.no_grad()
    def decode(
        self,
        point_coords=None,
        point_labels=None,
        boxes=None,
        mask_input=None,
        multimask_output: bool = True,
        hq_token_only: bool = False,
        sam_token_only: bool = False,
        pred_iou_thresh: float | None = None,
        upscaled_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The low-resolution half of `predict_torch`: B prompts in the resized frame -> low-res logits
        (B, C, 256, 256) float32 and scores (B, C), without upscaling (see `upscale_masks`).
        `sam_token_only` leaves the HQ mask out (SAM's own mask, for evaluation; torch engine only).
        `pred_iou_thresh` (the automatic generator's filter): a prompt none of whose scores exceeds it may come
        back with NaN logits instead of computed ones (the torch engine skips their upscaling and HQ branch, most
        of a prompt's cost on a CPU; the ONNX engines compute them); its scores are always computed.
        `upscaled_only`: the caller reads the logits only through `upscale_masks`, so the rows and columns of the
        padded frame that it never reads (`transform.low_res_read`: the bottom quarter for a 4:3 landscape image, the
        right quarter for a 3:4 portrait one) may come back NaN instead of computed (torch engine, SAM-HQ models, no
        hole or sprinkle removal).
        Raises ValueError for malformed prompts.
        """
        self._require_image()
        points, labels, boxes, masks = self._check_batch(point_coords, point_labels, boxes, mask_input)
        extent = None
        if upscaled_only and self.max_hole_area <= 0 and self.max_sprinkle_area <= 0:  # hole removal reads every pixel
            low = self.image_size // 4
            extent = self.transform.low_res_read((low, low), self.input_size)
        return self.engine.decode(self._features, points, labels, boxes, masks, multimask_output, hq_token_only,
                                  self.selection, sam_token_only, pred_iou_thresh, extent)

    def _check_batch(self, points, labels, boxes, masks):
        """B prompts in the resized frame (see `predict_torch`) as tensors on the device, checked once."""
        points, labels, boxes, masks = check_prompt_batch(points, labels, boxes, masks, self.mask_size)
        self._warn_outside(points, boxes)
        dev = self.device
        return tuple(None if t is None else t.to(dev) for t in (points, labels, boxes, masks))

    def _warn_outside(self, points, boxes) -> None:
        """Warn about a point outside the image or a box that misses it (SAM accepts both; a mistake is likely)."""
        h, w = self.input_size
        oh, ow = self.original_size
        if points is not None:
            p = points.reshape(-1, 2)
            out = (p[:, 0] < 0) | (p[:, 0] > w) | (p[:, 1] < 0) | (p[:, 1] > h)
            if out.any():
                x, y = (float(v) for v in p[int(out.nonzero()[0, 0])])
                warnings.warn(f"point ({x * ow / w:g}, {y * oh / h:g}) lies outside the {ow}x{oh} image; "
                              "SAM accepts it, but check the coordinates", stacklevel=4)
        if boxes is not None:
            miss = (boxes[:, 2] < 0) | (boxes[:, 0] > w) | (boxes[:, 3] < 0) | (boxes[:, 1] > h)
            if miss.any():
                x0, y0, x1, y1 = (float(v) for v in boxes[int(miss.nonzero()[0, 0])])
                warnings.warn(f"box ({x0 * ow / w:g}, {y0 * oh / h:g}, {x1 * ow / w:g}, {y1 * oh / h:g}) lies entirely "
                              f"outside the {ow}x{oh} image; check the coordinates", stacklevel=4)

    def upscale_masks(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """Low-res logits (..., m, m) -> float32 logits (..., H, W) at the current image's original size, after
        filling holes and removing sprinkles when `max_hole_area` / `max_sprinkle_area` are set."""
        self._require_image()
        if self.max_hole_area > 0 or self.max_sprinkle_area > 0:
            low_res_logits = fill_holes_and_sprinkles(low_res_logits, self.max_hole_area, self.max_sprinkle_area,
                                                      self.mask_threshold)
        return self.transform.postprocess_masks(low_res_logits, self.input_size, self.original_size)


class OnnxPredictor(SamHQPredictor):
    """`SamHQPredictor` over the onnxruntime engine: `OnnxPredictor(onnx_dir)` = `SamHQPredictor.from_onnx(onnx_dir)`."""

    def __init__(self, onnx_dir, threads: int | None = None, providers=None, model=None):
        super().__init__(OnnxEngine(onnx_dir, threads=threads, providers=providers, model=model))

    @classmethod
    def from_model(cls, model, onnx_dir=None, threads: int | None = None, providers=None) -> SamHQPredictor:
        """Export a torch model (to `onnx_dir`, or a temporary folder) and run it with onnxruntime."""
        return SamHQPredictor(OnnxEngine.from_model(model, onnx_dir, threads=threads, providers=providers))


__all__ = ["SamHQPredictor", "OnnxPredictor", "ImageEmbedding", "model_fingerprint", "check_prompt_batch", "one_prompt"]
