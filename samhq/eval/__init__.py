"""Evaluation: mask IoU and boundary IoU, and `evaluate` for a model on a dataset."""
from .evaluate import EvalResult, box_prompt, evaluate, point_prompt
from .metrics import boundary_iou, mask_boundary, mask_iou

__all__ = ["mask_iou", "boundary_iou", "mask_boundary", "evaluate", "EvalResult", "box_prompt", "point_prompt"]
