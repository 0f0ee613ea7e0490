"""samhq: SAM-HQ (Segment Anything in High Quality) for PyTorch."""
import os as _os
import sys as _sys

# OpenMP threads that wait by spinning stall every parallel region when another process holds one of
# the cores: `samhq everything` with 2 threads on a 2-core machine with one busy core took 172 s
# spinning and 22.5 s waiting passively (one thread: 22.2 s). libgomp reads this when torch loads, so
# it takes effect when samhq is imported first (the command line always is); a value the user set wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from .limits import tune_malloc as _tune_malloc

_tune_malloc()  # freed large blocks are reused, not page-faulted in again (see limits.tune_malloc)
from .automatic import SamHQAutomaticMaskGenerator
from .checkpoints import CheckpointError
from .config import SamHQConfig, SamHQMaskDecoderConfig, SamHQPromptEncoderConfig, SamHQTinyViTConfig, SamHQVisionConfig
from .config_sam2 import SamHQ2Config
from .data import CocoInstances, MaskFolder, SyntheticShapes
from .eval import EvalResult, boundary_iou, evaluate, mask_iou
from .export import export_onnx
from .fast import bf16_supported, optimize, quantize_int8
from .image_io import load_image, to_rgb_array
from .modeling import SamHQ2Model, SamHQModel, SamHQVisionModel, convert, load_model, save_official, save_pretrained
from .modeling.mask_selection import select_masks
from .pipelines import pipeline
from .predictor import ImageEmbedding, OnnxPredictor, SamHQPredictor, model_fingerprint
from .processing import BatchFeature, SamHQImageProcessor, SamHQProcessor
from .train import TrainConfig, Trainer, set_trainable
from .video import SamHQ2VideoPredictor
from .visualize import draw_masks

__version__ = "0.1.0"

__all__ = [
    "SamHQConfig", "SamHQVisionConfig", "SamHQTinyViTConfig", "SamHQPromptEncoderConfig", "SamHQMaskDecoderConfig",
    "SamHQModel", "SamHQVisionModel", "SamHQ2Model", "SamHQ2Config", "select_masks", "CheckpointError", "load_model",
    "save_pretrained",
    "save_official", "convert", "SamHQPredictor", "OnnxPredictor", "ImageEmbedding", "model_fingerprint", "SamHQProcessor",
    "SamHQImageProcessor", "BatchFeature", "SamHQAutomaticMaskGenerator", "pipeline", "load_image", "to_rgb_array",
    "draw_masks", "export_onnx", "optimize", "quantize_int8", "bf16_supported",
    "SyntheticShapes", "MaskFolder", "CocoInstances", "evaluate", "EvalResult", "mask_iou", "boundary_iou",
    "Trainer", "TrainConfig", "set_trainable", "SamHQ2VideoPredictor",
]
