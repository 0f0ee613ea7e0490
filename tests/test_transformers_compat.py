"""Compatibility with transformers' API: transformers' `SamHQModel` (transformers >= 5).

transformers differs from the official SAM-HQ code (which trained the checkpoints) in two places,
both pinned down here so we notice if it changes:
  1. its mask decoder upscales the image embeddings from *before* the two-way transformer (with
     height and width swapped) instead of the transformer's output;
  2. its two-way attention blocks use LayerNorm eps 1e-6 where the official code uses 1e-5.
With both corrected by a test-only patch, its outputs equal ours.
"""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
from transformers import SamHQModel as HFSamHQModel  # noqa: E402

from samhq import SamHQModel  # noqa: E402

NO_GRAD = True  # conftest runs this module's tests without autograd


def _patch_like_official(hf):
    """Make transformers' decoder compute masks as the official code does (test-only)."""
    dec = hf.mask_decoder
    for layer in dec.transformer.layers:
        for norm in (layer.layer_norm1, layer.layer_norm2, layer.layer_norm3, layer.layer_norm4):
            norm.eps = 1e-5
    store = {}
    forward = dec.transformer.forward

    def transformer_forward(*args, **kwargs):
        queries, keys = forward(*args, **kwargs)
        store["keys"] = keys
        return queries, keys

    dec.transformer.forward = transformer_forward

    class FromTransformerOutput(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv

        def forward(self, ignored):
            keys = store["keys"]  # (B, P, HW, C)
            keys = keys.reshape(-1, *keys.shape[-2:])
            side = math.isqrt(keys.shape[1])
            return self.conv(keys.transpose(1, 2).reshape(keys.shape[0], -1, side, side))

    dec.upscale_conv1 = FromTransformerOutput(dec.upscale_conv1)
    return hf


def _inputs():
    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(1, 3, 1024, 1024, generator=g)
    points = torch.tensor([[[[200.0, 300.0], [700.0, 650.0]], [[512.0, 100.0], [20.0, 900.0]]]])
    labels = torch.tensor([[[1, 0], [1, -10]]])  # -10: the processor's padding
    boxes = torch.tensor([[[100.0, 150.0, 800.0, 900.0], [300.0, 50.0, 600.0, 400.0]]])
    return pixels, points, labels, boxes


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from conftest import perturb_, small_config

    torch.manual_seed(0)
    ours = perturb_(SamHQModel(small_config()), seed=11).eval()
    d = tmp_path_factory.mktemp("seed_layout")
    ours.save_pretrained(d)
    hf, info = HFSamHQModel.from_pretrained(d, output_loading_info=True)
    return ours, hf.eval(), info, d


def test_our_directory_loads_in_transformers_without_missing_or_unexpected_keys(pair):
    _, _, info, _ = pair
    assert info["missing_keys"] == [] or info["missing_keys"] == set()
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]


def test_embeddings_and_iou_scores_equal(pair):
    ours, hf, _, _ = pair
    pixels, points, labels, boxes = _inputs()
    emb, inter = ours.get_image_embeddings(pixels)
    hf_emb, hf_inter = hf.get_image_embeddings(pixels)
    torch.testing.assert_close(emb, hf_emb, rtol=1e-4, atol=1e-5)
    assert len(inter) == len(hf_inter)
    for a, b in zip(inter, hf_inter):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for kw in (dict(input_points=points, input_labels=labels), dict(input_boxes=boxes)):
        a = ours(image_embeddings=emb, intermediate_embeddings=inter, **kw)
        b = hf(image_embeddings=hf_emb, intermediate_embeddings=hf_inter, **kw)
        # IoU scores do not depend on the mask path; the LayerNorm eps difference moves them ~1e-5.
        torch.testing.assert_close(a.iou_scores, b.iou_scores, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("multimask,hq_only", [(True, False), (False, False), (True, True), (False, True)])
def test_masks_equal_once_transformers_mask_path_is_corrected(pair, multimask, hq_only):
    ours, hf, _, d = pair
    pixels, points, labels, boxes = _inputs()
    fixed = _patch_like_official(HFSamHQModel.from_pretrained(d).eval())
    for kw in (dict(input_points=points, input_labels=labels), dict(input_boxes=boxes),
               dict(input_points=points, input_labels=labels, input_boxes=boxes)):
        a = ours(pixel_values=pixels, multimask_output=multimask, hq_token_only=hq_only, **kw)
        b = fixed(pixel_values=pixels, multimask_output=multimask, hq_token_only=hq_only, **kw)
        assert a.pred_masks.shape == b.pred_masks.shape
        assert a.iou_scores.shape == b.iou_scores.shape
        torch.testing.assert_close(a.iou_scores, b.iou_scores, rtol=1e-4, atol=1e-5)
        scale = b.pred_masks.abs().max()
        assert (a.pred_masks - b.pred_masks).abs().max() / scale < 1e-4


def test_unpatched_transformers_masks_differ(pair):
    """Pins the discrepancy: if transformers fixes its mask path this fails, and the docs must change."""
    ours, hf, _, _ = pair
    pixels, points, labels, _ = _inputs()
    a = ours(pixel_values=pixels, input_points=points, input_labels=labels)
    b = hf(pixel_values=pixels, input_points=points, input_labels=labels)
    rel = (a.pred_masks - b.pred_masks).norm() / b.pred_masks.norm()
    assert rel > 0.05


def test_transformers_saved_directory_loads_and_matches(tmp_path):
    from transformers import SamHQConfig as HFConfig

    from conftest import perturb_, small_config

    torch.manual_seed(1)
    cfg = small_config().to_dict()
    hf = perturb_(HFSamHQModel(HFConfig(**{k: v for k, v in cfg.items() if k != "model_type"})), seed=12).eval()
    hf.save_pretrained(tmp_path)
    ours = SamHQModel.from_pretrained(tmp_path)
    pixels, points, labels, _ = _inputs()
    emb, inter = ours.get_image_embeddings(pixels)
    hf_emb, hf_inter = hf.get_image_embeddings(pixels)
    torch.testing.assert_close(emb, hf_emb, rtol=1e-4, atol=1e-5)
    fixed = _patch_like_official(hf)
    a = ours(image_embeddings=emb, intermediate_embeddings=inter, input_points=points, input_labels=labels)
    b = fixed(image_embeddings=hf_emb, intermediate_embeddings=hf_inter, input_points=points, input_labels=labels)
    torch.testing.assert_close(a.iou_scores, b.iou_scores, rtol=1e-4, atol=1e-5)
    assert (a.pred_masks - b.pred_masks).abs().max() / b.pred_masks.abs().max() < 1e-4
