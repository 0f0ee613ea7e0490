"""Fine-tuning HQ-SAM 2 with the HQ-only recipe (as SAM-HQ v1's), `SamHQ2Model.forward(labels=)` and
`samhq train --model` with a SAM 2 checkpoint. A tiny config (Hiera-T's structure at 8 channels per head,
128 px) trains in seconds; the checks are invariants: the same loss on the same step's batch goes down,
exactly the HQ parameters (`samhq.checkpoints.is_hq_parameter`: the HQ token, its MLP and the mask-feature
convolution, official hf_token / hf_mlp / embedding_maskfeature) change, and gradients reach only them.
"""
import numpy as np
import pytest
import torch

import samhq
from samhq.checkpoints import is_hq_parameter
from samhq.cli import main
from samhq.data import SyntheticShapes
from samhq.modeling.losses import segmentation_loss
from samhq.modeling.sam2 import SamHQ2Model
from samhq.train import TrainConfig, Trainer, set_trainable

from sam2_ref import small_model

HQ = {"mask_decoder.hq_token.weight", "mask_decoder.mask_conv1.weight", "mask_decoder.mask_conv1.bias",
      "mask_decoder.mask_norm.weight", "mask_decoder.mask_norm.bias", "mask_decoder.mask_conv2.weight",
      "mask_decoder.mask_conv2.bias"}


def tiny(hq=True, seed=1):
    return small_model(hq=hq, image_size=128, seed=seed)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_hq_recipe_trains_only_the_hq_parts(tmp_path):
    model = tiny()
    names = model.hq_parameter_names()
    assert {n for n in names if "hq_mask_mlp" not in n} == HQ and any("hq_mask_mlp" in n for n in names)
    assert names == [n for n, _ in model.named_parameters() if is_hq_parameter(n)]
    start = _state(model)
    cfg = TrainConfig(recipe="hq", steps=15, batch_size=2, masks_per_image=2, lr=3e-3, warmup_steps=2, progress=False,
                      save_every=100)
    trainer = Trainer(model, SyntheticShapes(4, 96), cfg, tmp_path)
    assert sorted(trainer.trainable) == sorted(names)
    with torch.no_grad():
        before = float(trainer.compute_loss(0)[0])
    trainer.train(save_final=True)
    with torch.no_grad():
        after = float(trainer.compute_loss(0)[0])  # the same images, prompts and labels as before training
    assert after < 0.9 * before, (before, after)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert changed == set(names)
    saved = samhq.load_model(tmp_path / "model")
    assert isinstance(saved, SamHQ2Model) and saved.hq_enabled
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in model.state_dict().items())


def test_decoder_recipe_trains_the_high_res_projections(tmp_path):
    """The frozen encoder's FPN levels are cached; conv_s0 / conv_s1 (applied to them) are decoder parameters and train."""
    model = tiny(seed=2)
    start = _state(model)
    cfg = TrainConfig(recipe="decoder", steps=2, batch_size=1, masks_per_image=1, progress=False, save_every=100)
    Trainer(model, SyntheticShapes(2, 96), cfg, tmp_path).train(save_final=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert "mask_decoder.conv_s0.weight" in changed and "mask_decoder.conv_s1.weight" in changed
    assert all(k.startswith("mask_decoder.") for k in changed)


def test_forward_with_labels_backpropagates_to_the_hq_parts():
    model = tiny(seed=3).train()
    set_trainable(model, "hq")
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 128, 128, generator=g)
    boxes = torch.tensor([[[10.0, 20.0, 90.0, 100.0]], [[30.0, 5.0, 120.0, 60.0]]])
    labels = torch.zeros(2, 1, 64, 64)
    labels[0, 0, 10:50, 5:45] = 1
    labels[1, 0, 2:30, 15:60] = 1
    out = model(pixel_values=pixels, input_boxes=boxes, labels=labels, multimask_output=False)
    assert out.loss.ndim == 0 and torch.allclose(out.loss, segmentation_loss(out.pred_masks, labels))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == is_hq_parameter(name), name
    with pytest.raises(ValueError, match="square input frame"):
        model(pixel_values=pixels, input_boxes=boxes, labels=torch.zeros(2, 64, 32))


def test_plain_sam2_gets_initialised_hq_parts(tmp_path):
    """From a plain SAM 2 checkpoint (HQ parts zero, as loaded): the trainer turns HQ on and initialises the HQ parts,
    otherwise the zero MLP and convolution would pass no gradient to their inner layers."""
    plain = tiny(hq=False, seed=4)
    plain.save_pretrained(tmp_path / "plain")
    model = samhq.load_model(tmp_path / "plain")
    assert not model.hq_enabled and all(not p.any() for n, p in model.named_parameters() if is_hq_parameter(n))
    cfg = TrainConfig(recipe="hq", steps=1, batch_size=1, masks_per_image=1, progress=False, save_every=100)
    trainer = Trainer(model, SyntheticShapes(2, 96), cfg, tmp_path / "run")
    assert model.hq_enabled and all(p.any() for n, p in model.named_parameters() if is_hq_parameter(n) and n.endswith("weight"))
    norm = model.mask_decoder.mask_norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    start = _state(model)
    trainer.train(save_final=False)
    assert not torch.equal(model.mask_decoder.hq_mask_mlp.proj_in.weight, start["mask_decoder.hq_mask_mlp.proj_in.weight"])


def test_cli_train_with_a_sam2_checkpoint(tmp_path, capsys):
    model = tiny(seed=5)
    model.save_official(tmp_path / "hq.pt")
    model.config.to_json_file(tmp_path / "config.json")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path), "--data", "synthetic:2:96", "--output", str(out), "--steps", "2",
                 "--batch-size", "1", "--masks-per-image", "1", "--no-progress", "--threads", "1"]) == 0
    assert "training" in capsys.readouterr().out
    trained = samhq.load_model(out / "model")
    assert isinstance(trained, SamHQ2Model)
    diff = {k for k, v in trained.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert diff and all(is_hq_parameter(k) for k in diff)
    model.config.to_json_file(tmp_path / "new.json")
    assert main(["train", "--model-config", str(tmp_path / "new.json"), "--recipe", "full", "--data", "synthetic:1:96",
                 "--output", str(tmp_path / "scratch"), "--steps", "1", "--batch-size", "1", "--masks-per-image", "1",
                 "--no-progress"]) == 0
    assert isinstance(samhq.load_model(tmp_path / "scratch" / "model"), SamHQ2Model)
    assert np.isfinite(json_loss(tmp_path / "scratch" / "metrics.jsonl"))


def json_loss(path):
    import json

    return json.loads(path.read_text().strip().splitlines()[-1])["loss"]
