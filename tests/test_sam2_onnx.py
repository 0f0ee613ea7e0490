"""ONNX export of SAM 2 / HQ-SAM 2 and the onnxruntime engine through the one front end, against the torch
predictor on the same model (as test_onnx.py for SAM-HQ v1).

The torch predictor's SAM 2 outputs are Meta's `SAM2ImagePredictor`'s (test_sam2_parity.py), so equality here
carries that over. Tolerances: features and mask logits max relative error <= 1e-4, scores <= 1e-4 absolute.
Small configs: Hiera-T's structure at 8 channels per head, 256 px.
"""
import json

import numpy as np
import pytest
import torch

from sam2_ref import random_image, small_model

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from samhq.cli import main  # noqa: E402
from samhq.export.onnx import (  # noqa: E402
    DECODER_FILE,
    ENCODER_FILE,
    META_FILE,
    SAM2_DECODER_INPUTS,
    SAM2_DECODER_OUTPUTS,
    check_standard_ops,
    export_onnx,
)
from samhq.predictor import OnnxPredictor, SamHQPredictor  # noqa: E402

NO_GRAD = True
PTS = np.array([[40.0, 60.0], [150.0, 100.0], [220.0, 30.0]])
LAB = np.array([1, 0, 1])
BOX = np.array([20.0, 15.0, 190.0, 140.0])


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def setup(model, out, image):
    export_onnx(model, out)
    ref, eng = SamHQPredictor(model), OnnxPredictor(out, threads=1)
    ref.set_image(image)
    eng.set_image(image)
    return ref, eng


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = small_model(hq=True)
    out = tmp_path_factory.mktemp("onnx2")
    image = random_image(160, 240, 0)
    return (model, out, *setup(model, out, image))


def test_files_family_and_standard_ops(exported):
    model, out, ref, eng = exported
    meta = json.loads((out / META_FILE).read_text())
    assert meta["family"] == "sam2" and meta["hq"] is True and meta["config"]["model_type"] == "sam_hq2"
    assert meta["image_size"] == 256 and meta["low_res_size"] == 64
    check_standard_ops(out / ENCODER_FILE)
    check_standard_ops(out / DECODER_FILE)
    session = ort.InferenceSession(str(out / DECODER_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == SAM2_DECODER_INPUTS
    assert [o.name for o in session.get_outputs()] == SAM2_DECODER_OUTPUTS
    assert eng.engine.family == "sam2" and eng.selection == "token_order" and eng.transform.logits_limit == 32.0


def test_encoder_matches_torch(exported):
    _, _, ref, eng = exported
    for key in ("features", "high_res_s0", "high_res_s1"):
        assert rel(eng._features[key], ref._features[key]) <= 1e-4, key
    assert eng.original_size == ref.original_size and eng.input_size == ref.input_size == (256, 256)


def _prompt(name, ref):
    kw = {"one_point": dict(point_coords=PTS[:1], point_labels=LAB[:1]), "points": dict(point_coords=PTS, point_labels=LAB),
          "box": dict(box=BOX), "box_and_point": dict(point_coords=PTS[1:2], point_labels=LAB[1:2], box=BOX)}.get(name, {})
    if name.startswith("mask"):
        _, _, low = ref.predict(point_coords=PTS[1:2], point_labels=LAB[:1], multimask_output=False)
        kw["mask_input"] = low * 2.0
        if name == "mask_and_point":
            kw.update(point_coords=PTS[:1], point_labels=LAB[:1])
    return kw


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("hq_only", [False, True])
@pytest.mark.parametrize("prompt", ["one_point", "points", "box", "box_and_point", "mask_and_point", "mask_only"])
def test_decoder_matches_predictor(exported, prompt, multimask, hq_only):
    _, _, ref, eng = exported
    kw = _prompt(prompt, ref)
    a = ref.predict(multimask_output=multimask, hq_token_only=hq_only, return_logits=True, **kw)
    b = eng.predict(multimask_output=multimask, hq_token_only=hq_only, return_logits=True, **kw)
    m = 1 if hq_only or not multimask else 3
    assert [x.shape for x in a] == [x.shape for x in b] == [(m, 160, 240), (3 if multimask else 1,), (m, 64, 64)]
    assert rel(b[0], a[0]) <= 1e-4 and rel(b[2], a[2]) <= 1e-4
    assert np.abs(b[1] - a[1]).max() <= 1e-4


def test_many_prompts_and_object_scores(exported):
    """Dynamic prompt and point counts in one call; the graph's full-size masks and object scores equal torch's."""
    model, out, ref, eng = exported
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(5, 2, 2, generator=g) * 200
    boxes = torch.cat([xy.min(1).values, xy.max(1).values + 20], dim=1)
    a, b = ref.predict_torch(None, None, boxes, return_logits=True), eng.predict_torch(None, None, boxes, return_logits=True)
    assert a[0].shape == b[0].shape == (5, 3, 160, 240)
    assert rel(b[0], a[0]) <= 1e-4 and (b[1] - a[1]).abs().max() <= 1e-4
    pts = torch.rand(4, 6, 2, generator=g) * 256
    lab = (torch.rand(4, 6, generator=g) > 0.3).int()
    session = ort.InferenceSession(str(out / DECODER_FILE), providers=["CPUExecutionProvider"])
    feeds = {"image_embeddings": ref.features.numpy(), "high_res_s0": ref._features["high_res_s0"].numpy(),
             "high_res_s1": ref._features["high_res_s1"].numpy(),
             "point_coords": torch.cat([pts, torch.zeros(4, 1, 2)], 1).numpy(),
             "point_labels": torch.cat([lab.float(), -torch.ones(4, 1)], 1).numpy(),
             "mask_input": np.zeros((1, 1, 64, 64), np.float32), "has_mask_input": np.array([0.0], np.float32),
             "orig_im_size": np.array([160.0, 240.0], np.float32), "multimask_output": np.array([0.0], np.float32),
             "hq_token_only": np.array([0.0], np.float32)}
    masks, scores, low, obj = session.run(None, feeds)
    all_masks, iou, want_obj = model.predict_all(ref.features, [ref._features["high_res_s0"], ref._features["high_res_s1"]],
                                                 pts[None], lab[None])
    assert rel(obj, want_obj[0]) <= 1e-4
    single, single_iou = model.select_masks(all_masks, iou, False)
    assert rel(low, single[0]) <= 1e-4 and np.abs(scores - single_iou[0].numpy()).max() <= 1e-4
    assert rel(masks, ref.upscale_masks(torch.from_numpy(low))) <= 1e-4


def test_stability_fallback_in_the_graph(tmp_path):
    """A threshold no single mask reaches: the exported graph swaps in the best multimask mask, as the model does."""
    model = small_model(hq=True, dynamic_multimask_stability_thresh=1.01)
    image = random_image(100, 120, 4)
    ref, eng = setup(model, tmp_path, image)
    a = ref.predict(point_coords=PTS[:1] / 2, point_labels=LAB[:1], multimask_output=False, return_logits=True)
    b = eng.predict(point_coords=PTS[:1] / 2, point_labels=LAB[:1], multimask_output=False, return_logits=True)
    multi = ref.predict(point_coords=PTS[:1] / 2, point_labels=LAB[:1], multimask_output=True, return_logits=True)
    assert a[1][0] == pytest.approx(multi[1].max())  # the fallback was taken
    assert rel(b[0], a[0]) <= 1e-4 and np.abs(b[1] - a[1]).max() <= 1e-4


def test_plain_sam2_cli_export_and_embedding_files(tmp_path, capsys):
    """`samhq export onnx` on a plain SAM 2 checkpoint (no hq_token_only input); SAM 2 embedding files move between
    the two engines (the exported encoder returns exactly the torch engine's saved features)."""
    model = small_model(hq=False, seed=7)
    model.save_pretrained(tmp_path / "m")
    assert main(["export", "onnx", str(tmp_path / "m"), str(tmp_path / "onnx")]) == 0
    capsys.readouterr()
    assert main(["export", "onnx", str(tmp_path / "m"), str(tmp_path / "onnx")]) == 2
    assert "--force" in capsys.readouterr().err
    meta = json.loads((tmp_path / "onnx" / META_FILE).read_text())
    assert meta["family"] == "sam2" and meta["hq"] is False
    image = random_image(90, 130, 2)
    ref, eng = SamHQPredictor(model), OnnxPredictor(tmp_path / "onnx", threads=1)
    ref.set_image(image)
    eng.set_image(image)
    session = ort.InferenceSession(str(tmp_path / "onnx" / DECODER_FILE), providers=["CPUExecutionProvider"])
    assert "hq_token_only" not in [i.name for i in session.get_inputs()]
    with pytest.raises(ValueError, match="HQ"):
        eng.predict(point_coords=PTS[:1] / 2, point_labels=LAB[:1], hq_token_only=True)
    a = ref.predict(box=BOX / 2, return_logits=True)
    assert rel(eng.predict(box=BOX / 2, return_logits=True)[0], a[0]) <= 1e-4
    ref.save_image_embedding(tmp_path / "emb.safetensors")
    loaded = OnnxPredictor(tmp_path / "onnx", threads=1)
    loaded.load_image_embedding(tmp_path / "emb.safetensors")
    assert rel(loaded.predict(box=BOX / 2, return_logits=True)[0], a[0]) <= 1e-4
    eng.save_image_embedding(tmp_path / "emb_onnx.safetensors")
    back = SamHQPredictor(model)
    back.load_image_embedding(tmp_path / "emb_onnx.safetensors")
    assert rel(back.predict(box=BOX / 2, return_logits=True)[0], a[0]) <= 1e-4


def test_filling_and_batches_through_the_onnxruntime_engine(exported):
    """max_hole_area / max_sprinkle_area and set_image_batch / predict_batch are the front end's: the same with either engine."""
    model, _, _, eng = exported
    images = [random_image(160, 240, 0), random_image(100, 80, 1)]
    a = SamHQPredictor(model, max_hole_area=40, max_sprinkle_area=40)
    b = SamHQPredictor(eng.engine, max_hole_area=40, max_sprinkle_area=40)
    for p in (a, b):
        p.set_image_batch(images)
    kw = dict(point_coords_batch=[PTS[:2], PTS[:1] / 3], point_labels_batch=[LAB[:2], LAB[:1]], box_batch=[None, BOX / 3])
    for x, y in zip(a.predict_batch(**kw, return_logits=True), b.predict_batch(**kw, return_logits=True)):
        for u, v in zip(x, y):
            assert u.shape == v.shape and rel(v, u) <= 1e-4
    masks_a = a.predict_batch(**kw)[0]
    masks_b = b.predict_batch(**kw)[0]
    assert all((u != v).mean() <= 1e-3 for u, v in zip(masks_a, masks_b))
