"""Conventions that must mean one thing everywhere (issue 14, kind 5).

- labels for `model(..., labels=)` are in the model's square input frame, or refused with a message
  that says how to pass them (never silently stretched);
- `dtype` is the image encoder's precision everywhere, and nothing changes a model object the caller
  passed in (pipelines, CLI loading);
- the predictor takes array-like prompts in `predict_torch`, warns about a box that misses the image,
  and reads an (H, W, C) tensor as what it is.
"""
import copy
import warnings

import numpy as np
import pytest
import torch

from samhq import SamHQProcessor, pipeline
from samhq.pipelines import load_for_inference
from samhq.predictor import SamHQPredictor

from conftest import random_model

NO_GRAD = True


@pytest.fixture(scope="module")
def model():
    return random_model(seed=31, image_size=256)


def test_labels_at_the_original_size_are_refused_with_the_way_to_pass_them(model):
    rng = np.random.default_rng(0)
    image = (rng.random((90, 241, 3)) * 255).astype(np.uint8)
    mask = np.zeros((90, 241), bool)
    mask[20:70, 30:200] = True
    proc = SamHQProcessor.for_model(model)
    batch = proc(image, segmentation_maps=mask, input_boxes=[[[30, 20, 199, 69]]])
    labels = batch.pop("labels")
    with torch.enable_grad():
        good = model(**batch, labels=labels).loss
        assert labels.shape == (1, 64, 64) and torch.isfinite(good)
        with pytest.raises(ValueError, match="segmentation_maps"):
            model(**batch, labels=torch.from_numpy(mask)[None])
        # a square original image has no padding: its labels at the original size are in the frame, and accepted
        sq = proc(image[:, :90], segmentation_maps=mask[:, :90], input_boxes=[[[30, 20, 89, 69]]])
        sq.pop("labels")
        assert torch.isfinite(model(**sq, labels=torch.from_numpy(mask[:, :90])[None]).loss)


def test_pipeline_dtype_is_the_encoder_and_never_changes_the_callers_model(model):
    before = copy.deepcopy(model.state_dict())
    got = load_for_inference(model, dtype="bfloat16")
    assert got is not model and got.encoder_dtype == torch.bfloat16 and got.dtype == torch.float32
    assert model.encoder_dtype == torch.float32 and model.dtype == torch.float32
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert load_for_inference(model) is model  # "auto" keeps a model object as it is
    bf16 = load_for_inference(model, dtype="bfloat16")
    assert load_for_inference(bf16) is bf16 and bf16.encoder_dtype == torch.bfloat16  # a user's bf16 model stays bf16
    gen = pipeline("mask-generation", model=model, dtype="bfloat16")
    assert gen.model is not model and model.encoder_dtype == torch.float32


def test_predict_torch_takes_arrays_and_warns_about_boxes_outside(model):
    rng = np.random.default_rng(1)
    p = SamHQPredictor(model)
    p.set_image((rng.random((100, 150, 3)) * 255).astype(np.uint8))
    boxes = np.array([[10.0, 10.0, 100.0, 60.0]])
    a = p.predict_torch(None, None, boxes=boxes)[0]
    b = p.predict_torch(None, None, boxes=torch.as_tensor(boxes, dtype=torch.float))[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="boxes must be numeric"):
        p.predict_torch(None, None, boxes=np.array([["a", "b", "c", "d"]]))
    with pytest.warns(UserWarning, match=r"box \(200, 150, 300, 180\) lies entirely outside the 150x100 image"):
        p.predict(box=np.array([200, 150, 300, 180]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.predict(box=np.array([100, 50, 300, 180]))  # overlapping the image: no warning


def test_hwc_tensor_is_read_as_hwc(model):
    rng = np.random.default_rng(2)
    rgb = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
    p, q = SamHQPredictor(model), SamHQPredictor(model)
    p.set_image(torch.from_numpy(rgb))  # (H, W, C)
    q.set_image(torch.from_numpy(rgb).permute(2, 0, 1))  # (C, H, W)
    assert p.original_size == q.original_size == (60, 80)
    assert torch.equal(p.features, q.features)


def test_dtype_auto_picks_bf16_only_where_the_hardware_runs_it_fast(monkeypatch):
    import samhq.dtypes as P

    assert P.resolve_dtype(None, "cpu") == torch.float32  # the default: exact
    monkeypatch.setattr(P, "bf16_supported", lambda: False)
    assert P.resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(P, "bf16_supported", lambda: True)  # a CPU with AVX512-BF16 / AMX
    assert P.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert P.resolve_dtype("float32", "cpu") == torch.float32 and P.resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        P.resolve_dtype("int8", "cpu")


def test_every_loader_takes_dtype_names(tmp_path):
    """load_model, from_pretrained and the predictor's from_pretrained resolve names as the pipelines do."""
    from samhq import SamHQModel, SamHQPredictor, load_model
    from samhq.checkpoints import DEMO_MODEL

    for load in (load_model, SamHQModel.from_pretrained, lambda s, **kw: SamHQPredictor.from_pretrained(s, **kw).model):
        assert load(DEMO_MODEL, dtype="bfloat16").encoder_dtype == torch.bfloat16
        assert load(DEMO_MODEL, dtype="float32").encoder_dtype == torch.float32
        with pytest.raises(ValueError, match="unknown dtype"):
            load(DEMO_MODEL, dtype="int8")
