"""Checkpoint formats: key maps both ways for every variant, variant detection, the seed layout,
plain SAM checkpoints, hub ids, and clear errors for damaged or wrong files."""
import json
import pickle
import sys

import pytest
import torch

from samhq import CheckpointError, SamHQConfig, SamHQModel, SamHQVisionModel, convert, save_official
from samhq.checkpoints import infer_config, official_to_ours, ours_to_official

from conftest import perturb_
from official_ref import load_official

sah = load_official()
needs_official = pytest.mark.skipif(sah is None, reason="segment-anything-hq is not installed")
NO_GRAD = True  # conftest runs this module's tests without autograd


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@needs_official
@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_vit_key_maps_round_trip_and_variant_detected(variant):
    with torch.device("meta"):
        official = sah.sam_model_registry[variant]().state_dict()
        ours = SamHQModel(SamHQConfig.from_variant(variant)).state_dict()
    mapped = official_to_ours(official)
    assert _shapes(mapped) == _shapes(ours)
    assert _shapes(ours_to_official(ours)) == _shapes(official)
    assert infer_config(mapped).variant == variant


@needs_official
def test_vit_tiny_key_maps_round_trip_and_variant_detected():
    official = sah.sam_model_registry["vit_tiny"]().state_dict()
    with torch.device("meta"):
        ours = SamHQModel(SamHQConfig.from_variant("vit_tiny")).state_dict()
    mapped = official_to_ours(official)
    assert _shapes(mapped) == _shapes(ours)
    # The official TinyViT carries an unused classifier head; everything else maps back.
    back = ours_to_official(ours)
    assert _shapes(back) == {k: v for k, v in _shapes(official).items() if ".head." not in k and "norm_head" not in k}
    assert infer_config(mapped).variant == "vit_tiny"


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h", "vit_tiny"])
def test_config_round_trips(variant, tmp_path):
    cfg = SamHQConfig.from_variant(variant)
    assert SamHQConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    cfg.to_json_file(tmp_path / "config.json")
    assert SamHQConfig.from_json_file(tmp_path / "config.json").variant == variant


def test_config_defaults_and_hub_config_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", minversion="5.0")
    hf = transformers.SamHQConfig()
    ours = SamHQConfig()
    for name in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
        theirs = getattr(hf, name).to_dict()
        mine = getattr(ours, name).to_dict()
        for field, value in mine.items():
            if field in theirs:
                expected = list(theirs[field]) if isinstance(theirs[field], tuple) else theirs[field]
                assert value == expected, f"{name}.{field}"
    assert ours.initializer_range == hf.initializer_range
    # A hub config.json, with all the keys transformers writes, loads unchanged.
    hf.save_pretrained(tmp_path)
    loaded = SamHQConfig.from_json_file(tmp_path / "config.json")
    assert loaded.to_dict() == ours.to_dict()
    assert loaded.variant == "vit_b"


def test_unknown_variant_and_bad_config_are_clear():
    with pytest.raises(ValueError, match="unknown variant 'vit_x'"):
        SamHQConfig.from_variant("vit_x")
    with pytest.raises(ValueError, match="vit_dim"):
        SamHQConfig(mask_decoder_config={"vit_dim": 99})
    with pytest.raises(ValueError, match="model_type"):
        SamHQConfig.from_dict({"model_type": "bert"})


def test_seed_layout_round_trip(small_model, tmp_path):
    small_model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "sam_hq" and cfg["vision_config"]["hidden_size"] == 64
    again = SamHQModel.from_pretrained(tmp_path / "m")
    for k, v in small_model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    # pytorch_model.bin works too, and so does the bare safetensors file (config inferred).
    small_model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert torch.equal(SamHQModel.from_pretrained(tmp_path / "bin").mask_decoder.hq_token.weight,
                       small_model.mask_decoder.hq_token.weight)
    single = SamHQModel.from_pretrained(tmp_path / "m" / "model.safetensors")
    assert single.config.to_dict() == small_model.config.to_dict()


def test_vision_model_loads_encoder_only(small_model, tmp_path):
    small_model.save_pretrained(tmp_path)
    vision = SamHQVisionModel.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 1024, 1024)
    out = vision(x)
    emb, inter = small_model.get_image_embeddings(x)
    assert out.last_hidden_state.shape == (1, 256, 64, 64)
    assert [t.shape for t in out.intermediate_embeddings] == [(1, 64, 64, 64)] * 2
    torch.testing.assert_close(out.last_hidden_state, emb)


@needs_official
def test_official_format_written_by_us_loads_strictly_in_official_code(small_model, tmp_path):
    torch.manual_seed(0)
    official = sah.sam_model_registry["vit_tiny"]()
    ours = perturb_(SamHQModel(SamHQConfig.from_variant("vit_tiny")), seed=4)
    save_official(ours, tmp_path / "x.pth")
    state = torch.load(tmp_path / "x.pth", weights_only=True)
    result = official.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(".head." in k or "norm_head" in k for k in result.missing_keys)
    with pytest.raises(FileExistsError, match="already exists"):
        save_official(ours, tmp_path / "x.pth")


@needs_official
def test_convert_official_to_seed_and_back(tmp_path):
    torch.manual_seed(0)
    official = perturb_(sah.sam_model_registry["vit_tiny"](), seed=2)
    torch.save(official.state_dict(), tmp_path / "sam_hq_vit_tiny.pth")
    convert(tmp_path / "sam_hq_vit_tiny.pth", tmp_path / "seed")
    convert(tmp_path / "seed", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    for k, v in official.state_dict().items():
        if ".head." in k or "norm_head" in k:
            continue
        assert torch.equal(back[k], v), k
    with pytest.raises(FileExistsError):
        convert(tmp_path / "seed", tmp_path / "back.pth")
    with pytest.raises(FileExistsError):
        convert(tmp_path / "sam_hq_vit_tiny.pth", tmp_path / "seed")


@needs_official
def test_plain_sam_checkpoint_runs_as_sam_and_matches_official_sam(tmp_path):
    torch.manual_seed(0)
    sam = perturb_(sah.build_sam_baseline.sam_model_registry_baseline["vit_tiny"](), seed=6)
    sam.eval()
    torch.save(sam.state_dict(), tmp_path / "sam_vit_t.pth")
    with pytest.warns(UserWarning, match="plain SAM"):
        ours = SamHQModel.from_pretrained(tmp_path / "sam_vit_t.pth")
    assert not ours.hq_enabled
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    emb_ref = sam.image_encoder(x)
    emb_ref = emb_ref[0] if isinstance(emb_ref, tuple) else emb_ref
    box = torch.tensor([[100.0, 100.0, 600.0, 700.0]])
    sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
    ref, ref_iou = sam.mask_decoder(image_embeddings=emb_ref, image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=True, hq_token_only=False, interm_embeddings=None)
    out = ours(pixel_values=x, input_boxes=box[None])
    assert out.pred_masks.shape == (1, 1, 3, 256, 256)
    assert ((out.pred_masks[0] - ref).abs().max() / ref.abs().max()) < 1e-4
    assert (out.iou_scores[0] - ref_iou).abs().max() < 1e-4
    with pytest.raises(ValueError, match="without HQ weights"):
        ours(pixel_values=x, input_boxes=box[None], hq_token_only=True)


# ---- damaged and wrong files -------------------------------------------------------------------


@pytest.fixture
def official_file(small_model, tmp_path):
    path = tmp_path / "sam_hq_small.pth"
    torch.save(ours_to_official(small_model.state_dict()), path)
    return path


def test_truncated_pth(official_file):
    data = official_file.read_bytes()
    official_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"sam_hq_small\.pth: not a readable PyTorch checkpoint"):
        SamHQModel.from_pretrained(official_file)


def test_truncated_safetensors(small_model, tmp_path):
    small_model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        SamHQModel.from_pretrained(tmp_path)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a checkpoint"):
        SamHQModel.from_pretrained(tmp_path / "notes.txt")
    torch.save({"a": 1, "b": [1, 2]}, tmp_path / "dict.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        SamHQModel.from_pretrained(tmp_path / "dict.pth")
    torch.save({"layer.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not look like a SAM"):
        SamHQModel.from_pretrained(tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        SamHQModel.from_pretrained(tmp_path / "missing.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    torch.save({"x": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: refusing to load: the file holds pickled Python objects"):
        SamHQModel.from_pretrained(tmp_path / "evil.pth")
    with open(tmp_path / "evil_raw.pth", "wb") as f:  # a bare pickle, not torch's zip format
        pickle.dump({"x": _Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="evil_raw.pth: refusing to load|evil_raw.pth: not a readable"):
        SamHQModel.from_pretrained(tmp_path / "evil_raw.pth")
    assert "this must never run" not in capsys.readouterr().out


def test_missing_keys_are_named(small_model, tmp_path):
    state = ours_to_official(small_model.state_dict())
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing keys mask_decoder\.iou_token\.weight"):
        SamHQModel.from_pretrained(tmp_path / "broken.pth")


def test_shapes_that_disagree_with_the_config_are_named(small_model, tmp_path):
    small_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["mask_decoder_config"]["iou_head_hidden_dim"] = 128  # the config now describes another model
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config does not match the weights: "
                       r"mask_decoder_config\.iou_head_hidden_dim is 128 but the tensors say 256"):
        SamHQModel.from_pretrained(tmp_path)


def test_wrong_variant_directory(tmp_path):
    with torch.device("meta"):
        b = SamHQModel(SamHQConfig.from_variant("vit_b"))
    SamHQConfig.from_variant("vit_tiny").to_json_file(tmp_path / "config.json")
    from safetensors.torch import save_file

    save_file({k: torch.zeros(v.shape) for k, v in b.state_dict().items()
               if k.startswith("mask_decoder.iou")}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not match the vit_tiny model: missing keys"):
        SamHQModel.from_pretrained(tmp_path)


def test_hub_id_without_network_gives_a_clear_error(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(*a, **k):
        raise OSError("offline")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not fetch from the hub.*download config.json"):
        SamHQModel.from_pretrained("syscv-community/sam-hq-vit-base")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match="huggingface_hub is not installed"):
        SamHQModel.from_pretrained("syscv-community/sam-hq-vit-base")


def test_from_pretrained_dtype_and_device(small_model, tmp_path):
    small_model.save_pretrained(tmp_path)
    m = SamHQModel.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert m.device.type == "cpu"
    assert {p.dtype for p in m.vision_encoder.parameters()} == {torch.bfloat16} == {m.encoder_dtype}
    assert {p.dtype for n, p in m.named_parameters() if not n.startswith("vision_encoder.")} == {torch.float32} == {m.dtype}
