"""Training SAM-HQ: losses, prompt sampling, the trainer (recipes, checkpoints, torch.distributed)."""
from ..modeling.losses import iou_prediction_loss, mask_losses, segmentation_loss
from .trainer import RECIPES, TrainConfig, Trainer, init_distributed, init_weights, set_trainable

__all__ = ["TrainConfig", "Trainer", "RECIPES", "set_trainable", "init_weights", "init_distributed",
           "segmentation_loss", "mask_losses", "iou_prediction_loss"]
