"""Mask formats: polygons on pixel edges, and the files labelling and training tools read.

Core layer: numpy and PIL at import time; rasterio / shapely (the `formats` extra) and pycocotools
(the `amg` extra) are imported when a function needs them, with an ImportError naming the extra.
"""
from .ls_rle import ls_rle_to_mask, mask_to_ls_rle
from .polygons import mask_to_polygons, polygons_to_mask
from .readers import image_from_samhq_doc, read_labelme, read_samhq_outputs, read_yolo
from .writers import (
    FORMATS,
    dataset_files,
    image_files,
    keyhole,
    label_studio_config,
    label_studio_result,
    link_yolo_images,
    normalize_categories,
    parse_formats,
    split_output_formats,
    to_coco,
    to_geojson,
    to_label_studio,
    to_labelme,
    to_yolo,
    write_file_data,
    write_formats,
    yolo_data_yaml,
)

__all__ = [
    "FORMATS", "dataset_files", "image_files", "image_from_samhq_doc", "keyhole", "label_studio_config",
    "label_studio_result", "link_yolo_images", "ls_rle_to_mask", "mask_to_ls_rle", "mask_to_polygons",
    "normalize_categories", "parse_formats", "polygons_to_mask", "read_labelme", "read_samhq_outputs", "read_yolo",
    "split_output_formats", "to_coco", "to_geojson", "to_label_studio", "to_labelme", "to_yolo", "write_file_data",
    "write_formats", "yolo_data_yaml",
]
