from .model import SamHQImageSegmentationOutput, SamHQModel, SamHQVisionEncoderOutput, SamHQVisionModel
from .mask_decoder import select_masks

__all__ = ["SamHQModel", "SamHQVisionModel", "SamHQImageSegmentationOutput", "SamHQVisionEncoderOutput", "select_masks"]
