"""One front end for both engines: the torch and onnxruntime engines see the same preprocessed image
and the same prompts for every kind of image input, and give the same masks.

The engines are wrapped so that what `SamHQPredictor` hands them (pixel values to `embed`, prompt
tensors to `decode`) is recorded; the two records must be identical, and the masks equal within the
ONNX export's float tolerance.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from samhq.engines import OnnxEngine, TorchEngine
from samhq.predictor import SamHQPredictor

from conftest import random_model

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

NO_GRAD = True
RNG = np.random.default_rng(0)
RGB = (RNG.random((120, 200, 3)) * 255).astype(np.uint8)


class Recorder:
    """An engine that records its inputs and passes the calls on."""

    def __init__(self, engine):
        self.inner, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, pixel_values):
        self.calls.append(("embed", pixel_values.clone()))
        return self.inner.embed(pixel_values)

    def decode(self, features, *prompts, **kw):
        self.calls.append(("decode", [None if p is None else p.clone() for p in prompts[:4]]))
        return self.inner.decode(features, *prompts, **kw)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    model = random_model(seed=21, image_size=256)
    onnx = OnnxEngine.from_model(model, tmp_path_factory.mktemp("onnx"), threads=1)
    return Recorder(TorchEngine(model)), Recorder(onnx)


def inputs(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(RGB).save(path)
    return {
        "path": (str(path), "RGB"),
        "pathlib": (path, "RGB"),
        "pil": (Image.fromarray(RGB), "RGB"),
        "array": (RGB, "RGB"),
        "bgr array": (np.ascontiguousarray(RGB[..., ::-1]), "BGR"),
        "tensor": (torch.from_numpy(RGB).permute(2, 0, 1), "RGB"),
        "bgr tensor": (torch.from_numpy(np.ascontiguousarray(RGB[..., ::-1])).permute(2, 0, 1), "BGR"),
    }


PROMPTS = [
    dict(point_coords=np.array([[50.0, 60.0], [150, 30]]), point_labels=np.array([1, 0])),
    dict(box=np.array([20.0, 10.0, 180.0, 100.0])),
    dict(point_coords=np.array([[100.0, 50.0]]), point_labels=np.array([1]), box=np.array([40.0, 20.0, 160.0, 90.0])),
]


def test_both_engines_see_and_return_the_same(engines, tmp_path):
    torch_engine, onnx_engine = engines
    reference = None
    for kind, (image, fmt) in inputs(tmp_path).items():
        results = []
        for engine in engines:
            engine.calls.clear()
            p = SamHQPredictor(engine)
            p.set_image(image, image_format=fmt)
            outs = [p.predict(**kw, multimask_output=mm, return_logits=True) for kw in PROMPTS for mm in (False, True)]
            results.append((engine.calls[:], outs, p.original_size, p.input_size))
        (t_calls, t_outs, t_orig, t_inp), (o_calls, o_outs, o_orig, o_inp) = results
        assert (t_orig, t_inp) == (o_orig, o_inp) == ((120, 200), (154, 256)), kind
        assert [c[0] for c in t_calls] == [c[0] for c in o_calls], kind
        for (_, a), (_, b) in zip(t_calls, o_calls):  # identical pixel values and prompt tensors
            for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                assert (x is None and y is None) or torch.equal(x.cpu(), y.cpu()), kind
        for a, b in zip(t_outs, o_outs):
            masks_t, scores_t, low_t = a
            masks_o, scores_o, low_o = b
            assert masks_t.shape == masks_o.shape == (1, 120, 200)
            assert np.abs(low_t - low_o).max() <= 1e-3 * np.abs(low_t).max(), kind
            assert np.abs(scores_t - scores_o).max() <= 1e-4, kind
            agree = ((masks_t > 0) == (masks_o > 0)).mean()
            assert agree >= 0.999, (kind, agree)
        if reference is None:  # every input kind gives the first kind's pixel values
            reference = t_calls[0][1]
        assert torch.equal(t_calls[0][1], reference), kind


@pytest.mark.parametrize("image", ["path", "pil"])
def test_bgr_applies_to_arrays_only(engines, tmp_path, image):
    """A file or PIL image is decoded as RGB: image_format="BGR" with one is an error on either engine."""
    image = inputs(tmp_path)[image][0]
    for engine in engines:
        with pytest.raises(ValueError, match="channel order of an array"):
            SamHQPredictor(engine).set_image(image, image_format="BGR")


def test_embedding_files_belong_to_their_engine(engines, tmp_path):
    """Each engine keeps what its decoder needs; a file from one is refused by the other, not misread."""
    torch_engine, onnx_engine = engines
    a, b = SamHQPredictor(torch_engine), SamHQPredictor(onnx_engine)
    a.set_image(RGB)
    b.set_image(RGB)
    a.save_image_embedding(tmp_path / "t.safetensors")
    b.save_image_embedding(tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="another model"):
        b.load_image_embedding(tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="another model"):
        a.load_image_embedding(tmp_path / "o.safetensors")
    fresh = SamHQPredictor(onnx_engine)
    fresh.load_image_embedding(tmp_path / "o.safetensors")
    box = np.array([20.0, 10.0, 180.0, 100.0])
    np.testing.assert_array_equal(fresh.predict(box=box, return_logits=True)[0], b.predict(box=box, return_logits=True)[0])
