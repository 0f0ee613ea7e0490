from .auto import convert, is_model, load_model
from .mask_selection import select_masks
from .model import (
                    SamHQImageSegmentationOutput,
                    SamHQModel,
                    SamHQVisionEncoderOutput,
                    SamHQVisionModel,
                    model_fingerprint,
                    save_official,
                    save_pretrained,
)
from .sam2 import SamHQ2Model, load_sam2_model

__all__ = ["SamHQModel", "SamHQVisionModel", "SamHQImageSegmentationOutput", "SamHQVisionEncoderOutput", "select_masks",
           "load_model", "save_pretrained", "save_official", "convert", "model_fingerprint", "is_model", "SamHQ2Model",
           "load_sam2_model"]
