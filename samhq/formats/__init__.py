"""Mask formats: polygons on pixel edges, and the files labelling and training tools read."""
from .polygons import mask_to_polygons, polygons_to_mask

__all__ = ["mask_to_polygons", "polygons_to_mask"]
