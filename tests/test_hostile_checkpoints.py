"""Issue 14, kind 4: a checkpoint that cannot be right is refused, by name, before a model is built;
an output that would hold NaN is an error, never invalid JSON.

Weights of the right shapes but of dtype int64, bool or uint8, weights holding NaN or infinity, and
config.json values the tensors contradict (100000 layers for 3, a TinyViT window of 14000) go
through `SamHQModel.from_pretrained`, `SamHQPredictor.from_pretrained`, the pipelines, the server
and the commands; a model whose outputs are NaN goes through the server and the commands.
"""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_automatic import tiny_256_model
from test_predictor import make_image

from samhq import SamHQConfig, SamHQModel, SamHQPredictor, load_model, pipeline, save_official
from samhq import checkpoints as C
from samhq.checkpoints import CheckpointError
from samhq.cli import main
from samhq.config import SamHQTinyViTConfig

from conftest import random_model

NO_GRAD = True
TENSOR = "mask_decoder.iou_token.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tiny_256_model().save_pretrained(root / "good")
    Image.fromarray(make_image(40, 50)).save(root / "img.png")
    return root


def variant(good, name, change_state=None, change_config=None):
    """A copy of the good checkpoint with its state and/or config changed."""
    out = good / name
    out.mkdir(exist_ok=True)
    state = load_file(str(good / "good" / "model.safetensors"))
    if change_state:
        change_state(state)
    save_file(state, str(out / "model.safetensors"))
    cfg = json.loads((good / "good" / "config.json").read_text())
    if change_config:
        change_config(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def entry_points(path):
    """Every way a user loads a checkpoint in Python."""
    yield lambda: SamHQModel.from_pretrained(path)
    yield lambda: SamHQPredictor.from_pretrained(path)
    yield lambda: pipeline("mask-generation", model=str(path))
    try:
        from samhq.server import create_app

        yield lambda: create_app(str(path))
    except ImportError:
        pass


def cli_refuses(capsys, good, path, text):
    for argv in (["info", str(path)],
                 ["segment", str(good / "img.png"), "--model", str(path), "--point", "5,5", "--out", str(good / "x.png")],
                 ["everything", str(good / "img.png"), "--out", str(good / "everything"), "--model", str(path)],
                 ["export", "onnx", str(path), str(good / "onnx")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text in err, (argv, err)
    assert not (good / "x.png").exists() and not (good / "onnx").exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_non_floating_weights_are_named(good, capsys, dtype):
    def corrupt(state):
        state[TENSOR] = (state[TENSOR] * 1e9).to(dtype)

    path = variant(good, f"dtype_{str(dtype)[6:]}", corrupt)
    text = f"tensor {TENSOR} has dtype {str(dtype)[6:]}; SAM-HQ weights are floating point"
    for load in entry_points(path):
        with pytest.raises(CheckpointError, match=text.replace(".", r"\.")):
            load()
    cli_refuses(capsys, good, path, text)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_named(good, capsys, value):
    def corrupt(state):
        state["vision_encoder.neck.conv2.weight"][0, 0, 0, :2] = value

    path = variant(good, f"nonfinite_{value}", corrupt)
    text = "tensor vision_encoder.neck.conv2.weight holds 2 NaN or infinite values"
    for load in entry_points(path):
        with pytest.raises(CheckpointError, match=text):
            load()
    cli_refuses(capsys, good, path, text)
    # the official .pth layout goes through the same check
    model = tiny_256_model()
    with torch.no_grad():
        model.vision_encoder.neck.conv2.weight[0, 0, 0, 0] = value
    save_official(model, good / f"nonfinite_{value}.pth", overwrite=True)
    with pytest.raises(CheckpointError, match="neck.conv2.weight holds 1 NaN"):
        SamHQModel.from_pretrained(good / f"nonfinite_{value}.pth")


def test_config_values_are_checked_against_the_tensors_before_building(good, monkeypatch):
    def never_built(self, *args, **kwargs):
        raise AssertionError("a model was built from a config the tensors contradict")

    monkeypatch.setattr(SamHQModel, "__init__", never_built)
    cases = [
        (lambda c: c["vision_config"].update(num_hidden_layers=100000),
         "vision_config.num_hidden_layers is 100000 but the tensors say 3"),
        (lambda c: c["mask_decoder_config"].update(num_hidden_layers=5000),
         "mask_decoder_config.num_hidden_layers is 5000 but the tensors say 2"),
        (lambda c: (c["vision_config"].update(hidden_size=4096, num_attention_heads=64),
                    c["mask_decoder_config"].update(vit_dim=4096)),
         "vision_config.hidden_size is 4096 but the tensors say 64"),
        (lambda c: c["vision_config"].update(image_size=65536),
         "vision_config.image_size / patch_size is 4096 but the tensors say 16"),
        (lambda c: c["mask_decoder_config"].update(num_multimask_outputs=999),
         r"num_multimask_outputs \+ 1 is 1000 but the tensors say 4"),
        (lambda c: c["prompt_encoder_config"].update(image_size=10**6),  # no tensor pins it: the bound applies
         r"config value prompt_encoder_config.image_size = 1000000 is over the limit of 16384 \(max_config_value"),
    ]
    for i, (change, text) in enumerate(cases):
        path = variant(good, f"config_{i}", change_config=change)
        with pytest.raises(CheckpointError, match=text):
            load_model(path)


def test_tiny_vit_window_from_the_config(tmp_path, monkeypatch):
    vision = SamHQTinyViTConfig(embed_dims=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4],
                                window_sizes=[7, 7, 14, 7], image_size=256)
    config = SamHQConfig(vision_config=vision, prompt_encoder_config={"image_size": 256},
                         mask_decoder_config={"vit_dim": 48})
    SamHQModel(config).save_pretrained(tmp_path)
    assert SamHQModel.from_pretrained(tmp_path).config.vision_config.window_sizes == [7, 7, 14, 7]
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vision_config"]["window_sizes"] = [7, 7, 14000, 7]  # would loop over 14000^4 offsets while building
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(SamHQModel, "__init__", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(CheckpointError, match=r"window_sizes\[2\] squared is 196000000 but the tensors say 196"):
        SamHQModel.from_pretrained(tmp_path)


def test_good_checkpoints_still_load(good):
    model = SamHQModel.from_pretrained(good / "good")
    C.validate_checkpoint(model.state_dict(), model.config, "in memory")
    demo = SamHQModel.from_pretrained("samhq-tiny-shapes")
    assert demo.config.vision_config.num_hidden_layers == 6


# ---------------------------------------------------------------------------------------------
# NaN outputs


def nan_model():
    model = random_model(image_size=256, window_size=8)
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.proj_out.bias.fill_(float("nan"))
    return model


def test_server_answers_nan_with_valid_json():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from samhq.server import create_app

    client = TestClient(create_app(nan_model()), base_url="http://localhost", raise_server_exceptions=False)
    buf = __import__("io").BytesIO()
    Image.fromarray(make_image(40, 50)).save(buf, format="PNG")
    image_id = client.post("/api/images", files={"file": ("a.png", buf.getvalue(), "image/png")}).json()["image_id"]
    r = client.post("/api/segment", json={"image_id": image_id, "points": [[5, 5]]})
    assert r.status_code == 500 and "NaN" not in r.text.replace("NaN or infinite", "")
    assert json.loads(r.text)["detail"].startswith("the model produced NaN or infinite scores")


def test_commands_never_write_nan(good, tmp_path, capsys, monkeypatch):
    """A model that passed loading but computes NaN (as with a precision that overflows)."""
    nan_model().save_pretrained(tmp_path / "nan")
    monkeypatch.setattr("samhq.modeling.pretrained.validate_checkpoint", lambda *a, **k: None)
    out, js = tmp_path / "m.png", tmp_path / "r.json"
    assert main(["segment", str(good / "img.png"), "--model", str(tmp_path / "nan"), "--point", "5,5",
                 "--out", str(out), "--json", str(js)]) == 2
    assert "the model produced NaN or infinite scores" in capsys.readouterr().err
    assert not out.exists() and not js.exists()
    code = main(["everything", str(good / "img.png"), "--out", str(tmp_path / "e"), "--model", str(tmp_path / "nan"),
                 "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-thresh", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "skipped" in err and "NaN or infinite scores" in err
    assert not list((tmp_path / "e").glob("*.json"))
