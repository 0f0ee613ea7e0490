"""ONNX export and the onnxruntime engine: a small random model exported, run in onnxruntime and
compared with the torch predictor (`SamHQPredictor`, the official output selection).

Tolerances: image embeddings and HQ features max relative error (max |diff| / max |ref|) <= 1e-4;
mask logits at the original size and low-res logits <= 1e-4 relative; scores <= 1e-4 absolute;
thresholded masks IoU >= 0.999 per mask (float differences may flip pixels whose logit is ~0).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from samhq.export.onnx import DECODER_FILE, ENCODER_FILE, META_FILE, check_standard_ops, export_onnx  # noqa: E402
from samhq.predictor import OnnxPredictor, SamHQPredictor  # noqa: E402

NO_GRAD = True  # conftest runs this module's tests without autograd

# Operators onnxruntime-web's wasm backend runs (its CPU kernels); the decoder must use only these.
WASM_DECODER_OPS = {
    "Add", "ArgMax", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Div",
    "Equal", "Erf", "Expand", "Floor", "Gather", "GatherElements", "Gemm", "Greater", "LayerNormalization",
    "MatMul", "Mod", "Mul", "Reciprocal", "ReduceMax", "Relu", "Reshape", "Resize", "Shape", "Sin", "Slice",
    "Softmax", "Sqrt", "Sub", "Transpose", "Unsqueeze", "Where", "Squeeze", "Range", "Pow", "Neg", "Tanh",
    "Sigmoid", "Less", "Not", "And", "Or", "Max", "Min", "ReduceMean", "Identity", "Tile", "Pad", "Flatten",
}


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def mask_iou(a, b):
    a, b = torch.as_tensor(a).flatten(-2), torch.as_tensor(b).flatten(-2)
    union = (a | b).sum(-1)
    return torch.where(union > 0, (a & b).sum(-1) / union.clamp_min(1), torch.ones(())).min().item()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from conftest import random_model


    model = random_model()
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(model, out)
    image = (np.random.default_rng(0).random((600, 800, 3)) * 255).astype(np.uint8)
    ref = SamHQPredictor(model)
    ref.set_image(image)
    eng = OnnxPredictor(out, threads=1)
    eng.set_image(image)
    return model, out, ref, eng


def test_files_opset_and_standard_ops(exported):
    _, out, _, _ = exported
    assert {p.name for p in out.iterdir()} == {ENCODER_FILE, DECODER_FILE, META_FILE}
    meta = json.loads((out / META_FILE).read_text())
    assert meta["opset"] == 17 and meta["low_res_size"] == 256 and meta["config"]["model_type"] == "sam_hq"
    ops = check_standard_ops(out / DECODER_FILE)
    assert set(ops) <= WASM_DECODER_OPS, f"ops outside the onnxruntime-web list: {set(ops) - WASM_DECODER_OPS}"
    check_standard_ops(out / ENCODER_FILE)


def test_encoder_matches_torch(exported):
    _, _, ref, eng = exported
    assert rel(eng.features, ref.features) <= 1e-4
    assert rel(eng.hq_features, ref.hq_features) <= 1e-4
    assert eng.original_size == ref.original_size and eng.input_size == ref.input_size


PTS = np.array([[120.0, 200.0], [500.0, 380.0], [700.0, 90.0]])
LAB = np.array([1, 0, 1])
BOX = np.array([60.0, 80.0, 520.0, 430.0])


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("hq_only", [False, True])
@pytest.mark.parametrize("prompt", ["one_point", "points", "box", "box_and_point", "mask_and_point", "mask_only"])
def test_decoder_matches_predictor(exported, prompt, multimask, hq_only):
    _, _, ref, eng = exported
    kw = {}
    if prompt == "one_point":
        kw = dict(point_coords=PTS[:1], point_labels=LAB[:1])
    elif prompt == "points":
        kw = dict(point_coords=PTS, point_labels=LAB)
    elif prompt == "box":
        kw = dict(box=BOX)
    elif prompt == "box_and_point":
        kw = dict(point_coords=PTS[:1], point_labels=LAB[:1], box=BOX)
    if prompt.startswith("mask"):
        _, _, low = ref.predict(point_coords=PTS[1:2], point_labels=LAB[:1])
        kw["mask_input"] = low * 2.0
        if prompt == "mask_and_point":
            kw.update(point_coords=PTS[:1], point_labels=LAB[:1])
    a = ref.predict(multimask_output=multimask, hq_token_only=hq_only, return_logits=True, **kw)
    b = eng.predict(multimask_output=multimask, hq_token_only=hq_only, return_logits=True, **kw)
    assert [x.shape for x in a] == [x.shape for x in b] == [(1, 600, 800), (1,), (1, 256, 256)]
    assert rel(b[0], a[0]) <= 1e-4 and rel(b[2], a[2]) <= 1e-4
    assert np.abs(b[1] - a[1]).max() <= 1e-4
    assert mask_iou(a[0] > 0, b[0] > 0) >= 0.999
    masks, _, _ = eng.predict(multimask_output=multimask, hq_token_only=hq_only, **kw)
    assert masks.dtype == bool and (masks == (b[0] > 0)).all()


def test_many_boxes_and_points_at_once(exported):
    """Dynamic prompt count and point count: 5 boxes, then 4 prompts of 6 points, in one decoder call each."""
    _, _, ref, eng = exported
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(5, 2, 2, generator=g) * 500
    boxes = torch.cat([xy.min(1).values, xy.max(1).values + 20], dim=1)
    a, b = ref.predict_torch(None, None, boxes, return_logits=True), eng.predict_torch(None, None, boxes, return_logits=True)
    assert a[0].shape == b[0].shape == (5, 1, 600, 800)
    assert rel(b[0], a[0]) <= 1e-4 and (b[1] - a[1]).abs().max() <= 1e-4
    pts = torch.rand(4, 6, 2, generator=g) * 1000
    lab = (torch.rand(4, 6, generator=g) > 0.3).int()
    a, b = ref.predict_torch(pts, lab, return_logits=True), eng.predict_torch(pts, lab, return_logits=True)
    assert rel(b[0], a[0]) <= 1e-4 and rel(b[2], a[2]) <= 1e-4
    assert torch.allclose(eng.upscale_masks(b[2]), b[0], atol=1e-4 * a[0].abs().max().item())


def test_engine_runs_with_glibc_malloc(exported, monkeypatch):
    """onnxruntime's allocation pattern grows a tuned glibc heap (limits.tune_malloc): every run, embedding and
    decoding alike, happens inside limits.glibc_malloc, which is left also when the run fails."""
    import contextlib

    import samhq.engines

    _, out, _, _ = exported
    events = []

    @contextlib.contextmanager
    def recording():
        events.append("enter")
        try:
            yield
        finally:
            events.append("exit")

    monkeypatch.setattr(samhq.engines, "glibc_malloc", recording)
    eng = OnnxPredictor(out, threads=1)
    eng.set_image(np.zeros((40, 60, 3), np.uint8))
    assert events == ["enter", "exit"]
    eng.predict(point_coords=PTS, point_labels=LAB)
    assert events == ["enter", "exit"] * 2
    monkeypatch.setattr(eng.engine, "_run", lambda *a: (_ for _ in ()).throw(RuntimeError("runtime failed")))
    with pytest.raises(RuntimeError, match="runtime failed"):
        eng.predict(point_coords=PTS, point_labels=LAB)
    assert events == ["enter", "exit"] * 3


@pytest.mark.parametrize("policy, spinning", [(None, "0"), ("PASSIVE", "0"), ("active", "1")])
def test_threads_spin_only_when_asked(exported, monkeypatch, policy, spinning):
    """onnxruntime's threads follow samhq's wait policy: they spin while waiting only with OMP_WAIT_POLICY=ACTIVE."""
    _, out, _, _ = exported
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    eng = OnnxPredictor(out, threads=1).engine
    for session in (eng.encoder, eng.decoder):
        assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == spinning


def test_engine_errors(exported, tmp_path):
    _, out, _, _ = exported
    with pytest.raises(ValueError, match="samhq export onnx"):
        OnnxPredictor(tmp_path)
    eng = OnnxPredictor(out, threads=1)
    with pytest.raises(RuntimeError, match="set_image"):
        eng.predict(point_coords=PTS, point_labels=LAB)
    eng.set_image(np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="point_labels"):
        eng.predict(point_coords=PTS)
    with pytest.raises(ValueError, match="give a prompt"):
        eng.predict_torch()
    # the same checks and messages as the torch predictor (one shared implementation)
    with pytest.raises(ValueError, match="x1 >= x0"):
        eng.predict(box=np.array([10, 10, 5, 20]))
    with pytest.raises(ValueError, match="1 \\(foreground\\), 0 \\(background\\)"):
        eng.predict(point_coords=PTS, point_labels=np.full(len(PTS), 7))
    with pytest.raises(ValueError, match="mask_input"):
        eng.predict(point_coords=PTS, point_labels=LAB, mask_input=np.zeros((1, 64, 64)))


def test_export_refuses_plain_sam_and_overwrite(exported, tmp_path):
    model, out, _, _ = exported
    with pytest.raises(FileExistsError, match="overwrite"):
        export_onnx(model, out)
    import copy

    plain = copy.deepcopy(model)
    plain.hq_enabled = False
    with pytest.raises(ValueError, match="plain SAM"):
        export_onnx(plain, tmp_path / "x")


def test_cli_export(tmp_path, small_model):
    small_model.save_pretrained(tmp_path / "seed")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "samhq.cli", "export", *map(str, args)], capture_output=True, text=True)

    r = cli("onnx", tmp_path / "seed", tmp_path / "out", "--decoder-only")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / DECODER_FILE).exists() and not (tmp_path / "out" / ENCODER_FILE).exists()
    r = cli("onnx", tmp_path / "seed", tmp_path / "out", "--decoder-only")
    assert r.returncode == 2 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("onnx", tmp_path / "missing", tmp_path / "out2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_predictor_engine_option(exported):
    model, out, ref, _ = exported
    eng = SamHQPredictor(model, engine="onnxruntime")
    assert eng.engine.name == "onnxruntime" and eng.model is model
    image = (np.random.default_rng(0).random((600, 800, 3)) * 255).astype(np.uint8)
    eng.set_image(image)
    a = ref.predict(point_coords=PTS, point_labels=LAB, return_logits=True)
    b = eng.predict(point_coords=PTS, point_labels=LAB, return_logits=True)
    assert rel(b[0], a[0]) <= 1e-4
    loaded = SamHQPredictor.from_onnx(out, threads=1)
    loaded.set_image(image)
    assert rel(loaded.predict(box=BOX, return_logits=True)[0], ref.predict(box=BOX, return_logits=True)[0]) <= 1e-4
    with pytest.raises(ValueError, match="engine"):
        SamHQPredictor(model, engine="tensorrt")
    assert SamHQPredictor(model).engine.name == "torch"


def _ort_web_dir() -> Path | None:
    """onnxruntime-web's npm package: $SAMHQ_ORT_WEB, or node_modules in the repository or .ci-node/."""
    root = Path(__file__).resolve().parents[1]
    for d in (os.environ.get("SAMHQ_ORT_WEB"), root / "node_modules" / "onnxruntime-web",
              root / ".ci-node" / "node_modules" / "onnxruntime-web"):
        if d and (Path(d) / "dist" / "ort.wasm.min.mjs").exists():
            return Path(d)
    return None


def test_decoder_runs_in_onnxruntime_web(exported, tmp_path):
    """The decoder model in onnxruntime-web's wasm backend (what a browser page runs) gives onnxruntime's outputs."""
    web = _ort_web_dir()
    if shutil.which("node") is None or web is None:
        pytest.skip("needs node and the onnxruntime-web npm package (npm install onnxruntime-web, or set SAMHQ_ORT_WEB)")
    from samhq.export.onnx import DECODER_INPUTS, DECODER_OUTPUTS, decoder_example_inputs

    model, out, _, _ = exported
    inputs = {n: t.numpy().astype(np.float32) for n, t in zip(DECODER_INPUTS, decoder_example_inputs(model, 3, 2))}
    (tmp_path / "in.json").write_text(json.dumps({n: {"dims": list(a.shape), "data": a.ravel().tolist()}
                                                  for n, a in inputs.items()}))
    script = Path(__file__).with_name("ort_web_run.mjs")
    r = subprocess.run(["node", str(script), str(web), str(out / DECODER_FILE), str(tmp_path / "in.json"),
                        str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads((tmp_path / "out.json").read_text())
    ref = ort.InferenceSession(str(out / DECODER_FILE), providers=["CPUExecutionProvider"]).run(None, inputs)
    for name, want in zip(DECODER_OUTPUTS, ref):
        arr = np.asarray(got[name]["data"], dtype=np.float32).reshape(got[name]["dims"])
        assert arr.shape == want.shape, name
        assert rel(arr, want) <= 1e-4, name


def test_float16_encoder_export(exported, tmp_path):
    """dtype="float16": the encoder's weights are float16 in the file (half its size), pixels in and features out
    stay float32, the features match the torch model with a float16 encoder and the masks the float32 ones;
    bfloat16 is refused with the reason."""
    import onnx

    model, out, ref, _ = exported
    half = tmp_path / "fp16"
    export_onnx(model, half, dtype="float16")
    enc = onnx.load(str(half / ENCODER_FILE))
    sizes = {}
    for t in enc.graph.initializer:  # the image encoder's weights; the HQ fusion convolutions (decoder side) stay float32
        kind = onnx.TensorProto.DataType.Name(t.data_type)
        sizes[kind] = sizes.get(kind, 0) + int(np.prod(t.dims))
    n_encoder = sum(p.numel() for p in model.vision_encoder.parameters())
    assert abs(sizes["FLOAT16"] - n_encoder) <= 0.05 * n_encoder, (sizes, n_encoder)
    assert [i.type.tensor_type.elem_type for i in enc.graph.input] == [onnx.TensorProto.FLOAT]
    assert (half / ENCODER_FILE).stat().st_size < 0.7 * (out / ENCODER_FILE).stat().st_size
    assert json.loads((half / META_FILE).read_text())["encoder_dtype"] == "float16"
    assert json.loads((out / META_FILE).read_text())["encoder_dtype"] == "float32"
    image = (np.random.default_rng(0).random((600, 800, 3)) * 255).astype(np.uint8)
    torch_half = SamHQPredictor(_half_copy(model))
    torch_half.set_image(image)
    eng = OnnxPredictor(half, threads=1)
    eng.set_image(image)
    assert eng.features.dtype == torch.float32
    assert rel(eng.features, torch_half.features) <= 2e-2
    assert rel(eng.features, ref.features) <= 2e-2
    a = ref.predict(box=BOX, multimask_output=False)[0]
    b = eng.predict(box=BOX, multimask_output=False)[0]
    assert mask_iou(a, b) >= 0.98
    with pytest.raises(ValueError, match="float32 or float16"):
        export_onnx(model, tmp_path / "bf16", dtype="bfloat16")


def _half_copy(model):
    import copy

    m = copy.deepcopy(model)
    m.vision_encoder.to(torch.float16)
    return m
