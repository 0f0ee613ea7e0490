"""`SamHQPredictor`: embed an image once, then answer many prompts, as the official `SamPredictor`.

    predictor = SamHQPredictor.from_pretrained("sam_hq_vit_b.pth")
    predictor.set_image(image)                       # (H, W, 3) uint8 RGB, PIL image, path, ...
    masks, scores, logits = predictor.predict(point_coords=np.array([[500, 375]]), point_labels=np.array([1]))
    # masks (C, H, W) bool at the original size, scores (C,), logits (C, 256, 256) for a later mask_input

Results equal the official predictor's for the same weights: `multimask_output=True` returns the best
of SAM's three masks plus the HQ mask, `hq_token_only=True` the HQ mask alone.

The per-image work (encoder, and the image-only half of the HQ branch) happens once in `set_image`;
each prompt only runs the prompt encoder and mask decoder. An embedding can be saved to a
safetensors file (`save_image_embedding`) and loaded later (`load_image_embedding`); the file
records which image encoder made it and for which image size, and is refused for any other.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .image_io import check_image_size, to_rgb_array
from .limits import check_prompts
from .modeling.mask_decoder import select_masks
from .processing import check_boxes, normalize_and_pad, preprocess_shape, resize_rgb, scale_coords, upscale_logits

EMBEDDING_FORMAT = "samhq-image-embedding/1"


class ResizeLongestSide:
    """Resize images and prompt coordinates so the longest side is `target_length` (SAM's transform)."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        return preprocess_shape(oldh, oldw, long_side_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) uint8, PIL bilinear."""
        return resize_rgb(np.ascontiguousarray(image), self.target_length)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float -> (B, C, h, w), antialiased bilinear (close to, not equal to, `apply_image`)."""
        size = preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return torch.nn.functional.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)

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


def model_fingerprint(model) -> str:
    """A short hash of the image encoder (its config and a sample of every weight).

    Only the encoder decides an image embedding, so a model whose decoder was fine-tuned on a frozen
    encoder (how SAM-HQ is trained) shares embeddings with its base. Weights are hashed at bfloat16
    precision so that fp32 and bf16 copies of a model agree.
    """
    h = hashlib.sha256(model.config.vision_config.to_json_string().encode())
    for name, t in model.vision_encoder.state_dict().items():
        flat = t.detach().flatten()
        flat = flat[:: max(1, flat.numel() // 256)][:256].cpu()
        if flat.is_floating_point():
            flat = flat.to(torch.bfloat16).view(torch.int16)
        h.update(name.encode())
        h.update(flat.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ImageEmbedding:
    """What `set_image` computes for one image, in a form that can be saved and loaded.

    features (1, 256, h, w); early_features (1, h, w, C): the first global-attention layer's output
    that the HQ branch fuses (None for plain SAM); sizes are (H, W).
    """

    features: torch.Tensor
    early_features: torch.Tensor | None
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    image_size: int
    fingerprint: str

    def save(self, path, overwrite: bool = False) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        tensors = {"features": self.features.detach().float().cpu().contiguous()}
        if self.early_features is not None:
            tensors["early_features"] = self.early_features.detach().float().cpu().contiguous()
        meta = {
            "format": EMBEDDING_FORMAT,
            "fingerprint": self.fingerprint,
            "image_size": str(self.image_size),
            "original_size": "{},{}".format(*self.original_size),
            "input_size": "{},{}".format(*self.input_size),
        }
        save_file(tensors, str(path), metadata=meta)
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
                features=tensors["features"],
                early_features=tensors.get("early_features"),
                original_size=tuple(int(v) for v in meta["original_size"].split(",")),
                input_size=tuple(int(v) for v in meta["input_size"].split(",")),
                image_size=int(meta["image_size"]),
                fingerprint=meta["fingerprint"],
            )
        except (KeyError, ValueError):
            raise ValueError(f"{path}: image embedding metadata is damaged: {meta}") from None


def _as_array(x, name: str, dtype=np.float64) -> np.ndarray:
    try:
        arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=dtype)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric, got {type(x).__name__}") from None
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return arr


def prompt_from_numpy(predictor, point_coords=None, point_labels=None, box=None, mask_input=None):
    """One prompt in original-image pixels (as `predict` takes it), checked and moved to the resized frame.

    Returns coords (1, N, 2), labels (1, N), box (1, 4), mask (1, 1, m, m) tensors, each None when not given.
    `predictor` gives transform, original_size, mask_size and device (the torch and onnxruntime engines).
    """
    if point_coords is None and box is None and mask_input is None:
        raise ValueError("give a prompt: point_coords with point_labels, a box, or a mask_input")
    coords = labels = boxes = masks = None
    if point_coords is not None:
        pts = _as_array(point_coords, "point_coords")
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
            raise ValueError(f"point_coords must be an (N, 2) array of x, y with N >= 1, got shape {pts.shape}")
        if point_labels is None:
            raise ValueError("point_labels are required with point_coords: 1 for foreground, 0 for background")
        lab = _as_array(point_labels, "point_labels").reshape(-1)
        if len(lab) != len(pts):
            raise ValueError(f"got {len(pts)} points but {len(lab)} labels; give one label (1 or 0) per point")
        if not np.isin(lab, (0, 1, -1)).all():
            raise ValueError(f"point labels must be 1 (foreground), 0 (background) or -1 (ignored), got {np.unique(lab).tolist()}")
        _warn_outside(pts, predictor.original_size)
        coords = predictor.transform.apply_coords(pts, predictor.original_size)
        coords = torch.as_tensor(coords, dtype=torch.float, device=predictor.device)[None]
        labels = torch.as_tensor(lab, dtype=torch.int, device=predictor.device)[None]
    elif point_labels is not None:
        raise ValueError("point_labels were given without point_coords")
    if box is not None:
        b = _as_array(box, "box")
        if b.size != 4:
            raise ValueError(f"box must be 4 numbers x0, y0, x1, y1, got shape {b.shape}; use predict_torch for many boxes")
        check_boxes(b)
        boxes = predictor.transform.apply_boxes(b, predictor.original_size)
        boxes = torch.as_tensor(boxes, dtype=torch.float, device=predictor.device)
    if mask_input is not None:
        m, size = _as_array(mask_input, "mask_input", np.float32), predictor.mask_size
        if m.shape not in ((1, size, size), (size, size)):
            raise ValueError(f"mask_input must be (1, {size}, {size}) low-res logits (as returned by predict), got shape {m.shape}")
        masks = torch.as_tensor(m, device=predictor.device).reshape(1, 1, size, size)
    return coords, labels, boxes, masks


def _warn_outside(pts: np.ndarray, original_size) -> None:
    h, w = original_size
    outside = (pts[:, 0] < 0) | (pts[:, 0] > w) | (pts[:, 1] < 0) | (pts[:, 1] > h)
    if outside.any():
        x, y = pts[np.flatnonzero(outside)[0]]
        warnings.warn(f"point ({x:g}, {y:g}) lies outside the {w}x{h} image; SAM accepts it, but check the coordinates",
                      stacklevel=4)


def check_torch_prompts(points, labels, boxes, masks, mask_size: int) -> int:
    """Validate batched prompts in the resized frame (see `SamHQPredictor.predict_torch`); returns the batch size B."""
    sizes = []
    if points is not None:
        if labels is None:
            raise ValueError("point_labels are required with point_coords: 1 for foreground, 0 for background")
        if points.ndim != 3 or points.shape[-1] != 2:
            raise ValueError(f"point_coords must be (B, N, 2), got {tuple(points.shape)}")
        if tuple(labels.shape) != tuple(points.shape[:2]):
            raise ValueError(f"point_labels {tuple(labels.shape)} must be (B, N) to match point_coords {tuple(points.shape)}")
        if not torch.isfinite(points).all():
            raise ValueError("point_coords contain NaN or infinite values")
        sizes.append(points.shape[0])
    if boxes is not None:
        if boxes.shape[-1] != 4 or boxes.ndim not in (1, 2, 3):
            raise ValueError(f"boxes must be (B, 4), got {tuple(boxes.shape)}")
        if not torch.isfinite(boxes).all():
            raise ValueError("boxes contain NaN or infinite values")
        check_boxes(boxes, "boxes")
        sizes.append(boxes.reshape(-1, 4).shape[0])
    if masks is not None:
        m = mask_size
        if masks.ndim != 4 or tuple(masks.shape[1:]) != (1, m, m):
            raise ValueError(f"mask_input must be (B, 1, {m}, {m}) low-res logits, got {tuple(masks.shape)}")
        sizes.append(masks.shape[0])
    if not sizes:
        raise ValueError("give a prompt: point_coords with point_labels, boxes, or mask_input")
    if len(set(sizes)) > 1:
        raise ValueError(f"prompt batch sizes disagree (points, boxes, masks): {sizes}")
    check_prompts(0 if points is None else points.shape[0] * points.shape[1], 0 if boxes is None else boxes.reshape(-1, 4).shape[0])
    return sizes[0]


class SamHQPredictor:
    """Embed an image once with `set_image`, then `predict` masks for any number of prompts.

    Attributes after `set_image`: `original_size` and `input_size` (H, W), `features` (1, 256, h, w),
    `interm_features` (list of (1, h, w, C)), `hq_features` (1, 32, 4h, 4w) or None for plain SAM.
    """

    mask_threshold = 0.0

    def __new__(cls, model=None, engine: str = "torch"):
        # engine="onnxruntime" exports the model to ONNX and returns the onnxruntime engine, which has this interface.
        if engine == "onnxruntime":
            from .export.ort import OnnxPredictor

            return OnnxPredictor.from_model(model)
        if engine != "torch":
            raise ValueError(f"engine must be 'torch' or 'onnxruntime', got {engine!r}")
        return super().__new__(cls)

    def __init__(self, model, engine: str = "torch") -> None:
        self.model = model
        self.image_size = model.config.vision_config.image_size
        self.mask_size = 4 * model.config.prompt_encoder_config.image_embedding_size
        self.transform = ResizeLongestSide(self.image_size)
        self.reset_image()

    @classmethod
    def from_pretrained(cls, source, device=None, dtype=None, **kwargs) -> "SamHQPredictor":
        """A predictor over `SamHQModel.from_pretrained(source, ...)`."""
        from .modeling.model import SamHQModel

        return cls(SamHQModel.from_pretrained(source, device=device, dtype=dtype, **kwargs))

    @staticmethod
    def from_onnx(onnx_dir, threads: int | None = None):
        """The onnxruntime engine over models written by `samhq export onnx SRC onnx_dir` (an `OnnxPredictor`)."""
        from .export.ort import OnnxPredictor

        return OnnxPredictor(onnx_dir, threads=threads)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image."""
        self.is_image_set = False
        self.features = None
        self.interm_features = None
        self.hq_features = None
        self.original_size = None
        self.input_size = None
        self._context = None

    # ------------------------------------------------------------------ images

    def set_image(self, image, image_format: str = "RGB") -> None:
        """Embed one image: (H, W, 3) uint8 array, or anything `samhq.image_io.to_rgb_array` accepts.

        `image_format` ("RGB" or "BGR", e.g. from OpenCV) is the channel order of an array or tensor;
        files and PIL images are always read as RGB.
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        is_array = isinstance(image, (np.ndarray, torch.Tensor))
        rgb = to_rgb_array(image)
        if image_format == "BGR" and is_array:
            rgb = np.ascontiguousarray(rgb[..., ::-1])
        check_image_size(rgb.shape[0], rgb.shape[1], self.image_size)
        resized = torch.as_tensor(self.transform.apply_image(rgb), device=self.device)
        self.set_torch_image(resized.permute(2, 0, 1)[None], rgb.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, int]) -> None:
        """Embed an image already resized with `transform`: (1, 3, h, w), values 0..255, long side = image size."""
        s = self.image_size
        if transformed_image.ndim != 4 or transformed_image.shape[:2] != (1, 3) or max(transformed_image.shape[2:]) != s:
            raise ValueError(
                f"set_torch_image expects (1, 3, h, w) with long side {s}, got {tuple(transformed_image.shape)}; "
                "resize it with predictor.transform.apply_image first"
            )
        self.reset_image()
        pixels = normalize_and_pad(transformed_image, s)
        features, interm = self.model.get_image_embeddings(pixels)
        self._set_features(features, interm, tuple(original_image_size), tuple(transformed_image.shape[-2:]))

    def _set_features(self, features, interm, original_size, input_size) -> None:
        self.features = features
        self.interm_features = interm
        self.hq_features = self.model.compute_hq_features(features, interm)
        self.original_size = tuple(int(v) for v in original_size)
        self.input_size = tuple(int(v) for v in input_size)
        self.is_image_set = True

    def decoder_context(self) -> dict:
        """The decoder's per-image work for this image (`SamHQModel.decoder_context`), made on first use."""
        self._require_image()
        if self._context is None or self._context[0] is not self.features:  # features may be assigned directly
            self._context = (self.features, self.model.decoder_context(self.features))
        return self._context[1]

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's embedding, (1, 256, h, w)."""
        self._require_image()
        return self.features

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("no image is set: call predictor.set_image(image) (or load_image_embedding) first")

    # ------------------------------------------------------------------ saved embeddings

    def export_image_embedding(self) -> ImageEmbedding:
        self._require_image()
        early = self.interm_features[0] if self.interm_features else None
        return ImageEmbedding(self.features, early, self.original_size, self.input_size, self.image_size,
                              model_fingerprint(self.model))

    def save_image_embedding(self, path, overwrite: bool = False) -> Path:
        """Write the current image's embedding to a safetensors file (refuses to overwrite unless asked)."""
        return self.export_image_embedding().save(path, overwrite=overwrite)

    @torch.no_grad()
    def set_image_embedding(self, embedding: ImageEmbedding, original_size: tuple[int, int] | None = None) -> None:
        """Use a saved embedding instead of `set_image`.

        Refused when it was made by another image encoder or for another model image size, or, when
        `original_size` (H, W) is given, for an image of another size.
        """
        mine = model_fingerprint(self.model)
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
        grid = self.model.config.prompt_encoder_config.image_embedding_size
        if tuple(embedding.features.shape) != (1, self.model.config.mask_decoder_config.hidden_size, grid, grid):
            raise ValueError(f"image embedding features have shape {tuple(embedding.features.shape)}, "
                             f"this model needs (1, {self.model.config.mask_decoder_config.hidden_size}, {grid}, {grid})")
        if self.model.hq_enabled and embedding.early_features is None:
            raise ValueError("the image embedding has no early features, which SAM-HQ needs; it was saved from plain SAM")
        self.reset_image()
        kw = dict(device=self.device, dtype=self.model.dtype)
        early = embedding.early_features
        self._set_features(embedding.features.to(**kw), [early.to(**kw)] if early is not None else [],
                           embedding.original_size, embedding.input_size)

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
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt, in original-image pixel coordinates.

        point_coords (N, 2) x, y; point_labels (N,) 1 foreground / 0 background; box (4,) x0, y0, x1, y1;
        mask_input (1, 256, 256) low-res logits from a previous call. Returns masks (C, H, W) (bool, or
        float logits with `return_logits`), scores (C,) and low-res logits (C, 256, 256); C = 1.
        """
        self._require_image()
        coords, labels, boxes, masks = prompt_from_numpy(self, point_coords, point_labels, box, mask_input)
        out = self.predict_torch(coords, labels, boxes, masks, multimask_output, return_logits, hq_token_only)
        return tuple(t[0].cpu().numpy() for t in out)

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        hq_token_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for B prompts at once, coordinates already in the resized frame (`transform.apply_coords_torch`).

        point_coords (B, N, 2), point_labels (B, N), boxes (B, 4), mask_input (B, 1, 256, 256).
        Returns masks (B, C, H, W) at the original size (bool, or logits with `return_logits`),
        scores (B, C) and low-res logits (B, C, 256, 256), float32.
        """
        self._require_image()
        b = check_torch_prompts(point_coords, point_labels, boxes, mask_input, self.mask_size)
        pts = point_coords[None] if point_coords is not None else None
        labels = point_labels[None].to(torch.int) if point_labels is not None else None
        box = boxes.reshape(1, b, 4) if boxes is not None else None
        masks = None
        if mask_input is not None:  # per prompt; a mask alone is a batch of B one-prompt "images"
            shape = (1, b) if pts is not None or box is not None else (b, 1)
            masks = mask_input.reshape(*shape, *mask_input.shape[-2:]).to(self.model.dtype)
        all_masks, iou = self.model.predict_all(self.features, self.hq_features, pts, labels, box, masks,
                                                None if masks is not None else self.decoder_context())
        all_masks, iou = all_masks.flatten(0, 1)[None], iou.flatten(0, 1)[None]
        low_res, scores = select_masks(all_masks, iou, multimask_output, hq_token_only, mode="official")
        low_res, scores = low_res[0].float(), scores[0].float()
        full = self.upscale_masks(low_res)
        if not return_logits:
            full = full > self.mask_threshold
        return full, scores, low_res

    def upscale_masks(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """Low-res logits (..., h, w) -> logits (..., H, W) at the current image's original size."""
        self._require_image()
        return upscale_logits(low_res_logits, self.input_size, self.original_size, self.image_size)
