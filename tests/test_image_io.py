"""`to_rgb_array`: every documented image kind becomes (H, W, 3) uint8 RGB by the documented rule."""
import numpy as np
import pytest
import torch
from PIL import Image

from samhq.image_io import check_image_size, load_image, to_rgb_array

RGB = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


def test_rgb_inputs_are_unchanged(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "x.png")
    for image in (RGB, Image.fromarray(RGB), torch.from_numpy(RGB).permute(2, 0, 1), tmp_path / "x.png",
                  str(tmp_path / "x.png"), np.moveaxis(RGB, -1, 0), RGB.astype(np.float32) / 255):
        out = to_rgb_array(image)
        assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
        np.testing.assert_array_equal(out, RGB)


def test_pil_modes():
    gray = RGB[..., 0]
    np.testing.assert_array_equal(to_rgb_array(Image.fromarray(gray)), np.repeat(gray[..., None], 3, -1))
    rgba = np.dstack([RGB, np.full((5, 7), 64, np.uint8)])
    expected = np.round(RGB * (64 / 255) + 255 * (1 - 64 / 255))  # alpha over white
    assert np.abs(to_rgb_array(Image.fromarray(rgba, "RGBA")).astype(int) - expected).max() <= 1
    pal = Image.fromarray(RGB).convert("P")
    np.testing.assert_array_equal(to_rgb_array(pal), np.asarray(pal.convert("RGB")))
    i16 = np.array([[0, 257, 65535]], np.uint16)
    np.testing.assert_array_equal(to_rgb_array(Image.fromarray(i16).convert("I;16"))[..., 0], [[0, 1, 255]])
    cmyk = Image.fromarray(RGB).convert("CMYK")
    np.testing.assert_array_equal(to_rgb_array(cmyk), np.asarray(cmyk.convert("RGB")))


def test_numpy_dtypes_and_layouts():
    np.testing.assert_array_equal(to_rgb_array(np.array([[0, 32896, 65535]], np.uint16))[0, :, 0], [0, 128, 255])
    np.testing.assert_array_equal(to_rgb_array(np.array([[0.0, 0.5, 1.0]]))[0, :, 1], [0, 128, 255])
    np.testing.assert_array_equal(to_rgb_array(np.array([[True, False]]))[0, :, 2], [255, 0])
    assert to_rgb_array(np.zeros((4, 6, 1), np.uint8)).shape == (4, 6, 3)
    assert to_rgb_array(torch.zeros(6, 4)).shape == (6, 4, 3)


@pytest.mark.parametrize("image,message", [
    (np.array([[1.5]]), r"float images must have values in \[0, 1\]"),
    (np.array([[np.nan, 0.1]]), "NaN"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (np.zeros((5, 5, 2), np.uint8), "C in 1, 3, 4"),
    ([1, 2, 3], "unsupported image type"),
])
def test_bad_images(image, message):
    with pytest.raises((ValueError, TypeError), match=message):
        to_rgb_array(image)


def test_files_and_sizes(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "none.png")
    with pytest.raises(ValueError, match="directory"):
        load_image(tmp_path)
    (tmp_path / "bad.jpg").write_text("text")
    with pytest.raises(ValueError, match="cannot read .* as an image"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(ValueError, match="single pixel"):
        check_image_size(1, 1)
    with pytest.raises(ValueError, match="too thin"):
        check_image_size(1, 3000)
    check_image_size(1, 2)
