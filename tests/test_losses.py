"""Mask losses against hand computations and torch's reference functions."""
import math

import pytest
import torch
from torch.nn import functional as F

from samhq.modeling.losses import (
    bce_loss,
    dice_loss,
    iou_prediction_loss,
    mask_losses,
    sample_at,
    segmentation_loss,
    uncertain_points,
)


def test_dice_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # p = 0.5 everywhere
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # 1 - (2 * 1 + 1) / (2 + 2 + 1)
    assert dice_loss(logits, targets).item() == pytest.approx(1 - 3 / 5)
    big = torch.tensor([[30.0, 30.0, -30.0, -30.0]])
    assert dice_loss(big, targets).item() == pytest.approx(0.0, abs=1e-6)


def test_bce_matches_torch():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 10, generator=g), (torch.rand(3, 10, generator=g) > 0.5).float()
    ref = torch.stack([F.binary_cross_entropy(torch.sigmoid(x[i]), t[i]) for i in range(3)])
    torch.testing.assert_close(bce_loss(x, t), ref)
    assert bce_loss(torch.zeros(1, 4), torch.ones(1, 4)).item() == pytest.approx(math.log(2))


def test_sample_at_pixel_centres_is_exact():
    maps = torch.arange(12.0).view(1, 3, 4)
    coords = torch.tensor([[[(x + 0.5) / 4, (y + 0.5) / 3] for y in range(3) for x in range(4)]])
    torch.testing.assert_close(sample_at(maps, coords), torch.arange(12.0)[None])


def test_uncertain_points_prefer_small_logits():
    logits = torch.full((1, 16, 16), 10.0)
    logits[0, :, 8:] = 0.0  # the right half is uncertain
    pts = uncertain_points(logits, 40, generator=torch.Generator().manual_seed(0))
    assert pts.shape == (1, 40, 2) and ((pts >= 0) & (pts <= 1)).all()
    chosen = pts[0, :30]  # the importance share
    assert (chosen[:, 0] > 0.45).float().mean() > 0.9


def test_dense_loss_upsamples_logits():
    target = torch.zeros(1, 8, 8)
    target[:, :, :4] = 1
    logits = torch.full((1, 4, 4), -20.0)
    logits[:, :, :2] = 20.0
    assert mask_losses(logits, target).item() < 1e-3
    assert mask_losses(-logits, target).item() > 10


def test_point_sampled_loss_ranks_predictions_and_backpropagates():
    g = torch.Generator().manual_seed(1)
    target = (F.interpolate(torch.randn(2, 1, 4, 4, generator=g), size=(32, 32), mode="bilinear")[:, 0] > 0).float()
    good = (target * 8 - 4).requires_grad_()
    wrong = -target * 8 + 4
    sampled = mask_losses(good, target, point_sampled=True, num_points=500, generator=g)
    assert sampled.shape == (2,)
    assert (sampled < mask_losses(wrong, target, point_sampled=True, num_points=500, generator=g)).all()
    sampled.sum().backward()
    assert good.grad.abs().sum() > 0


def test_segmentation_loss_takes_best_mask_and_label_layouts():
    target = torch.zeros(1, 8, 8)
    target[:, 2:6, 2:6] = 1
    good = (target * 40 - 20)[:, None, None]  # (B, P, 1, h, w)
    bad = -good
    both = torch.cat([bad, good], dim=2)  # (1, 1, 2, 8, 8)
    best = segmentation_loss(both, target)
    assert best.item() == pytest.approx(segmentation_loss(good, target).item())
    assert best.item() < segmentation_loss(bad, target).item()
    for labels in (target, target[:, None], target[:, None, None]):
        assert segmentation_loss(good, labels).item() == pytest.approx(best.item())
    with pytest.raises(ValueError, match="labels"):
        segmentation_loss(good, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="pred_masks"):
        segmentation_loss(good[0], target)


def test_iou_prediction_loss_by_hand():
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, :2, :2] = True  # 4 pixels
    m0 = torch.full((4, 4), -5.0)
    m0[:2, :2] = 5  # IoU 1
    m1 = torch.full((4, 4), -5.0)
    m1[:2, :] = 5  # 8 pixels, IoU 0.5
    logits = torch.stack([m0, m1])[None]
    pred = torch.tensor([[0.8, 0.5]])
    assert iou_prediction_loss(pred, logits, target).item() == pytest.approx(((0.8 - 1) ** 2 + 0) / 2)


def test_integer_labels_are_binarised_and_bad_floats_refused():
    target = torch.zeros(1, 8, 8)
    target[:, 2:6, 2:6] = 1
    logits = (target * 10 - 5)[:, None, None]
    ref = segmentation_loss(logits, target)
    assert segmentation_loss(logits, (target * 255).to(torch.uint8)).item() == pytest.approx(ref.item())
    assert segmentation_loss(logits, target.bool()).item() == pytest.approx(ref.item())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        segmentation_loss(logits, target * 255)
