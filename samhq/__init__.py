"""samhq: SAM-HQ (Segment Anything in High Quality) for PyTorch."""
from .checkpoints import CheckpointError, convert, load_model, save_official, save_pretrained
from .config import SamHQConfig, SamHQMaskDecoderConfig, SamHQPromptEncoderConfig, SamHQTinyViTConfig, SamHQVisionConfig
from .modeling import SamHQModel, SamHQVisionModel, select_masks

__version__ = "0.1.0"

__all__ = [
    "SamHQConfig", "SamHQVisionConfig", "SamHQTinyViTConfig", "SamHQPromptEncoderConfig", "SamHQMaskDecoderConfig",
    "SamHQModel", "SamHQVisionModel", "select_masks", "CheckpointError", "load_model", "save_pretrained",
    "save_official", "convert",
]
