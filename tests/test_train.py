"""Training: loss goes down, recipes train only their parameters, exact resume, prompts, forward(labels=...), CLI."""
import json

import numpy as np
import pytest
import torch

from samhq import SamHQConfig, SamHQModel
from samhq.cli import main as cli_main
from samhq.config import SamHQMaskDecoderConfig, SamHQPromptEncoderConfig, SamHQVisionConfig
from samhq.data.synthetic import SyntheticShapes
from samhq.modeling.losses import segmentation_loss
from samhq.modeling.prompt_encoder import PAD_LABEL
from samhq.train import TrainConfig, Trainer, init_weights, set_trainable
from samhq.train.prompts import noisy_box, sample_points, sample_prompts
from samhq.train.trainer import lr_factor

from conftest import torch_threads


def tiny_config() -> SamHQConfig:
    """128 input, 8x8 embedding grid, 32x32 masks: a training step in well under a second."""
    return SamHQConfig(
        vision_config=SamHQVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=128,
                                        window_size=4, global_attn_indexes=[1], output_channels=32, num_pos_feats=16),
        prompt_encoder_config=SamHQPromptEncoderConfig(hidden_size=32, image_size=128),
        mask_decoder_config=SamHQMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2,
                                                   iou_head_hidden_dim=32, vit_dim=32),
    )


def tiny_model(seed=0) -> SamHQModel:
    torch.manual_seed(seed)
    return init_weights(SamHQModel(tiny_config()), seed=seed)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_loss_decreases(tmp_path):
    data = SyntheticShapes(2, 64, seed=5)
    cfg = TrainConfig(recipe="full", steps=25, batch_size=2, masks_per_image=2, lr=1e-2, warmup_steps=2, prompt_mix=(1, 0, 0),
                      progress=False, save_every=100)
    trainer = Trainer(tiny_model(), data, cfg, tmp_path)
    with torch.no_grad():
        before = trainer.compute_loss(0)[0].item()  # the same images and prompts before and after
    trainer.train(save_final=False)
    with torch.no_grad():
        after = trainer.compute_loss(0)[0].item()
    assert after < 0.75 * before


@pytest.mark.parametrize("recipe", ["hq", "decoder"])
def test_recipe_changes_only_its_parameters(tmp_path, recipe):
    model = tiny_model()
    start = _params(model)
    cfg = TrainConfig(recipe=recipe, steps=2, batch_size=2, masks_per_image=2, lr=1e-2, progress=False, save_every=100)
    Trainer(model, SyntheticShapes(4, 64, seed=1), cfg, tmp_path).train(save_final=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    if recipe == "hq":
        expected = set(model.hq_parameter_names())
        # the HQ token, its MLP and the three fusion convolution stacks, nothing else
        assert {n.split(".")[1] for n in expected} == {
            "hq_token", "hq_mask_mlp", "compress_vit_conv1", "compress_vit_norm", "compress_vit_conv2",
            "encoder_conv1", "encoder_norm", "encoder_conv2", "mask_conv1", "mask_norm", "mask_conv2"}
        assert changed == expected
    else:
        # the whole decoder may change (multimask tokens that never were the best keep their biases)
        assert changed <= {n for n in start if n.startswith("mask_decoder.")}
        assert {"mask_decoder.iou_token.weight", "mask_decoder.hq_token.weight", "mask_decoder.mask_conv1.weight"} <= changed
        assert any(n.startswith("mask_decoder.transformer.") for n in changed)


def test_set_trainable_counts():
    model = tiny_model()
    hq = set_trainable(model, "hq")
    assert all(p.requires_grad == (n in hq) for n, p in model.named_parameters())
    assert 0 < len(hq) < len(set_trainable(model, "decoder")) < len(set_trainable(model, "full"))
    with pytest.raises(ValueError, match="recipe"):
        set_trainable(model, "everything")


@pytest.mark.parametrize("recipe", ["full", "hq"])
def test_resume_is_bit_identical(tmp_path, recipe):
    data = SyntheticShapes(6, 64, seed=2)
    cfg = dict(recipe=recipe, steps=4, batch_size=2, masks_per_image=2, lr=5e-3, warmup_steps=1, save_every=2,
               log_every=1, progress=False, point_loss=True, num_points=64)
    straight = Trainer(tiny_model(), data, TrainConfig(**cfg), tmp_path / "a")
    straight.train(save_final=False)

    first = Trainer(tiny_model(), data, TrainConfig(**cfg), tmp_path / "b")
    first.train(steps=2, save_final=False)
    del first
    resumed = Trainer(tiny_model(), data, TrainConfig(**cfg), tmp_path / "b")  # a fresh process would do this
    resumed.train(resume=True, save_final=False)
    assert resumed.step == 4
    for (n, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    logs = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    assert [(r["loss"], r["lr"]) for r in logs[0]] == [(r["loss"], r["lr"]) for r in logs[1]]


def test_checkpoints_are_pruned_and_load_weights_only(tmp_path):
    cfg = TrainConfig(recipe="hq", steps=3, batch_size=1, save_every=1, keep_checkpoints=2, progress=False)
    trainer = Trainer(tiny_model(), SyntheticShapes(2, 64), cfg, tmp_path)
    trainer.train()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000002.pt", "step-0000003.pt"]
    state = torch.load(tmp_path / "checkpoints" / names[-1], weights_only=True)
    assert state["step"] == 3 and set(state["model"]) == set(trainer.trainable)
    assert (tmp_path / "model" / "model.safetensors").exists()
    loaded = SamHQModel.from_pretrained(tmp_path / "model")
    for (n, p), q in zip(trainer.model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), n


def test_lr_schedule_by_hand():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_train_config_validation():
    with pytest.raises(ValueError, match="recipe"):
        TrainConfig(recipe="lora")
    with pytest.raises(ValueError, match="outputs"):
        TrainConfig(recipe="hq", outputs="sam")
    with pytest.raises(ValueError, match="unknown training options"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="prompt_mix"):
        TrainConfig(prompt_mix=(0, 0, 0))
    with pytest.raises(ValueError, match="coarse_factor"):
        TrainConfig(targets="coarse", coarse_factor=0)
    assert TrainConfig(recipe="full").outputs == "both"


def test_coarse_targets_use_the_configured_coarsening(tmp_path):
    from samhq.data.synthetic import coarsen
    from samhq.train.data import preprocess_masks

    data = SyntheticShapes(1, 64, seed=2, objects_per_image=(2, 2))
    fine = [m for m in data[0]["masks"]]
    for radius, factor in ((None, 4), (1, 1)):
        cfg = TrainConfig(recipe="full", targets="coarse", coarse_radius=radius, coarse_factor=factor, progress=False)
        _, masks = Trainer(tiny_model(), data, cfg, tmp_path)._sample(0, np.random.default_rng(0))
        expected = preprocess_masks([coarsen(m, radius, factor) for m in fine], 128)
        assert torch.equal(masks, expected)
    assert not torch.equal(preprocess_masks([coarsen(m, 1, 1) for m in fine], 128),
                           preprocess_masks([coarsen(m) for m in fine], 128))


def test_prompt_sampling():
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 50), bool)
    mask[10:20, 5:30] = True
    mask[12:18, 10:20] = False  # a hole: negatives can fall there
    for _ in range(20):
        x0, y0, x1, y1 = noisy_box(mask, rng)
        assert 0 <= x0 <= x1 <= 49 and 0 <= y0 <= y1 <= 39
        assert abs(x0 - 5) <= 20 and abs(y1 - 19) <= 20
        pts, labels = sample_points(mask, rng, 3, 3, negative_prob=1.0)
        xy = pts.astype(int)
        assert (mask[xy[labels == 1, 1], xy[labels == 1, 0]]).all()
        assert (~mask[xy[labels == 0, 1], xy[labels == 0, 0]]).all()
        assert 1 <= (labels == 1).sum() <= 3 and 1 <= (labels == 0).sum() <= 3
    masks = torch.from_numpy(np.stack([mask, ~mask]))
    p = sample_prompts(masks, "point", rng, 16, max_points=4)
    assert p["input_points"].shape[:2] == (1, 2) and p["input_labels"].shape == p["input_points"].shape[:3]
    assert set(p["input_labels"].unique().tolist()) <= {0, 1, PAD_LABEL}
    assert sample_prompts(masks, "box", rng, 16)["input_boxes"].shape == (1, 2, 4)
    logits = sample_prompts(masks, "mask", rng, 16)["input_masks"]
    assert logits.shape == (1, 2, 16, 16)
    with pytest.raises(ValueError, match="prompt kind"):
        sample_prompts(masks, "scribble", rng, 16)


def test_forward_with_labels_returns_backpropagating_loss():
    model = tiny_model()
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 128, 128)
    boxes = torch.tensor([[[10.0, 10, 60, 70]], [[30.0, 20, 100, 90]]])
    labels = torch.zeros(2, 32, 32)
    labels[0, 3:17, 3:15] = 1
    labels[1, 5:22, 8:25] = 1
    out = model(pixel_values=pixels, input_boxes=boxes, labels=labels, multimask_output=False)
    assert out.loss.ndim == 0
    torch.testing.assert_close(out.loss, segmentation_loss(out.pred_masks, labels))
    out.loss.backward()
    assert model.mask_decoder.hq_token.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.vision_encoder.parameters())
    # full-size labels (the processor's segmentation maps) work too: logits are upsampled to them
    big = torch.nn.functional.interpolate(labels[:, None], size=(128, 128))[:, 0]
    assert model(pixel_values=pixels, input_boxes=boxes, labels=big).loss.ndim == 0


def test_processor_segmentation_maps_give_a_loss(small_model):
    processing = pytest.importorskip("samhq.processing")
    if not hasattr(processing, "SamHQProcessor"):
        pytest.skip("samhq.processing has no SamHQProcessor yet")
    processor = processing.SamHQProcessor()
    item = SyntheticShapes(1, 96, seed=3)[0]
    mask = item["masks"][0]
    ys, xs = np.nonzero(mask)
    box = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    inputs = processor(images=item["image"], input_boxes=[[box]], segmentation_maps=mask.astype(np.uint8),
                       return_tensors="pt")
    assert "labels" in inputs
    small_model.train()
    out = small_model(**inputs, multimask_output=False)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert small_model.mask_decoder.hq_token.weight.grad.abs().sum() > 0


def test_cli_train(tmp_path):
    cfg_file = tmp_path / "model.json"
    tiny_config().to_json_file(cfg_file)
    out = tmp_path / "run"
    args = ["train", "--model-config", str(cfg_file), "--data", "synthetic:4:64:0", "--recipe", "full",
            "--steps", "2", "--batch-size", "2", "--output", str(out), "--no-progress", "--threads", "1"]
    assert cli_main(args) == 0
    assert (out / "model" / "config.json").exists() and (out / "metrics.jsonl").exists()
    assert cli_main(args) == 2  # the output exists: refuse without --resume / --force
    assert cli_main(args + ["--resume"]) == 0  # already at step 2: nothing to do
    yaml_cfg = tmp_path / "train.yaml"
    yaml_cfg.write_text(f"recipe: hq\nsteps: 1\nbatch_size: 1\nmodel: {out / 'model'}\ndata: synthetic:2:64:1\n"
                        f"output: {tmp_path / 'run2'}\nprogress: false\n")
    assert cli_main(["train", "--config", str(yaml_cfg)]) == 0
    assert (tmp_path / "run2" / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("bad, message", [
    (["--data", "synthetic:x"], "synthetic:NUM"),
    (["--data", "/nonexistent/folder"], "no such file"),
    (["--data", "synthetic:2:64", "--steps", "0"], "steps must be at least 1"),
])
def test_cli_train_bad_input(tmp_path, capsys, bad, message):
    cfg_file = tmp_path / "model.json"
    tiny_config().to_json_file(cfg_file)
    args = ["train", "--model-config", str(cfg_file), "--output", str(tmp_path / "run"), "--steps", "1"] + bad
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_mask_only_prompts_for_several_masks():
    """Noisy-mask prompts alone, P per image (as the trainer samples them), equal P one-by-one calls."""
    model = tiny_model().eval()
    torch.manual_seed(1)
    emb, inter = model.get_image_embeddings(torch.randn(1, 3, 128, 128))
    hq = model.compute_hq_features(emb, inter)
    masks_in = torch.randn(1, 2, 32, 32) * 4
    with torch.no_grad():
        together, iou = model.predict_all(emb, hq, input_masks=masks_in)
        one = [model.predict_all(emb, hq, input_masks=masks_in[:, k:k + 1])[0] for k in range(2)]
    assert together.shape == (1, 2, 5, 32, 32) and iou.shape == (1, 2, 4)
    torch.testing.assert_close(together, torch.cat(one, dim=1), atol=1e-5, rtol=1e-5)


def test_hq_recipe_starts_from_plain_sam(tmp_path):
    """The paper's setting: SAM weights without HQ parts; the trainer turns the HQ branch on and trains it."""
    model = tiny_model()
    model.hq_enabled = False  # as load_model leaves a plain SAM checkpoint
    start = _params(model)
    cfg = TrainConfig(recipe="hq", steps=1, batch_size=1, progress=False, save_every=10)
    Trainer(model, SyntheticShapes(2, 64), cfg, tmp_path).train(save_final=False)
    assert model.hq_enabled
    assert not torch.equal(model.mask_decoder.hq_token.weight, start["mask_decoder.hq_token.weight"])
