"""SAM 2 checkpoints: Meta's official layout for every Hiera size (full size, built on the meta device
from Meta's own YAML configs), variant detection, transformers' `Sam2Model` layout (its own model
loads our directories and we load its), round trips, and clear errors for bad files."""
import json

import pytest
import torch

from samhq import checkpoints_sam2 as ckpt
from samhq.checkpoints import CheckpointError
from samhq.config_sam2 import SAM2_VARIANTS, SamHQ2Config, SamHQ2HieraConfig
from samhq.modeling.sam2 import SamHQ2Model, load_sam2_model

from official_ref import perturb_
from sam2_ref import (
    SMALL_IMAGE_SIZE,
    TOL,
    build_sam2_image_model,
    load_sam2,
    meta_state,
    official_hq_tensors,
    our_config,
    prompts,
    rel_err,
    save_official,
    small_hiera,
)

sam2 = load_sam2()
needs_sam2 = pytest.mark.skipif(sam2 is None, reason="sam2 (and hydra-core) are not installed")
NO_GRAD = True

YAML = {"hiera_t": "t", "hiera_s": "s", "hiera_b+": "b+", "hiera_l": "l"}
# Video tensors of a SAM 2.1 checkpoint (names as Meta's SAM2Base has them); the image model keeps them aside.
VIDEO = {"memory_attention.layers.0.self_attn.q_proj.weight": (256, 256), "memory_encoder.out_proj.weight": (64, 256, 1, 1),
         "maskmem_tpos_enc": (7, 1, 1, 64), "no_mem_pos_enc": (1, 1, 256), "no_obj_ptr": (1, 256),
         "obj_ptr_proj.layers.0.weight": (256, 256), "obj_ptr_tpos_proj.weight": (64, 256),
         "mask_downsample.weight": (1, 1, 4, 4),
         "no_obj_embed_spatial": (1, 64)}


def expected_shapes(config: SamHQ2Config) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in SamHQ2Model(config).state_dict().items()}


@needs_sam2
@pytest.mark.parametrize("version", ["sam2.1/sam2.1", "sam2/sam2"])
@pytest.mark.parametrize("variant", list(SAM2_VARIANTS))
def test_full_size_official_keys_and_variant_detection(variant, version):
    state = meta_state(f"configs/{version}_hiera_{YAML[variant]}.yaml")
    image, video = ckpt.official_to_ours(state)
    assert video and all(ckpt.is_video_key(k) for k in video)
    assert any(k.startswith("memory_attention.") for k in video) and "maskmem_tpos_enc" in video
    config = ckpt.infer_config(image)
    assert config.variant == variant
    assert ckpt.check_state(image, expected_shapes(config), "meta", variant) is False  # no HQ tensors
    back = ckpt.ours_to_official({k: v for k, v in image.items()}, video)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in state.items()}


@needs_sam2
def test_full_size_hq_hiera_l_keys():
    """SAM 2.1 Hiera-L plus the HQ tensors sam-hq2's MaskDecoderHQ adds (sam2.1_hq_hiera_large.pt's layout)."""
    state = {**meta_state("configs/sam2.1/sam2.1_hiera_l.yaml"), **official_hq_tensors()}
    image, _ = ckpt.official_to_ours(state)
    config = ckpt.infer_config(image)
    assert config.variant == "hiera_l"
    assert ckpt.check_state(image, expected_shapes(config), "meta", "hiera_l") is True


@pytest.mark.parametrize("variant", list(SAM2_VARIANTS))
def test_full_size_transformers_keys(variant):
    """Our names map onto transformers' Sam2Model names and shapes exactly, for every size (meta device)."""
    transformers = pytest.importorskip("transformers")
    config = SamHQ2Config.from_variant(variant)
    with torch.device("meta"):
        theirs = transformers.Sam2Model(transformers.Sam2Config.from_dict(ckpt.config_to_transformers(config)))
        ours = SamHQ2Model(config)
    mapped = ckpt.ours_to_transformers({k: v for k, v in ours.state_dict().items() if not ckpt.is_hq_parameter(k)})
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ckpt.config_from_transformers(json.loads(theirs.config.to_json_string())).to_dict() == config.to_dict()


@pytest.mark.parametrize("variant", ["hiera_t", "hiera_l"])
def test_full_size_transformers_video_checkpoint_keys(variant):
    """A hub checkpoint is transformers' Sam2VideoModel state dict: its image part loads, its video part is kept aside."""
    transformers = pytest.importorskip("transformers")
    config = SamHQ2Config.from_variant(variant)
    data = ckpt.config_to_transformers(config)
    with torch.device("meta"):
        video_model = transformers.Sam2VideoModel(transformers.Sam2VideoConfig(
            vision_config=data["vision_config"], prompt_encoder_config=data["prompt_encoder_config"],
            mask_decoder_config=data["mask_decoder_config"]))
        image_model = transformers.Sam2Model(transformers.Sam2Config.from_dict(data))
    state = video_model.state_dict()
    image, video = ckpt.transformers_to_ours(state)
    assert set(video) == set(state) - set(image_model.state_dict())
    assert ckpt.check_state(image, expected_shapes(config), "meta", variant) is False


# ---------------------------------------------------------------------------------------------
# Round trips on small perturbed models


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    """A small perturbed SAM 2.1 (Hiera-S structure) as an official checkpoint with video tensors, and its config."""
    if sam2 is None:
        pytest.skip("sam2 is not installed")
    hiera = small_hiera("hiera_s")
    torch.manual_seed(0)
    ref = perturb_(build_sam2_image_model(hiera, image_size=SMALL_IMAGE_SIZE), seed=6)
    g = torch.Generator().manual_seed(1)
    video = {k: torch.randn(s, generator=g) for k, s in VIDEO.items()}
    path = save_official(ref, tmp_path_factory.mktemp("official"), our_config(hiera), extra=video)
    return path, ref


def _decode(model, name="box_and_point"):
    x = torch.randn(1, 3, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    emb, high_res = model.get_image_embeddings(x)
    p = prompts(SMALL_IMAGE_SIZE)[name]
    return model.predict_all(emb, high_res, input_points=p["points"][0][None], input_labels=p["points"][1][None],
                             input_boxes=p["boxes"][None])


def test_official_round_trip_keeps_video_tensors(official_dir, tmp_path):
    path, _ = official_dir
    model = load_sam2_model(path)
    assert set(model.video_state) == set(VIDEO) and not model.hq_enabled
    original = torch.load(path / "model.pt", weights_only=True)["model"]
    model.save_official(tmp_path / "again.pt")
    again = torch.load(tmp_path / "again.pt", weights_only=True)["model"]
    assert set(again) == set(original)
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_official_to_transformers_and_back(official_dir, tmp_path):
    path, _ = official_dir
    model = load_sam2_model(path)
    with pytest.warns(UserWarning, match="video-module tensors came in the official layout"):
        model.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "sam2"
    reloaded = load_sam2_model(tmp_path / "hf")
    assert reloaded.config.to_dict() == model.config.to_dict() and not reloaded.hq_enabled
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    reloaded.save_official(tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)["model"]
    original = torch.load(path / "model.pt", weights_only=True)["model"]
    assert set(back) == {k for k in original if k not in VIDEO}  # the transformers layout holds no video tensors
    assert all(torch.equal(back[k], original[k]) for k in back)


def test_transformers_video_tensors_round_trip(official_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = official_dir
    with pytest.warns(UserWarning):
        load_sam2_model(path).save_pretrained(tmp_path / "hf")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    video = {"memory_attention.layers.0.self_attn.q_proj.weight": torch.randn(256, 256), "no_object_pointer": torch.randn(1, 256),
             "object_pointer_proj.proj_in.weight": torch.randn(256, 256)}
    save_file({**tensors, **video}, str(tmp_path / "hf" / "model.safetensors"))
    model = load_sam2_model(tmp_path / "hf")
    assert model.video_layout == "transformers" and set(model.video_state) == set(video)
    model.save_pretrained(tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(again) == set(tensors) | set(video) and all(torch.equal(again[k], v) for k, v in video.items())
    with pytest.warns(UserWarning, match="not written to the official one"):
        model.save_official(tmp_path / "x.pt")
    assert not any(ckpt.is_video_key(k) for k in torch.load(tmp_path / "x.pt", weights_only=True)["model"])


def test_hq_round_trips(official_dir, tmp_path):
    path, ref = official_dir
    hq = official_hq_tensors()
    src = save_official(ref, tmp_path / "hq", SamHQ2Config.from_json_file(path / "config.json"), extra=hq)
    model = load_sam2_model(src)
    assert model.hq_enabled
    masks, iou, _ = _decode(model)
    assert masks.shape[2] == 5
    with pytest.warns(UserWarning):
        model.save_pretrained(tmp_path / "hf")
    via_hf = load_sam2_model(tmp_path / "hf")
    assert via_hf.hq_enabled
    m2, i2, _ = _decode(via_hf)
    assert torch.equal(masks, m2) and torch.equal(iou, i2)
    via_hf.save_official(tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)["model"]
    assert all(torch.equal(back[k], v) for k, v in hq.items())


def test_safetensors_official_file(official_dir, tmp_path):
    from safetensors.torch import save_file

    path, _ = official_dir
    state = torch.load(path / "model.pt", weights_only=True)["model"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "sam2.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    model = load_sam2_model(tmp_path)
    reference = load_sam2_model(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_transformers_loads_our_directory_and_agrees(official_dir, tmp_path):
    """transformers' own Sam2Model loads our saved directory with no missing or unexpected keys and gives the same outputs."""
    transformers = pytest.importorskip("transformers")
    path, _ = official_dir
    model = load_sam2_model(path)
    model.video_state = {}  # the official checkpoint's video tensors have no transformers names here
    model.save_pretrained(tmp_path)
    theirs, info = transformers.Sam2Model.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    theirs.eval()
    x = torch.randn(1, 3, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    p = prompts(SMALL_IMAGE_SIZE)
    points, labels = p["points"]["points"]
    for kw in (dict(input_points=points[None], input_labels=labels[None]), dict(input_boxes=p["three_boxes"]["boxes"][None])):
        for multimask in (True, False):
            ref = theirs(pixel_values=x, multimask_output=multimask, **kw)
            out = model(pixel_values=x, multimask_output=multimask, **kw)
            assert rel_err(out.pred_masks, ref.pred_masks) < TOL
            assert rel_err(out.iou_scores, ref.iou_scores, floor=1.0) < TOL
            assert rel_err(out.object_score_logits, ref.object_score_logits, floor=1.0) < TOL


def test_we_load_transformers_save_pretrained(tmp_path):
    """A directory written by transformers' Sam2Model.save_pretrained (small random model) loads and agrees with it."""
    transformers = pytest.importorskip("transformers")
    config = our_config(small_hiera("hiera_b+"))
    torch.manual_seed(0)
    theirs = perturb_(transformers.Sam2Model(transformers.Sam2Config.from_dict(ckpt.config_to_transformers(config))), seed=9)
    theirs.prompt_encoder.shared_embedding.positional_embedding.copy_(theirs.shared_image_embedding.positional_embedding)
    theirs.eval().save_pretrained(tmp_path)
    model = load_sam2_model(tmp_path)
    assert model.config.to_dict() == config.to_dict()
    x = torch.randn(1, 3, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE, generator=torch.Generator().manual_seed(4))
    pts = prompts(SMALL_IMAGE_SIZE)["three_prompts"]["points"]
    ref = theirs(pixel_values=x, input_points=pts[0][None], input_labels=pts[1][None])
    out = model(pixel_values=x, input_points=pts[0][None], input_labels=pts[1][None])
    assert rel_err(out.pred_masks, ref.pred_masks) < TOL
    assert rel_err(out.iou_scores, ref.iou_scores, floor=1.0) < TOL


def test_bfloat16_encoder(official_dir):
    path, _ = official_dir
    model = load_sam2_model(path, dtype=torch.bfloat16)
    assert model.encoder_dtype == torch.bfloat16 and model.dtype == torch.float32
    masks, iou, obj = _decode(model)
    assert masks.dtype == torch.float32 and torch.isfinite(masks).all()


# ---------------------------------------------------------------------------------------------
# Bad files and configs


def test_damaged_and_foreign_files(official_dir, tmp_path):
    path, _ = official_dir
    blob = (path / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_sam2_model(tmp_path / "cut.pt")
    (tmp_path / "noise.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_sam2_model(tmp_path / "noise.pt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_sam2_model(tmp_path / "cut.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_sam2_model(tmp_path / "list.pt")
    torch.save({"model": {"a": torch.zeros(1)}, "extra": Exception("pickled")}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_sam2_model(tmp_path / "pickled.pt")
    torch.save({"image_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 1)}, tmp_path / "v1.pth")
    with pytest.raises(CheckpointError, match="SamHQModel.from_pretrained"):
        load_sam2_model(tmp_path / "v1.pth")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_sam2_model(tmp_path / "x.txt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_sam2_model(tmp_path / "missing.pt")


def _variant_of(path, tmp_path, edit, name="edited"):
    state = torch.load(path / "model.pt", weights_only=True)["model"]
    edit(state)
    d = tmp_path / name
    d.mkdir()
    torch.save({"model": state}, d / "model.pt")
    (d / "config.json").write_text((path / "config.json").read_text())
    return d


def test_mismatched_checkpoints(official_dir, tmp_path):
    path, _ = official_dir
    bad_shape = _variant_of(path, tmp_path, lambda s: s.update({"sam_mask_decoder.iou_token.weight": torch.zeros(1, 128)}),
                            "shape")
    with pytest.raises(CheckpointError, match="shapes disagree.*iou_token"):
        load_sam2_model(bad_shape)
    missing = _variant_of(path, tmp_path, lambda s: s.pop("sam_mask_decoder.conv_s0.weight"), "missing")
    with pytest.raises(CheckpointError, match="missing mask_decoder.conv_s0.weight"):
        load_sam2_model(missing)
    extra = _variant_of(path, tmp_path, lambda s: s.update({"sam_mask_decoder.surprise": torch.zeros(1)}), "extra")
    with pytest.raises(CheckpointError, match="unexpected mask_decoder.surprise"):
        load_sam2_model(extra)
    partial = official_hq_tensors()
    partial.pop("sam_mask_decoder.hf_token.weight")
    some_hq = _variant_of(path, tmp_path, lambda s: s.update(partial), "partial_hq")
    with pytest.raises(CheckpointError, match="some HQ-SAM 2 tensors"):
        load_sam2_model(some_hq)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.pt").write_bytes((path / "model.pt").read_bytes())
    with pytest.raises(CheckpointError, match="matches none of the SAM 2.1 presets"):
        load_sam2_model(no_config / "model.pt")
    (no_config / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON config"):
        load_sam2_model(no_config)
    (no_config / "config.json").write_text(json.dumps({"model_type": "sam"}))
    with pytest.raises(CheckpointError, match="model_type 'sam'"):
        load_sam2_model(no_config)
    (no_config / "config.json").unlink()
    (no_config / "other.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="exactly one"):
        load_sam2_model(no_config)


def test_writers_refuse_to_overwrite_and_unsupported_layouts(official_dir, tmp_path):
    path, _ = official_dir
    model = load_sam2_model(path)
    model.save_official(tmp_path / "a.pt")
    with pytest.raises(FileExistsError):
        model.save_official(tmp_path / "a.pt")
    model.video_state = {}
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "hf", overwrite=False)
    config = our_config(small_hiera("hiera_t"), pred_obj_scores_mlp=False)
    with pytest.raises(CheckpointError, match="pred_obj_scores_mlp"):
        ckpt.config_to_transformers(config)


def test_config_json_round_trip_and_validation(tmp_path):
    for name in SAM2_VARIANTS:
        config = SamHQ2Config.from_variant(name)
        config.to_json_file(tmp_path / f"{name}.json")
        again = SamHQ2Config.from_json_file(tmp_path / f"{name}.json")
        assert again.to_dict() == config.to_dict() and again.variant == name
    assert SamHQ2Config.from_variant("hiera_l").vision_config.feature_sizes == [256, 128, 64]
    with pytest.raises(ValueError, match="unknown SAM 2 variant"):
        SamHQ2Config.from_variant("hiera_xl")
    with pytest.raises(ValueError, match="model_type"):
        SamHQ2Config.from_dict({"model_type": "sam_hq"})
    with pytest.raises(ValueError, match="same length"):
        SamHQ2HieraConfig(stages=[1, 2, 3], window_spec=[8, 4, 14, 7])
    with pytest.raises(ValueError, match="not divisible"):
        SamHQ2HieraConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="global_att_blocks"):
        SamHQ2HieraConfig(global_att_blocks=[12])
    with pytest.raises(ValueError, match="window_spec"):
        SamHQ2HieraConfig(image_size=1000)
    with pytest.raises(ValueError, match="must agree"):
        SamHQ2Config(vision_config=SamHQ2HieraConfig(d_model=128))
