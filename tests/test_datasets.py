import json

import numpy as np
import pytest
from PIL import Image

from samhq.data.datasets import CocoInstances, MaskFolder, SkippedItem, decode_segmentation

# pycocotools' own numpy-2 deprecation notice, not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_folder(root, names, size=(20, 30)):
    (root / "im").mkdir(parents=True)
    (root / "gt").mkdir()
    masks = {}
    for i, n in enumerate(names):
        h, w = size
        Image.fromarray(_image(h, w, i)).save(root / "im" / f"{n}.png")  # png: lossless, so the test can compare
        m = np.zeros((h, w), np.uint8)
        m[2 + i:10 + i, 3:20] = 255
        m[5, 5] = 100  # below the 128 threshold: background
        Image.fromarray(m).save(root / "gt" / f"{n}.png")
        masks[n] = m > 128
    return masks


def test_mask_folder_pairs_by_name(tmp_path):
    masks = _write_folder(tmp_path, ["b", "a"])
    ds = MaskFolder(tmp_path, image_exts=(".png",))
    assert len(ds) == 2 and ds.num_skipped == 0
    item = ds[0]
    assert item["name"] == "a"
    assert item["image"].dtype == np.uint8 and item["image"].shape == (20, 30, 3)
    np.testing.assert_array_equal(item["image"], _image(20, 30, 1))
    assert len(item["masks"]) == 1 and item["masks"][0].dtype == bool
    np.testing.assert_array_equal(item["masks"][0], masks["a"])


def test_mask_folder_skips_bad_files_with_count(tmp_path):
    _write_folder(tmp_path, ["ok"], size=(16, 16))
    im, gt = tmp_path / "im", tmp_path / "gt"
    (im / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    Image.new("L", (16, 16)).save(gt / "corrupt.png")
    Image.fromarray(_image(16, 16)).save(im / "nomask.jpg")
    Image.fromarray(_image(16, 16)).save(im / "badmask.jpg")
    (gt / "badmask.png").write_bytes(b"\x89PNG garbage")
    Image.fromarray(_image(16, 16)).save(im / "size.jpg")
    Image.new("L", (8, 16)).save(gt / "size.png")
    ds = MaskFolder(tmp_path)
    assert [p[0].stem for p in ds.pairs] == ["ok"]
    reasons = dict(ds.skipped)
    assert ds.num_skipped == 4
    assert "unreadable image" in reasons["corrupt.jpg"]
    assert "no mask" in reasons["nomask.jpg"]
    assert "unreadable mask" in reasons["badmask.jpg"]
    assert "16x16" in reasons["size.jpg"] and "8x16" in reasons["size.jpg"]


def test_mask_folder_truncated_image_skipped_on_iteration(tmp_path):
    _write_folder(tmp_path, ["a", "b"], size=(64, 64))
    data = (tmp_path / "im" / "a.png").read_bytes()
    (tmp_path / "im" / "a.png").write_bytes(data[: len(data) // 2])  # header fine, pixel data cut short
    ds = MaskFolder(tmp_path)
    assert len(ds) == 2
    with pytest.raises(SkippedItem):
        ds[0]
    names = [item["name"] for item in ds]
    assert names == ["b"] and ds.num_skipped == 1


def test_mask_folder_same_folder_layout(tmp_path):
    Image.fromarray(_image(10, 12)).save(tmp_path / "x.jpg")
    m = np.zeros((10, 12), np.uint8)
    m[2:6, 2:6] = 255
    Image.fromarray(m).save(tmp_path / "x.png")
    ds = MaskFolder(tmp_path, masks=tmp_path)
    assert len(ds) == 1 and ds[0]["masks"][0].sum() == 16


def test_mask_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="im/ and gt/"):
        MaskFolder(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        MaskFolder(tmp_path, masks=tmp_path / "missing")


def _rle_uncompressed(mask):
    """Column-major run lengths starting with a background run, by hand."""
    flat = mask.T.reshape(-1).astype(int)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _coco_file(tmp_path, images, annotations, categories=({"id": 1, "name": "thing"},)):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    return path


def test_coco_polygons_and_rle(tmp_path):
    from pycocotools import mask as mask_utils

    h, w = 12, 16
    Image.fromarray(_image(h, w)).save(tmp_path / "a.png")
    Image.fromarray(_image(h, w, 1)).save(tmp_path / "b.png")
    square = np.zeros((h, w), bool)
    square[2:6, 3:9] = True
    ring = np.zeros((h, w), bool)
    ring[1:11, 1:11] = True
    ring[4:8, 4:8] = False  # a hole: only RLE can say this
    compressed = mask_utils.encode(np.asfortranarray(ring.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()
    anns = [
        # polygon around pixels 3..8 x 2..5 (pixel-corner coordinates)
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[3, 2, 9, 2, 9, 6, 3, 6]], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": _rle_uncompressed(ring), "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "segmentation": compressed, "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 1, "segmentation": compressed, "iscrowd": 1},  # crowd: left out
    ]
    images = [{"id": 1, "file_name": "a.png", "height": h, "width": w},
              {"id": 2, "file_name": "b.png", "height": h, "width": w},
              {"id": 3, "file_name": "c.png", "height": h, "width": w}]  # no annotations: not an item, not a skip
    ds = CocoInstances(_coco_file(tmp_path, images, anns))
    assert len(ds) == 2 and ds.num_skipped == 0
    a, b = ds[0], ds[1]
    assert a["ids"] == [1, 2] and b["ids"] == [3]
    np.testing.assert_array_equal(a["masks"][0], square)
    np.testing.assert_array_equal(a["masks"][1], ring)
    np.testing.assert_array_equal(b["masks"][0], ring)
    np.testing.assert_array_equal(a["image"], _image(h, w))
    assert len(CocoInstances(_coco_file(tmp_path, images, anns), include_crowd=True)[1]["masks"]) == 2


def test_coco_skips_with_count(tmp_path):
    h, w = 8, 8
    Image.fromarray(_image(h, w)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 not really")
    Image.fromarray(_image(h, w)).save(tmp_path / "wrongsize.png")
    poly = [[1, 1, 6, 1, 6, 6, 1, 6]]
    images = [{"id": i, "file_name": f, "height": h, "width": w}
              for i, f in enumerate(["ok.png", "corrupt.jpg", "missing.png"], 1)]
    images.append({"id": 4, "file_name": "wrongsize.png", "height": h, "width": w + 1})
    anns = [{"id": 10 + i, "image_id": i, "category_id": 1, "segmentation": poly} for i in range(1, 5)]
    anns.append({"id": 20, "image_id": 1, "category_id": 1, "segmentation": {"size": [h, w], "counts": "@@@bad"}})
    anns.append({"id": 21, "image_id": 1, "category_id": 1, "segmentation": [[1, 1]]})
    ds = CocoInstances(_coco_file(tmp_path, images, anns))
    assert len(ds) == 1
    reasons = dict(ds.skipped)
    assert set(reasons) == {"corrupt.jpg", "missing.png", "wrongsize.png"}
    assert "not found" in reasons["missing.png"] and "unreadable" in reasons["corrupt.jpg"]
    item = ds[0]
    assert item["ids"] == [11] and item["masks"][0].sum() == 25
    assert ds.num_skipped == 5  # the two bad annotations are recorded when the image is read
    assert "bad segmentation" in dict(ds.skipped)["ok.png#20"]


def test_coco_file_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        CocoInstances(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoInstances(bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="'images' and 'annotations'"):
        CocoInstances(bad)


def test_decode_segmentation_rejects_wrong_size():
    with pytest.raises(ValueError, match="RLE size"):
        decode_segmentation({"size": [4, 4], "counts": [16]}, 5, 5)
    with pytest.raises(ValueError, match="add up"):
        decode_segmentation({"size": [4, 4], "counts": [3, 4]}, 4, 4)
