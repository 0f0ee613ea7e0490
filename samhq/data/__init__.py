"""Datasets: synthetic fine-structure images, image/mask folders (DIS5K, HQSeg-44K layout) and COCO JSON."""
from .datasets import CocoInstances, MaskFolder, SkippedItem, decode_segmentation
from .synthetic import KINDS, SyntheticShapes, coarsen

__all__ = ["SyntheticShapes", "coarsen", "KINDS", "MaskFolder", "CocoInstances", "SkippedItem", "decode_segmentation"]
