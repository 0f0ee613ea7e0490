"""An onnxruntime engine with the predictor's interface: embed an image once, prompt it many times.

    predictor = OnnxPredictor("exported_dir")          # written by `samhq export onnx SRC exported_dir`
    predictor.set_image(image)
    masks, scores, low_res = predictor.predict(point_coords=np.array([[500, 375]]), point_labels=np.array([1]))

Outputs follow the official `SamPredictor` (one mask per prompt: the best multimask SAM mask plus
the HQ mask, or the HQ mask alone with `hq_token_only`). Preprocessing is `samhq.processing`'s, so
the masks equal the torch predictor's within float tolerance.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .. import processing
from ..image_io import check_image_size, to_rgb_array
from ..predictor import check_torch_prompts, prompt_from_numpy
from .onnx import DECODER_FILE, ENCODER_FILE, META_FILE, export_onnx


class ResizeLongestSide:
    """Maps images, points and boxes from the original frame to the resized input frame (longest side S)."""

    def __init__(self, target_length: int):
        self.target_length = target_length

    def get_preprocess_shape(self, height: int, width: int) -> tuple[int, int]:
        return processing.preprocess_shape(height, width, self.target_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        return processing.resize_rgb(image, self.target_length)

    def apply_coords(self, coords: np.ndarray, original_size) -> np.ndarray:
        return processing.scale_coords(coords, tuple(original_size), self.target_length)

    def apply_boxes(self, boxes: np.ndarray, original_size) -> np.ndarray:
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size) -> torch.Tensor:
        return processing.scale_coords(coords, tuple(original_size), self.target_length)

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)


def _session(path: Path, threads: int | None, providers):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False  # the arena keeps every large full-size mask buffer alive: 2-3x the peak memory
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


class OnnxPredictor:
    """SAM-HQ predictor running `encoder.onnx` and `decoder.onnx` with onnxruntime.

    Attributes as the torch predictor: `original_size`, `input_size`, `features` (1, 256, h, w),
    `hq_features` (1, 32, 4h, 4w), `is_image_set`, `transform`. `interm_features` is None: the
    exported encoder returns the HQ features already fused. `model` is the torch model when the
    engine was made from one (else None).
    """

    def __init__(self, onnx_dir: str | os.PathLike, threads: int | None = None, providers=None, model=None):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ImportError("the onnxruntime engine needs onnxruntime: pip install 'samhq[onnx]'") from None
        onnx_dir = Path(onnx_dir)
        meta_path = onnx_dir / META_FILE
        if not meta_path.is_file():
            raise ValueError(f"{onnx_dir} has no {META_FILE}; create it with `samhq export onnx SRC {onnx_dir}`")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != "samhq-onnx":
            raise ValueError(f"{meta_path} is not a samhq ONNX export description")
        self.meta = meta
        self.image_size = int(meta["image_size"])
        self.mask_size = int(meta["low_res_size"])  # side of the low-res mask logits, as SamHQPredictor.mask_size
        self.device = torch.device("cpu")
        self.mask_threshold = float(meta["mask_threshold"])
        self.encoder_path = onnx_dir / ENCODER_FILE
        self.decoder_path = onnx_dir / DECODER_FILE
        for p in (self.encoder_path, self.decoder_path):
            if not p.is_file():
                raise ValueError(f"{p} is missing; export both models with `samhq export onnx SRC {onnx_dir}`")
        self.encoder = _session(self.encoder_path, threads, providers)
        self.decoder = _session(self.decoder_path, threads, providers)
        self.transform = ResizeLongestSide(self.image_size)
        self.model = model
        self.reset_image()

    @classmethod
    def from_model(cls, model, onnx_dir: str | os.PathLike | None = None, threads: int | None = None, providers=None):
        """Export a torch `SamHQModel` (to `onnx_dir`, or a temporary directory kept while the engine lives) and load it."""
        tmp = None
        if onnx_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="samhq-onnx-")
            onnx_dir = tmp.name
        export_onnx(model, onnx_dir)
        engine = cls(onnx_dir, threads=threads, providers=providers, model=model)
        engine._tmp = tmp
        return engine

    def reset_image(self) -> None:
        self.features = self.hq_features = self.interm_features = None
        self.original_size = self.input_size = None
        self.is_image_set = False

    def set_image(self, image, image_format: str = "RGB") -> None:
        """Embed one image (anything `samhq.image_io.to_rgb_array` accepts; `image_format` "RGB" or "BGR")."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        rgb = to_rgb_array(image)
        if image_format == "BGR":
            rgb = np.ascontiguousarray(rgb[..., ::-1])
        check_image_size(rgb.shape[0], rgb.shape[1], self.image_size)
        resized = self.transform.apply_image(rgb)
        pixels = torch.from_numpy(resized.copy()).permute(2, 0, 1)[None]
        self.set_torch_image(processing.normalize_and_pad(pixels, self.image_size), rgb.shape[:2], resized.shape[:2])

    def set_torch_image(self, pixel_values: torch.Tensor, original_size, input_size=None) -> None:
        """pixel_values (1, 3, S, S) already normalised and padded; sizes as (h, w)."""
        if tuple(pixel_values.shape) != (1, 3, self.image_size, self.image_size):
            raise ValueError(f"pixel_values must be (1, 3, {self.image_size}, {self.image_size}), got {tuple(pixel_values.shape)}")
        self.reset_image()
        x = pixel_values.detach().cpu().float().numpy()
        emb, hq = self.encoder.run(None, {"pixel_values": x})
        self.features, self.hq_features = torch.from_numpy(emb), torch.from_numpy(hq)
        self.original_size = tuple(int(v) for v in original_size)
        self.input_size = tuple(input_size) if input_size is not None else self.transform.get_preprocess_shape(*self.original_size)
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        self._need_image()
        return self.features

    def _need_image(self):
        if not self.is_image_set:
            raise RuntimeError("no image is set: call set_image(image) before predicting")

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output: bool = True,
                return_logits: bool = False, hq_token_only: bool = False):
        """One prompt in original-image coordinates, checked as `SamHQPredictor.predict` checks it:
        point_coords (N, 2), point_labels (N,), box (4,), mask_input (1, 256, 256) low-res logits.

        Returns masks (C, H, W), scores (C,), low-res logits (C, 256, 256) as numpy arrays; C = 1.
        """
        self._need_image()
        coords, labels, boxes, masks = prompt_from_numpy(self, point_coords, point_labels, box, mask_input)
        out = self.predict_torch(coords, labels, boxes, masks, multimask_output, return_logits, hq_token_only)
        return tuple(t[0].numpy() for t in out)

    def predict_torch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                      multimask_output: bool = True, return_logits: bool = False, hq_token_only: bool = False):
        """B prompts in the resized input frame, checked as `SamHQPredictor.predict_torch` checks them:
        point_coords (B, N, 2), point_labels (B, N), boxes (B, 4), mask_input (B, 1, 256, 256).
        Returns masks (B, 1, H, W) (bool unless return_logits), scores (B, 1), low-res logits
        (B, 1, 256, 256) as torch tensors."""
        self._need_image()
        point_coords, point_labels, boxes, mask_input = (
            None if t is None else torch.as_tensor(t) for t in (point_coords, point_labels, boxes, mask_input))
        b = check_torch_prompts(point_coords, point_labels, boxes, mask_input, self.mask_size)
        parts_c, parts_l = [], []
        if point_coords is not None:
            parts_c.append(point_coords.float())
            parts_l.append(point_labels.float())
        if boxes is not None:
            bx = boxes.float().reshape(-1, 4)
            parts_c.append(bx.reshape(-1, 2, 2))
            parts_l.append(torch.tensor([[2.0, 3.0]]).expand(len(bx), 2))
        elif point_coords is not None:  # no box: SAM appends one padding point
            parts_c.append(torch.zeros(len(parts_c[0]), 1, 2))
            parts_l.append(torch.full((len(parts_c[0]), 1), -1.0))
        if parts_c:
            coords, labels = torch.cat(parts_c, dim=1), torch.cat(parts_l, dim=1)
        else:  # a mask alone: no sparse tokens, as the official prompt encoder
            coords, labels = torch.zeros(b, 0, 2), torch.zeros(b, 0)
        s = self.mask_size
        if mask_input is not None:
            mask, has_mask = mask_input.float(), 1.0
        else:
            mask, has_mask = torch.zeros(1, 1, s, s), 0.0
        feeds = {
            "image_embeddings": self.features.numpy(),
            "hq_features": self.hq_features.numpy(),
            "point_coords": coords.contiguous().numpy(),
            "point_labels": labels.contiguous().numpy(),
            "mask_input": mask.contiguous().numpy(),
            "has_mask_input": np.array([has_mask], np.float32),
            "orig_im_size": np.array(self.original_size, np.float32),
            "multimask_output": np.array([float(multimask_output)], np.float32),
            "hq_token_only": np.array([float(hq_token_only)], np.float32),
        }
        masks, scores, low = (torch.from_numpy(a) for a in self.decoder.run(None, feeds))
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks, scores, low

    def upscale_masks(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res logits (..., 256, 256) -> logits (..., H, W) at the original image size."""
        self._need_image()
        return processing.upscale_logits(low_res, self.input_size, self.original_size, self.image_size)
