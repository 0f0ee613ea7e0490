"""`SamHQProcessor`: parity with transformers' processor (transformers >= 5, `SamImageProcessorPil`) on
pixel values, scaled prompts, labels and post-processed masks; ragged prompts; bad prompts."""
import numpy as np
import pytest
import torch

from samhq.processing import BatchFeature, SamHQImageProcessor, SamHQProcessor

NO_GRAD = True  # conftest runs this module's tests without autograd


@pytest.fixture(scope="module")
def seed():
    tf = pytest.importorskip("transformers", minversion="5.0")
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    return tf.SamHQProcessor(SamImageProcessorPil())


def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (300, 451, 3), dtype=np.uint8), rng.integers(0, 256, (517, 120, 3), dtype=np.uint8)]


def test_matches_seed_processor(seed):
    imgs = images()
    rng = np.random.default_rng(1)
    segs = [(rng.random(im.shape[:2]) > 0.5).astype(np.uint8) for im in imgs]
    kw = dict(input_points=[[[10, 20], [30.5, 40]], [[5, 6], [119, 516]]], input_labels=[[1, 0], [1, 1]],
              input_boxes=[[[1, 2, 100, 200]], [[3, 4, 50, 60]]], segmentation_maps=segs)
    ref = seed(images=imgs, return_tensors="pt", **kw)
    ours = SamHQProcessor()(imgs, **kw)
    assert set(ref.keys()) == set(ours.keys())
    for key in ref:
        assert ours[key].shape == ref[key].shape, key
        torch.testing.assert_close(ours[key].double(), ref[key].double(), rtol=0, atol=1e-5, msg=key)
    assert ours["labels"].dtype == torch.int64 and ours["pixel_values"].dtype == torch.float32


def test_post_process_masks_matches_seed(seed):
    imgs = images()
    batch = SamHQProcessor()(imgs)
    low = [torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for binarize in (True, False):
        ref = seed.image_processor.post_process_masks([m.clone() for m in low], batch["original_sizes"],
                                                      batch["reshaped_input_sizes"], binarize=binarize)
        ours = SamHQProcessor().image_processor.post_process_masks(low, batch["original_sizes"],
                                                                    batch["reshaped_input_sizes"], binarize=binarize)
        for a, b in zip(ours, ref):
            assert a.shape == b.shape == (1, 3, *a.shape[-2:])
            if binarize:
                assert (a != b).float().mean() <= 1e-4
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert ours[0].shape[-2:] == (300, 451) and ours[1].shape[-2:] == (517, 120)


def test_ragged_points_are_padded_and_scaled_by_hand():
    proc = SamHQProcessor()
    batch = proc(np.zeros((200, 400, 3), np.uint8), input_points=[[[[100, 50]], [[10, 20], [30, 40], [50, 60]]]],
                 input_labels=[[[1], [1, 0, 1]]])
    assert batch["input_points"].shape == (1, 2, 3, 2) and batch["input_labels"].shape == (1, 2, 3)
    # 400 x 200 -> 1024 x 512: x and y both scale by 2.56
    assert batch["input_points"][0, 0, 0].tolist() == pytest.approx([256.0, 128.0])
    assert batch["input_points"][0, 0, 1:].eq(-10).all() and batch["input_labels"][0, 0].tolist() == [1, -10, -10]
    assert batch["input_labels"][0, 1].tolist() == [1, 0, 1]
    assert batch["reshaped_input_sizes"].tolist() == [[512, 1024]]
    # default labels are foreground; three-level nesting is one object per image
    one = proc(np.zeros((10, 10, 3), np.uint8), input_points=[[[1, 2], [3, 4]]])
    assert one["input_points"].shape == (1, 1, 2, 2) and one["input_labels"].tolist() == [[[1, 1]]]


def test_batch_feature_unpacks_and_moves():
    batch = SamHQProcessor()(np.zeros((10, 20, 3), np.uint8), input_boxes=[[[1, 1, 5, 5]]])
    assert isinstance(batch, BatchFeature) and set(dict(**batch)) >= {"pixel_values", "input_boxes"}
    moved = batch.to("cpu", dtype=torch.float64)
    assert moved.pixel_values.dtype == torch.float64 and moved.original_sizes.dtype == torch.int64
    np_batch = SamHQProcessor()(np.zeros((10, 20, 3), np.uint8), return_tensors="np")
    assert isinstance(np_batch["pixel_values"], np.ndarray)


def test_model_image_size_and_mixed_image_kinds():
    from PIL import Image

    proc = SamHQProcessor(SamHQImageProcessor(256))
    rgb = np.random.default_rng(2).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    batch = proc([rgb, Image.fromarray(rgb), torch.from_numpy(rgb).permute(2, 0, 1), rgb.astype(np.float32) / 255])
    assert batch["pixel_values"].shape == (4, 3, 256, 256)
    for i in range(1, 4):
        torch.testing.assert_close(batch["pixel_values"][i], batch["pixel_values"][0])
    assert batch["pixel_values"][0, :, 160:].eq(0).all()  # 64x40 -> 256x160, padded below


@pytest.mark.parametrize("kwargs,message", [
    (dict(input_points=[[[1, 2]]], input_labels=[[1, 0]]), "1 points but 2 labels"),
    (dict(input_points=[[[float("nan"), 2]]]), "NaN or infinite"),
    (dict(input_boxes=[[[5, 5, 1, 9]]]), "x1 >= x0 and y1 >= y0"),
    (dict(input_boxes=[[1, 2, 3, 4]]), r"nested \[image\]\[box\]"),
    (dict(input_labels=[[1]]), "without input_points"),
    (dict(input_points=[[[1, 2]], [[3, 4]]]), "nested per image"),
])
def test_bad_prompts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamHQProcessor()(np.zeros((10, 10, 3), np.uint8), **kwargs)


def test_bad_images():
    with pytest.raises(ValueError, match="single pixel"):
        SamHQProcessor()(np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(ValueError, match="not found"):
        SamHQProcessor()("/nonexistent/image.png")


def test_from_pretrained_takes_the_input_size_from_the_checkpoint(tmp_path):
    from samhq import SamHQModel, SamHQProcessor, save_official

    from conftest import small_config

    model = SamHQModel(small_config(image_size=256))
    model.save_pretrained(tmp_path / "seed")
    save_official(model, tmp_path / "official.pth")
    for src in (tmp_path / "seed", tmp_path / "official.pth"):
        proc = SamHQProcessor.from_pretrained(src)
        batch = proc(np.zeros((40, 80, 3), np.uint8), input_points=[[[40, 20]]])
        assert tuple(batch["pixel_values"].shape) == (1, 3, 256, 256)
        assert batch["input_points"][0, 0, 0].tolist() == [128.0, 64.0]


@pytest.mark.parametrize("input_size, original_size, pad, low", [
    ((768, 1024), (768, 1024), 1024, 256), ((1024, 768), (1200, 900), 1024, 256), ((1024, 1024), (512, 512), 1024, 256),
    ((5, 1024), (5, 1024), 1024, 256), ((1021, 1024), (1021, 1024), 1024, 256), ((300, 451), (300, 451), (600, 900), 200),
    ((101, 64), (101, 64), (128, 64), 64), ((700, 1000), (700, 1000), 1000, 256)])  # the last: 1000 is not 4 x 256
def test_upscale_logits_equals_upsample_then_crop(input_size, original_size, pad, low):
    """Upsampling only the low-res rows and columns the crop keeps gives the full upsampling's crop (up to float
    rounding: the kernel may vectorise a shorter row differently)."""
    import torch.nn.functional as F

    from samhq.processing import upscale_logits

    logits = torch.randn(3, 1, low, low, generator=torch.Generator().manual_seed(0)) * 8
    size = (pad, pad) if isinstance(pad, int) else pad
    full = F.interpolate(logits.reshape(1, 3, low, low), size, mode="bilinear", align_corners=False)
    full = full[..., :input_size[0], :input_size[1]]
    if tuple(original_size) != tuple(input_size):
        full = F.interpolate(full, original_size, mode="bilinear", align_corners=False)
    got = upscale_logits(logits, input_size, original_size, pad)
    assert got.shape == (3, 1, *original_size)
    assert (got - full.reshape(got.shape)).abs().max() <= 1e-6 * full.abs().max()
