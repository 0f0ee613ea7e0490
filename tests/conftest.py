import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from samhq import SamHQConfig, SamHQMaskDecoderConfig, SamHQModel, SamHQPromptEncoderConfig, SamHQVisionConfig  # noqa: E402

from official_ref import perturb_  # noqa: E402


def small_config(**vision) -> SamHQConfig:
    """A narrow ViT (1024 input, 64x64 embedding grid by default) that runs in well under a second.

    Vision fields override the defaults; `image_size` sets the prompt encoder's too.
    """
    v = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, global_attn_indexes=[1, 2], window_size=14)
    v.update(vision)
    return SamHQConfig(
        vision_config=SamHQVisionConfig(**v),
        prompt_encoder_config=SamHQPromptEncoderConfig(image_size=v.get("image_size", 1024)),
        mask_decoder_config=SamHQMaskDecoderConfig(vit_dim=v["hidden_size"]),
    )


def random_model(seed: int = 3, **vision) -> SamHQModel:
    """A `small_config(**vision)` model with every weight drawn from `seed` (perturb_), in eval mode."""
    return perturb_(SamHQModel(small_config(**vision)), seed=seed).eval()


def gap_threshold(scores: torch.Tensor) -> float:
    """A threshold between two middle scores, in their widest gap: fp32 rounding cannot move a score across it."""
    v = scores.flatten().sort().values
    lo = len(v) // 4
    k = lo + int((v[lo + 1:len(v) - lo] - v[lo:len(v) - lo - 1]).argmax())
    return float(v[k] + v[k + 1]) / 2


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to n inside the block, put back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def small_model() -> SamHQModel:
    return random_model()


@pytest.fixture(autouse=True)
def _grad_mode(request):
    """Grad mode per test: off where the module sets NO_GRAD = True, on otherwise (never leaking between modules)."""
    with torch.set_grad_enabled(not getattr(request.module, "NO_GRAD", False)):
        yield
