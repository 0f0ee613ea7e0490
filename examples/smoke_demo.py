"""Smoke demo: build a randomly initialised SAM-HQ (vit_tiny layout), save it, load it back, and
segment a synthetic image with one point prompt. The weights are random, so the mask is not
meaningful; this only shows the whole path runs. (A trained demo model is on the way.)"""
import tempfile

import numpy as np
import torch

from samhq import SamHQConfig, SamHQModel

torch.manual_seed(0)
model = SamHQModel(SamHQConfig.from_variant("vit_tiny")).eval()
with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    model = SamHQModel.from_pretrained(d)

image = np.zeros((1024, 1024, 3), dtype=np.float32)
image[300:700, 200:800] = 1.0
mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
pixels = torch.from_numpy(((image - mean) / std).transpose(2, 0, 1)).float()[None]
with torch.no_grad():
    out = model(pixel_values=pixels, input_points=torch.tensor([[[[500.0, 500.0]]]]), multimask_output=True)
print("iou_scores", out.iou_scores.shape, "pred_masks", out.pred_masks.shape)
print("mask area (256x256 logits > 0):", (out.pred_masks[0, 0, 0] > 0).sum().item())
