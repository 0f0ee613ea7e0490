"""`samhq.pipeline(task, model=...)`: one call from an image to masks, shaped like transformers' pipelines.

    generator = samhq.pipeline("mask-generation", model="sam_hq_vit_b.pth", device="cuda")
    out = generator(image, points_per_batch=64, pred_iou_thresh=0.88)
    out["masks"]   # list of (H, W) bool arrays;  out["scores"]: (N,) tensor of predicted IoU

    segmenter = samhq.pipeline("image-segmentation", model="sam_hq_vit_b.pth")
    segmenter(image)   # [{"score": 0.97, "label": "mask_0", "mask": <PIL.Image mode L>}, ...]

Both run `SamHQAutomaticMaskGenerator`, so they return its masks. `image` is anything
`samhq.image_io.to_rgb_array` accepts (path, PIL image, array, tensor) or a list of those.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from . import masks as M
from .automatic import SamHQAutomaticMaskGenerator
from .checkpoints import DEMO_MODEL, demo_model_available
from .dtypes import resolve_dtype
from .modeling.auto import is_model, load_model

# pipeline keyword -> generator argument (transformers' names on the left, where they differ)
_GENERATOR_ARGS = {
    "points_per_crop": "points_per_side", "points_per_side": "points_per_side", "points_per_batch": "points_per_batch",
    "pred_iou_thresh": "pred_iou_thresh", "stability_score_thresh": "stability_score_thresh",
    "stability_score_offset": "stability_score_offset", "box_nms_thresh": "box_nms_thresh",
    "crops_n_layers": "crop_n_layers", "crop_n_layers": "crop_n_layers", "crops_nms_thresh": "crop_nms_thresh",
    "crop_nms_thresh": "crop_nms_thresh", "crop_overlap_ratio": "crop_overlap_ratio",
    "crop_n_points_downscale_factor": "crop_n_points_downscale_factor", "min_mask_region_area": "min_mask_region_area",
    "mask_threshold": "mask_threshold", "use_m2m": "use_m2m",
}
_GENERATE_ARGS = ("multimask_output", "hq_token_only")


def load_for_inference(model=None, device=None, dtype=None, low_memory: bool = False):
    """A model in eval mode (`SamHQModel` or `SamHQ2Model`) from a model object or any checkpoint source of
    either generation (path, hub id, bundled name; see `samhq.load_model`).

    dtype is the image encoder's precision; the prompt encoder and mask decoder stay float32. A model
    object the caller passed is never changed: when its device or encoder dtype must differ, a copy is
    made (dtype None keeps a model object's own dtype; a checkpoint loads in float32). low_memory applies to
    checkpoints (`samhq.load_model`); a model object is used as it is.
    """
    if model is None:
        if not demo_model_available():
            raise ValueError("no model given and the bundled demo model is not installed; pass model=PATH_OR_HUB_ID")
        model = DEMO_MODEL
    if is_model(model):
        want_device = torch.device(device) if device is not None else model.device
        want_dtype = model.encoder_dtype if dtype is None else resolve_dtype(dtype, want_device)
        if model.device == want_device and model.encoder_dtype == want_dtype and not model.training:
            return model
        model = copy.deepcopy(model).to(device=want_device).eval()
        model.vision_encoder.to(want_dtype)
        return model
    return load_model(model, device=device, dtype=resolve_dtype(dtype, device), low_memory=low_memory)


class _AutomaticPipeline:
    def __init__(self, model, device=None, dtype=None):
        self.model = load_for_inference(model, device, dtype)

    def _generate(self, image, kwargs: dict) -> list[dict]:
        unknown = set(kwargs) - set(_GENERATOR_ARGS) - set(_GENERATE_ARGS)
        if unknown:
            known = ", ".join(sorted(set(_GENERATOR_ARGS) | set(_GENERATE_ARGS)))
            raise TypeError(f"unknown argument(s) {', '.join(sorted(unknown))}; known: {known}")
        gen_kw = {_GENERATOR_ARGS[k]: v for k, v in kwargs.items() if k in _GENERATOR_ARGS}
        run_kw = {k: v for k, v in kwargs.items() if k in _GENERATE_ARGS}
        generator = SamHQAutomaticMaskGenerator(self.model, output_mode="uncompressed_rle", **gen_kw)
        return generator.generate(image, **run_kw)

    def __call__(self, image, **kwargs):
        if isinstance(image, (list, tuple)):
            return [self._one(im, kwargs) for im in image]
        return self._one(image, kwargs)


class MaskGenerationPipeline(_AutomaticPipeline):
    """image -> {"masks": [bool (H, W)], "scores": (N,) tensor}, plus "rle_mask" (uncompressed RLEs) and
    "bounding_boxes" ((N, 4) XYXY tensor) when `output_rle_mask` / `output_bboxes_mask` are set."""

    def _one(self, image, kwargs):
        kwargs = dict(kwargs)
        want_rle = kwargs.pop("output_rle_mask", False)
        want_boxes = kwargs.pop("output_bboxes_mask", False)
        records = self._generate(image, kwargs)
        out = {
            "masks": [M.rle_to_mask(r["segmentation"]) for r in records],
            "scores": torch.tensor([r["predicted_iou"] for r in records], dtype=torch.float32),
        }
        if want_rle:
            out["rle_mask"] = [r["segmentation"] for r in records]
        if want_boxes:
            xywh = torch.tensor([r["bbox"] for r in records], dtype=torch.int64).reshape(-1, 4)
            out["bounding_boxes"] = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        return out


class ImageSegmentationPipeline(_AutomaticPipeline):
    """image -> [{"score": float, "label": "mask_i", "mask": PIL image (mode L, 0 / 255)}], best first."""

    def _one(self, image, kwargs):
        from PIL import Image

        records = self._generate(image, kwargs)
        return [
            {"score": r["predicted_iou"], "label": f"mask_{i}",
             "mask": Image.fromarray(M.rle_to_mask(r["segmentation"]).astype(np.uint8) * 255)}
            for i, r in enumerate(records)
        ]


TASKS = {"mask-generation": MaskGenerationPipeline, "image-segmentation": ImageSegmentationPipeline}


def pipeline(task: str, model=None, device=None, dtype=None):
    """A callable for `task` ("mask-generation" or "image-segmentation") over `model`.

    model: a `SamHQModel` or `SamHQ2Model` (never changed: a copy is made when device or dtype must differ),
    or a checkpoint of either generation (official .pth / .pt, transformers-layout folder, .safetensors, hub
    id, bundled name); device: a torch device; dtype: the image encoder's precision, None (float32, or a
    model object's own), "auto" (bfloat16 where the hardware runs it fast), "float32", "bfloat16", "float16" or a
    torch dtype (the prompt encoder and mask decoder stay float32).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[task](model, device=device, dtype=dtype)
