"""SAM 2.1 and HQ-SAM 2 for images: Hiera + FPN image encoder, SAM 2 prompt encoder, (HQ) mask decoder."""
from .hiera import Hiera, Sam2VisionEncoder
from .mask_decoder import Sam2MaskDecoder
from .model import PIXEL_MEAN, PIXEL_STD, SamHQ2ImageSegmentationOutput, SamHQ2Model, load_sam2_model
from .prompt_encoder import Sam2PromptEncoder

__all__ = ["SamHQ2Model", "SamHQ2ImageSegmentationOutput", "load_sam2_model", "Hiera", "Sam2VisionEncoder", "Sam2MaskDecoder",
           "Sam2PromptEncoder", "PIXEL_MEAN", "PIXEL_STD"]
