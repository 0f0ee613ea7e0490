from .mask_selection import select_masks
from .model import (
                    SamHQImageSegmentationOutput,
                    SamHQModel,
                    SamHQVisionEncoderOutput,
                    SamHQVisionModel,
                    convert,
                    load_model,
                    model_fingerprint,
                    save_official,
                    save_pretrained,
)

__all__ = ["SamHQModel", "SamHQVisionModel", "SamHQImageSegmentationOutput", "SamHQVisionEncoderOutput", "select_masks",
           "load_model", "save_pretrained", "save_official", "convert", "model_fingerprint"]
