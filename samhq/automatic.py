"""Segment everything: prompt the model with a grid of points and keep the good, distinct masks.

One generator for both generations. For a SAM-HQ / SAM model it returns the same masks as the
official `segment_anything_hq.SamAutomaticMaskGenerator`; for an HQ-SAM 2 / SAM 2.1 model those of
Meta's `sam2.SAM2AutomaticMaskGenerator` (which SysCV's HQ-SAM 2 uses unchanged). What differs
between the two is a family setting, not a second copy (`FAMILY_DEFAULTS`): the predicted-IoU
threshold (0.88 / 0.8), the masks a point gives (SAM-HQ's predictor: its best mask plus the HQ mask;
SAM 2's: three masks in token order, or one chosen by stability without multimask), and where
`min_mask_region_area` acts: SAM-HQ's generator fills holes and drops islands of the final full-size
masks (then de-duplicates again); Meta's gives its predictor max_hole_area = max_sprinkle_area = that
area, so holes and sprinkles are filled on the low-res logits (areas in low-res pixels) before they are
upscaled, and never calls its full-size step (sam2 1.1.0), so neither does this generator for SAM 2.
`use_m2m` (SAM 2's mask-to-mask refinement: every mask is decoded again from its point with its own
clamped low-res logits as the mask input, single-mask output) works for both.

Three things make it faster without changing a mask: a point whose predicted IoUs all fail
`pred_iou_thresh` gets no mask at all (the decoder stops after its IoU head: `SamHQPredictor.decode`'s
`pred_iou_thresh`; the torch engine), the other masks are filtered by predicted
IoU *before* they are upscaled to the image size (only survivors are upscaled), and run-length
encoding, boxes and NMS work on whole batches at once.

    generator = SamHQAutomaticMaskGenerator(model, points_per_side=32)
    records = generator.generate(image)   # list of dicts, largest-score first after NMS
"""
from __future__ import annotations

import numpy as np
import torch

from . import masks as M
from .image_io import to_rgb_array
from .predictor import SamHQPredictor

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# The official generators' settings where they differ: segment_anything_hq's (SAM-HQ, SAM) and Meta's
# SAM2AutomaticMaskGenerator (HQ-SAM 2, SAM 2.1). `small_regions`: where min_mask_region_area acts, on the
# full-size masks ("full_res") or on the low-res logits through the predictor's hole / sprinkle filling ("low_res").
FAMILY_DEFAULTS = {
    "sam": {"pred_iou_thresh": 0.88, "small_regions": "full_res"},
    "sam2": {"pred_iou_thresh": 0.8, "small_regions": "low_res"},
}


class SamHQAutomaticMaskGenerator:
    """Automatic mask generation over a point grid, optionally repeated on overlapping crops.

    Arguments follow the official generators: `points_per_side` (or explicit `point_grids`, one
    (N, 2) array in [0, 1] per crop layer), `points_per_batch` prompts per decoder call, filters
    `pred_iou_thresh` (default: the model family's, 0.88 for SAM-HQ, 0.8 for SAM 2) and
    `stability_score_thresh` (with `stability_score_offset`, at `mask_threshold`), `box_nms_thresh`
    within a crop, `crop_n_layers` extra layers of crops with `crop_overlap_ratio`, de-duplicated
    with `crop_nms_thresh`, `crop_n_points_downscale_factor` fewer points per side in each deeper
    layer, `min_mask_region_area` (fill holes and drop islands smaller than this many pixels of the full-size
    masks; for SAM 2 models, as Meta's generator, holes and sprinkles of the low-res logits up to this many
    low-res pixels), `output_mode` ("binary_mask",
    "uncompressed_rle" or "coco_rle") for each record's segmentation, `use_m2m` (SAM 2's one-step
    mask-to-mask refinement), and `multimask_output` / `hq_token_only` (which decoder masks a point
    gives, as the family's official predictor). `model`: a `SamHQModel`, `SamHQ2Model` or a
    `SamHQPredictor` (either engine).
    """

    def __init__(
        self,
        model,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float | None = None,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        mask_threshold: float = 0.0,
        use_m2m: bool = False,
        multimask_output: bool = True,
        hq_token_only: bool = False,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}; got {output_mode!r}")
        if crop_n_layers < 0 or crop_n_points_downscale_factor < 1 or points_per_batch < 1:
            raise ValueError("crop_n_layers must be >= 0, crop_n_points_downscale_factor >= 1 and points_per_batch >= 1")
        if min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area must be >= 0 (0 = off), got {min_mask_region_area}")
        if points_per_side is not None:
            if int(points_per_side / crop_n_points_downscale_factor**crop_n_layers) < 1:
                raise ValueError(
                    f"points_per_side={points_per_side} leaves no points in crop layer {crop_n_layers} "
                    f"(downscale factor {crop_n_points_downscale_factor}); use more points or fewer layers"
                )
            point_grids = M.build_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        elif len(point_grids) < crop_n_layers + 1:
            raise ValueError(f"point_grids has {len(point_grids)} grids; crop_n_layers={crop_n_layers} needs {crop_n_layers + 1}")
        elif any(np.ndim(g) != 2 or np.shape(g)[1] != 2 or len(g) == 0 for g in point_grids):
            raise ValueError("each of point_grids must be a non-empty (N, 2) array of x, y in [0, 1]")
        # fail now, not after the model ran
        if output_mode == "coco_rle":
            _require("pycocotools", "output_mode='coco_rle'")
        if min_mask_region_area > 0:
            _require("scipy", "min_mask_region_area > 0")  # both steps label regions with scipy.ndimage
        predictor = model if isinstance(model, SamHQPredictor) else SamHQPredictor(model)
        family = FAMILY_DEFAULTS[predictor.family]
        self.small_regions = family["small_regions"]
        if self.small_regions == "low_res" and min_mask_region_area > 0:  # a predictor of its own over the same engine
            predictor = SamHQPredictor(predictor.engine, max_hole_area=min_mask_region_area,
                                       max_sprinkle_area=min_mask_region_area)
        self.predictor = predictor
        self.point_grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = family["pred_iou_thresh"] if pred_iou_thresh is None else pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.mask_threshold = mask_threshold
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.use_m2m = use_m2m
        self.multimask_output = multimask_output
        self.hq_token_only = hq_token_only

    @property
    def model(self):
        return self.predictor.model

    @torch.no_grad()
    def generate(self, image, multimask_output: bool | None = None, hq_token_only: bool | None = None) -> list[dict]:
        """Masks for one image ((H, W, 3) uint8 RGB, or anything `samhq.image_io.to_rgb_array` accepts).

        Each record: `segmentation` (bool (H, W) array or an RLE dict, per `output_mode`), `area`
        (pixels), `bbox` [x, y, w, h], `predicted_iou`, `point_coords` [[x, y]], `stability_score`,
        `crop_box` [x, y, w, h]. `multimask_output` and `hq_token_only` (default: the generator's) select
        the decoder's masks as the family's official predictor does. `bbox` follows the official generators:
        w = x_max - x_min over the mask's pixel indices, one less than COCO's extent (w = x_max - x_min + 1,
        what pycocotools' `toBbox` gives); writers of COCO files convert (`samhq.masks.mask_bbox` is COCO's).
        """
        image = to_rgb_array(image)
        multimask_output = self.multimask_output if multimask_output is None else multimask_output
        hq_token_only = self.hq_token_only if hq_token_only is None else hq_token_only
        data = self._generate(image, multimask_output, hq_token_only)
        if self.min_mask_region_area > 0 and self.small_regions == "full_res":
            data = self._remove_small_regions(data, max(self.box_nms_thresh, self.crop_nms_thresh))
        if self.output_mode == "binary_mask":
            segmentations = [M.rle_to_mask(r) for r in data["rles"]]
        elif self.output_mode == "coco_rle":
            segmentations = [M.rle_to_coco(r) for r in data["rles"]]
        else:
            segmentations = data["rles"]
        boxes = M.box_xyxy_to_xywh(data["boxes"]).tolist()
        crops = M.box_xyxy_to_xywh(data["crop_boxes"]).tolist()
        ious, stab, points = data["iou"].tolist(), data["stability"].tolist(), data["points"].tolist()
        return [
            {
                "segmentation": seg,
                "area": M.area_from_rle(rle),
                "bbox": boxes[i],
                "predicted_iou": ious[i],
                "point_coords": [points[i]],
                "stability_score": stab[i],
                "crop_box": crops[i],
            }
            for i, (seg, rle) in enumerate(zip(segmentations, data["rles"]))
        ]

    # ------------------------------------------------------------------ stages
    # Intermediate results are dicts of equal-length fields: rles (list of uncompressed RLEs), boxes
    # (N, 4) XYXY int64, iou (N,), stability (N,), points (N, 2) float64, crop_boxes (N, 4).

    def _generate(self, image: np.ndarray, multimask: bool, hq_only: bool) -> dict:
        orig_size = image.shape[:2]
        crop_boxes, layers = M.generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = _cat([self._process_crop(image, box, layer, orig_size, multimask, hq_only)
                     for box, layer in zip(crop_boxes, layers)])
        if len(crop_boxes) > 1:  # masks from several crops: prefer those from smaller crops
            scores = 1 / M.box_area(data["crop_boxes"])
            data = _take(data, M.box_nms(data["boxes"].float(), scores, self.crop_nms_thresh))
        return data

    def _process_crop(self, image, crop_box, layer, orig_size, multimask, hq_only) -> dict:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1]
        crop_size = crop.shape[:2]
        self.predictor.set_image(crop)
        points = self.point_grids[layer] * np.array(crop_size)[None, ::-1]
        batches = [
            self._process_batch(points[i:i + self.points_per_batch], crop_size, crop_box, orig_size, multimask, hq_only)
            for i in range(0, len(points), self.points_per_batch)
        ]
        self.predictor.reset_image()
        data = _cat(batches)
        data = _take(data, M.box_nms(data["boxes"].float(), data["iou"], self.box_nms_thresh))
        offset = torch.tensor([x0, y0])
        data["boxes"] = data["boxes"] + offset.repeat(2)
        data["points"] = data["points"] + offset
        data["crop_boxes"] = torch.tensor([crop_box] * len(data["rles"]), dtype=torch.int64).reshape(-1, 4)
        return data

    def _process_batch(self, points: np.ndarray, crop_size, crop_box, orig_size, multimask, hq_only) -> dict:
        p = self.predictor
        coords = torch.as_tensor(p.transform.apply_coords(points, crop_size), dtype=torch.float)[:, None]
        labels = torch.ones(len(points), 1, dtype=torch.int)
        # without m2m the IoU filter below drops every mask scoring <= pred_iou_thresh: those need not be computed (NaN)
        skip = self.pred_iou_thresh if self.pred_iou_thresh > 0 and not self.use_m2m else None
        low_res, iou = p.decode(coords, labels, multimask_output=multimask, hq_token_only=hq_only,
                                pred_iou_thresh=skip, upscaled_only=not self.use_m2m)  # (P, M, h, w), (P, M)
        n_per_point = low_res.shape[1]
        low_res, iou = low_res.flatten(0, 1), iou.flatten()  # (P*M, h, w), (P*M,)
        points = torch.as_tensor(points, device=low_res.device).repeat_interleave(n_per_point, dim=0)
        if self.use_m2m:
            low_res, iou = self._refine(coords.repeat_interleave(n_per_point, dim=0), low_res, hq_only)

        if self.pred_iou_thresh > 0:
            keep = iou > self.pred_iou_thresh
            low_res, iou, points = low_res[keep], iou[keep], points[keep]
        if len(low_res) == 0:
            return _empty()
        logits = p.upscale_masks(low_res)  # only the survivors reach full size
        stability = M.stability_score(logits, self.mask_threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0:
            keep = stability >= self.stability_score_thresh
            logits, iou, stability, points = logits[keep], iou[keep], stability[keep], points[keep]
        masks = logits > self.mask_threshold
        del logits
        boxes = M.masks_to_boxes(masks)
        keep = ~M.is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
        masks, boxes, iou, stability, points = masks[keep], boxes[keep], iou[keep], stability[keep], points[keep]
        rles = M.mask_to_rle(M.uncrop_masks(masks, crop_box, *orig_size))
        return {"rles": rles, "boxes": boxes.cpu(), "iou": iou.cpu(), "stability": stability.cpu(), "points": points.cpu()}

    def _refine(self, coords: torch.Tensor, low_res: torch.Tensor, hq_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM 2's mask-to-mask refinement: each mask (K, h, w) decoded again from its point (K, 1, 2) with its
        low-res logits (clamped as the predictor returns them) as the mask input, one mask each."""
        p = self.predictor
        limit = getattr(p.transform, "logits_limit", None)
        mask_in = low_res if limit is None else low_res.clamp(-limit, limit)
        labels = torch.ones(len(coords), 1, dtype=torch.int)
        out, scores = [], []
        for i in range(0, len(coords), self.points_per_batch):
            j = slice(i, i + self.points_per_batch)
            m, s = p.decode(coords[j], labels[j], mask_input=mask_in[j, None], multimask_output=False, hq_token_only=hq_only)
            out.append(m[:, 0])
            scores.append(s[:, 0])
        return torch.cat(out), torch.cat(scores)

    def _remove_small_regions(self, data: dict, nms_thresh: float) -> dict:
        """Fill small holes, drop small islands, then NMS again preferring masks left unchanged."""
        if not data["rles"]:
            return data
        changed, boxes = {}, []
        for i, rle in enumerate(data["rles"]):
            mask, holes = M.remove_small_regions(M.rle_to_mask(rle), self.min_mask_region_area, "holes")
            mask, islands = M.remove_small_regions(mask, self.min_mask_region_area, "islands")
            mask = torch.from_numpy(mask)
            if holes or islands:
                changed[i] = mask
            boxes.append(M.masks_to_boxes(mask))
        boxes = torch.stack(boxes)
        scores = torch.tensor([0.0 if i in changed else 1.0 for i in range(len(boxes))])
        keep = M.box_nms(boxes.float(), scores, nms_thresh)
        data = dict(data, rles=list(data["rles"]), boxes=data["boxes"].clone())
        for i in keep.tolist():
            if i in changed:
                data["rles"][i] = M.mask_to_rle(changed[i][None])[0]
                data["boxes"][i] = boxes[i]
        return _take(data, keep)


def _require(module: str, feature: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{feature} needs {module}: pip install 'samhq[amg]'")


def _empty() -> dict:
    return {"rles": [], "boxes": torch.zeros(0, 4, dtype=torch.int64), "iou": torch.zeros(0), "stability": torch.zeros(0),
            "points": torch.zeros(0, 2, dtype=torch.float64)}


def _cat(parts: list[dict]) -> dict:
    out = {"rles": [r for d in parts for r in d["rles"]]}
    for k in parts[0]:
        if k != "rles":
            out[k] = torch.cat([d[k] for d in parts])
    return out


def _take(data: dict, index: torch.Tensor) -> dict:
    idx = index.tolist()
    return {k: [v[i] for i in idx] if k == "rles" else v[index] for k, v in data.items()}
