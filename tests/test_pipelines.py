"""samhq.pipeline: the documented result structures, and the same masks as the generator."""
import numpy as np
import pytest
import torch
from PIL import Image
from test_automatic import tiny_256_model

import samhq.pipelines as P
from samhq.automatic import SamHQAutomaticMaskGenerator
from samhq.data.synthetic import SyntheticShapes

KW = dict(points_per_batch=7, pred_iou_thresh=0.1, stability_score_thresh=0.3, box_nms_thresh=1.0)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model = tiny_256_model()
    path = tmp_path_factory.mktemp("model") / "tiny"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def image():
    return SyntheticShapes(1, image_size=(200, 300), seed=2)[0]["image"]


@pytest.fixture(scope="module")
def reference(saved_model, image):
    return SamHQAutomaticMaskGenerator(saved_model[0], points_per_side=4, **KW).generate(image)


def test_mask_generation(saved_model, image, reference):
    pipe = P.pipeline("mask-generation", model=str(saved_model[1]))
    out = pipe(Image.fromarray(image), points_per_crop=4, output_rle_mask=True, output_bboxes_mask=True, **KW)
    assert set(out) == {"masks", "scores", "rle_mask", "bounding_boxes"}
    assert len(out["masks"]) == len(reference) > 0
    assert out["scores"].shape == (len(reference),) and out["scores"].dtype == torch.float32
    assert out["bounding_boxes"].shape == (len(reference), 4)
    for mask, score, rle, box, ref in zip(out["masks"], out["scores"], out["rle_mask"], out["bounding_boxes"], reference):
        assert mask.shape == image.shape[:2] and mask.dtype == bool
        np.testing.assert_array_equal(mask, ref["segmentation"])
        np.testing.assert_array_equal(P.M.rle_to_mask(rle), mask)
        assert score.item() == pytest.approx(ref["predicted_iou"])
        x, y, w, h = ref["bbox"]
        assert box.tolist() == [x, y, x + w, y + h]
    plain = pipe(image, points_per_side=4, **KW)
    assert set(plain) == {"masks", "scores"}
    assert [m.sum() for m in plain["masks"]] == [r["area"] for r in reference]


def test_image_segmentation(saved_model, image, reference):
    pipe = P.pipeline("image-segmentation", model=saved_model[0])
    out = pipe([image, image], points_per_side=4, **KW)
    assert len(out) == 2 and len(out[0]) == len(reference)
    for item, ref in zip(out[0], reference):
        assert set(item) == {"score", "label", "mask"}
        assert isinstance(item["score"], float) and isinstance(item["label"], str)
        assert isinstance(item["mask"], Image.Image) and item["mask"].mode == "L"
        assert item["mask"].size == (image.shape[1], image.shape[0])
        np.testing.assert_array_equal(np.asarray(item["mask"]) > 127, ref["segmentation"])
    assert len({item["label"] for item in out[0]}) == len(out[0])


def test_errors(saved_model):
    with pytest.raises(ValueError, match="known tasks: image-segmentation, mask-generation"):
        P.pipeline("depth-estimation", model=saved_model[0])
    with pytest.raises(ValueError, match="dtype"):
        P.pipeline("mask-generation", model=saved_model[0], dtype="float8")
    pipe = P.pipeline("mask-generation", model=saved_model[0])
    with pytest.raises(TypeError, match="unknown argument.*points_per_sid"):
        pipe(np.zeros((10, 10, 3), np.uint8), points_per_sid=4)


def test_auto_dtype():
    assert P.resolve_dtype("auto", "cpu") == torch.float32
    assert P.resolve_dtype("bf16", "cpu") == torch.bfloat16
