"""Score a model on a dataset: mIoU and mBIoU of its HQ output and of its SAM-token output.

As SAM-HQ's own evaluation: every ground-truth mask is one object, prompted on its own by its tight
bounding box (pixel extremes x0, y0, x1, y1) and/or one positive point; the decoder runs once per
prompt without multimask output, the "SAM" mask is the single-mask SAM token (token 0) and the "HQ"
mask the HQ token alone, both from the same decoder pass; a pixel is foreground where its logit > 0
after upscaling to the original image size. Metrics are averaged over objects.

The point prompt is deterministic: the mask pixel farthest (Euclidean) from the background, the image
border counting as background; ties go to the first pixel in row-major order. Thin objects get a
point on their thickest part, which is where a person would click.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import SkippedItem
from ..predictor import SamHQPredictor
from .metrics import boundary_iou, mask_iou

PROMPTS = ("box", "point")
OUTPUTS = ("sam", "hq")
OUTPUT_NAMES = {"sam": "SAM token", "hq": "HQ"}


def box_prompt(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> tight box [x0, y0, x1, y1] in pixel indices, as SAM-HQ's `masks_to_boxes`."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def point_prompt(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> [x, y] of the mask pixel farthest from the background and the image border."""
    try:
        from scipy.ndimage import distance_transform_edt
    except ImportError:
        raise ImportError("point prompts need scipy (distance transform): pip install scipy") from None
    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x, y], dtype=np.float64)


@dataclass
class EvalResult:
    """Per-object records and their means.

    records: one dict per (object, prompt): image, index, object, prompt, kind (when the dataset has
    kinds), area, the prompt's box or point, and sam_iou, sam_biou, hq_iou, hq_biou.
    summary: {prompt: {output: {"objects", "mIoU", "mBIoU"}}}; by_kind: {prompt: {kind: {output: ...}}}.
    """

    records: list[dict]
    settings: dict
    images: int
    skipped: list = field(default_factory=list)

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(o for o in OUTPUTS if self.records and f"{o}_iou" in self.records[0])

    @staticmethod
    def _means(records, outputs) -> dict:
        return {o: {"objects": len(records),
                    "mIoU": float(np.mean([r[f"{o}_iou"] for r in records])),
                    "mBIoU": float(np.mean([r[f"{o}_biou"] for r in records]))} for o in outputs}

    @property
    def summary(self) -> dict:
        out = {}
        for p in self.settings["prompts"]:
            rows = [r for r in self.records if r["prompt"] == p]
            if rows:
                out[p] = self._means(rows, self.outputs)
        return out

    @property
    def by_kind(self) -> dict:
        out = {}
        for p in self.settings["prompts"]:
            rows = [r for r in self.records if r["prompt"] == p and "kind" in r]
            kinds = sorted({r["kind"] for r in rows})
            if kinds:
                out[p] = {k: self._means([r for r in rows if r["kind"] == k], self.outputs) for k in kinds}
        return out

    def table(self) -> str:
        """The summary as an aligned text table."""
        lines = [f"{'prompt':<7} {'output':<10} {'objects':>7} {'mIoU':>7} {'mBIoU':>7}"]
        for p, outs in self.summary.items():
            for o, m in outs.items():
                lines.append(f"{p:<7} {OUTPUT_NAMES[o]:<10} {m['objects']:>7} {m['mIoU']:>7.4f} {m['mBIoU']:>7.4f}")
        return "\n".join(lines)

    def to_dict(self, per_object: bool = True) -> dict:
        d = {"settings": self.settings, "images": self.images, "skipped": [list(s) for s in self.skipped],
             "summary": self.summary, "by_kind": self.by_kind}
        if per_object:
            d["records"] = self.records
        return d

    def save_json(self, path, per_object: bool = True, overwrite: bool = False) -> Path:
        path = _writable(path, overwrite)
        path.write_text(json.dumps(self.to_dict(per_object), indent=1) + "\n")
        return path

    def save_csv(self, path, overwrite: bool = False) -> Path:
        """One row per (object, prompt); box and point as space-separated numbers."""
        path = _writable(path, overwrite)
        cols = ["image", "index", "object", "kind", "prompt", "area", "box", "point"]
        cols += [f"{o}_{m}" for o in self.outputs for m in ("iou", "biou")]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in self.records:
                row = dict(r)
                for k in ("box", "point"):
                    if k in row:
                        row[k] = " ".join(f"{v:g}" for v in row[k])
                w.writerow(row)
        return path


def _writable(path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--force) to replace it")
    return path


def _iter_dataset(dataset, max_images):
    """(index, item) for readable items; unreadable ones (SkippedItem) are left out."""
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    for i in range(n):
        try:
            yield i, dataset[i]
        except SkippedItem:
            continue


@torch.no_grad()
def evaluate(model, dataset, prompt: str = "box", sam_output: str = "single", max_images: int | None = None,
             dilation_ratio: float = 0.02, chunk: int = 16, progress: bool = False) -> EvalResult:
    """Prompt `model` with every object of `dataset` and score its SAM-token and HQ masks.

    model: a SamHQModel or SamHQ2Model (plain SAM / SAM 2 weights give the SAM-token scores only). dataset: items with
    "image" (H, W, 3) uint8 and "masks" list of bool (H, W), optional "name" and "kinds".
    prompt: "box", "point" or "both". sam_output: "single" (token 0, as SAM-HQ's evaluation; for SAM 2 its
    single-mask output, which falls back to the best multimask mask when token 0 is unstable) or "best"
    (the multimask token with the highest predicted IoU, as SAM answers one ambiguous point).
    """
    if prompt not in ("box", "point", "both"):
        raise ValueError(f"prompt must be 'box', 'point' or 'both', got {prompt!r}")
    if sam_output not in ("single", "best"):
        raise ValueError(f"sam_output must be 'single' or 'best', got {sam_output!r}")
    if not 0 < dilation_ratio < 1:
        raise ValueError(f"dilation_ratio must be between 0 and 1, got {dilation_ratio}")
    prompts = PROMPTS if prompt == "both" else (prompt,)
    was_training = model.training
    model.eval()
    predictor = SamHQPredictor(model)
    records, images = [], 0
    items = _iter_dataset(dataset, max_images)
    if progress:
        try:
            from tqdm import tqdm

            total = len(dataset) if max_images is None else min(len(dataset), max_images)
            items = tqdm(items, total=total, desc="evaluating", unit="img", leave=False)
        except ImportError:
            pass
    for index, item in items:
        masks = [np.asarray(m, dtype=bool) for m in item["masks"]]
        keep = [j for j, m in enumerate(masks) if m.any()]
        if not keep:
            continue
        masks = [masks[j] for j in keep]
        kinds = [item["kinds"][j] for j in keep] if "kinds" in item else None
        images += 1
        predictor.set_image(item["image"])
        name = str(item.get("name", index))
        for p in prompts:
            prompts_xy = np.stack([box_prompt(m) if p == "box" else point_prompt(m) for m in masks])
            for start in range(0, len(masks), chunk):
                sl = slice(start, start + chunk)
                preds = predict_tokens(predictor, p, prompts_xy[sl], sam_output)
                for j, gt in enumerate(masks[sl], start):
                    r = {"image": name, "index": index, "object": keep[j]}
                    if kinds is not None:
                        r["kind"] = kinds[j]
                    r.update({"prompt": p, "area": int(gt.sum()), p: prompts_xy[j].tolist()})
                    for o, pred in preds.items():
                        r[f"{o}_iou"] = mask_iou(gt, pred[j - start])
                        r[f"{o}_biou"] = boundary_iou(gt, pred[j - start], dilation_ratio)
                    records.append(r)
    model.train(was_training)
    if not records:
        raise ValueError("the dataset has no readable image with a non-empty mask; nothing to evaluate")
    settings = {"prompts": list(prompts), "sam_output": sam_output, "dilation_ratio": dilation_ratio,
                "threshold": 0.0, "max_images": max_images}
    return EvalResult(records, settings, images, list(getattr(dataset, "skipped", [])))


@torch.no_grad()
def predict_tokens(predictor, prompt: str, xy: np.ndarray, sam_output: str = "single") -> dict[str, np.ndarray]:
    """The SAM token's and the HQ token's masks for K prompts on the predictor's current image.

    xy: (K, 4) boxes or (K, 2) points in original-image pixels. Returns {"sam": (K, H, W) bool,
    "hq": (K, H, W) bool (SAM-HQ only)} at the original size.
    """
    size = predictor.original_size
    if prompt == "box":
        kw = {"boxes": torch.as_tensor(predictor.transform.apply_boxes(xy, size), dtype=torch.float)}
    else:
        coords = torch.as_tensor(predictor.transform.apply_coords(xy, size), dtype=torch.float)[:, None]
        kw = {"point_coords": coords, "point_labels": torch.ones(len(xy), 1, dtype=torch.int)}
    sam, scores = predictor.decode(**kw, multimask_output=sam_output == "best", sam_token_only=True)
    # "best": the highest predicted IoU (SAM 2's predictor returns the three multimask masks in token order)
    pick = scores.argmax(dim=1) if sam_output == "best" else torch.zeros(len(sam), dtype=torch.long)
    out = {"sam": sam[torch.arange(len(sam)), pick.to(sam.device)]}
    if predictor.engine.hq_enabled:
        out["hq"] = predictor.decode(**kw, multimask_output=False, hq_token_only=True)[0][:, 0]
    return {k: (predictor.upscale_masks(v) > predictor.mask_threshold).cpu().numpy() for k, v in out.items()}
