"""Tiny SAM 2 video models for the tests that need a working checkpoint but no reference (CLI, evaluation, memory).

Random (perturbed) weights, a narrow Hiera-T structure, d_model 64 and a small input: fast on a CPU.
Their masks mean nothing; the tests check plumbing, formats and invariants, not segmentation quality.
"""
from __future__ import annotations

from pathlib import Path

from samhq.config_sam2 import (
    SamHQ2Config,
    SamHQ2HieraConfig,
    SamHQ2MaskDecoderConfig,
    SamHQ2PromptEncoderConfig,
    SamHQ2VideoConfig,
)

from official_ref import perturb_


def tiny_video_config(image_size: int = 64) -> SamHQ2Config:
    d = 64
    return SamHQ2Config(
        vision_config=SamHQ2HieraConfig(embed_dim=8, num_heads=1, image_size=image_size, d_model=d),
        prompt_encoder_config=SamHQ2PromptEncoderConfig(hidden_size=d, image_size=image_size),
        mask_decoder_config=SamHQ2MaskDecoderConfig(hidden_size=d, mlp_dim=128, iou_head_hidden_dim=d),
        video_config=SamHQ2VideoConfig(mem_dim=16, memory_attention_num_layers=2, memory_attention_dim_feedforward=128,
                                       fuser_num_layers=1),
    )


def tiny_video_model(seed: int = 0, image_size: int = 64):
    from samhq.modeling.sam2 import SamHQ2Model

    return perturb_(SamHQ2Model(tiny_video_config(image_size)), seed=seed).eval()


def save_tiny_checkpoint(folder, seed: int = 0, image_size: int = 64) -> Path:
    """A folder with the tiny model as an official `model.pt` and our config.json (its Hiera matches no preset)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_video_model(seed, image_size)
    model.save_official(folder / "model.pt")
    model.config.to_json_file(folder / "config.json")
    return folder
