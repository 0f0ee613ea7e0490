"""`samhq track`: outputs checked with their formats' own readers (PIL, pycocotools, PyAV), errors, refusals and
interruption. A tiny random SAM 2 video model (tests/video_ref.py) stands in for a real checkpoint: the checks are
on files and bookkeeping, not on segmentation quality."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from samhq.cli import main
from samhq.data.synthetic_video import moving_shapes
from samhq.masks import coco_to_mask

from video_ref import save_tiny_checkpoint

NO_GRAD = True


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("track")
    frames, labels = moving_shapes(8, 64, 80)
    folder = root / "clip"
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"img{i}.png")
    Image.fromarray((labels[3] == 1).astype(np.uint8) * 255).save(root / "disk3.png")
    return root, folder, save_tiny_checkpoint(root / "model", seed=4)


def track(setup, *extra, out="out"):
    root, folder, model = setup
    return main(["track", str(folder), "--model", str(model), "--out", str(root / out), "--threads", "1", *extra])


def test_masks_json_and_overlay(setup, capsys):
    root, _, _ = setup
    overlay = root / "overlay.gif"
    rc = track(setup, "--point", "0,20,20", "--point", "0,40,10,0", "--box", "2,40,40,60,60,2", "--point", "5,30,20,0",
               "--mask", "3,%s,3" % (root / "disk3.png"), "--overlay", str(overlay))
    assert rc == 0, capsys.readouterr().err
    out = root / "out"
    pngs = sorted((out / "masks").iterdir())
    assert [p.name for p in pngs] == sorted(f"img{i}.png" for i in range(8))
    doc = json.loads((out / "tracks.json").read_text())
    video = doc["videos"][0]
    assert (video["length"], video["height"], video["width"]) == (8, 64, 80)
    anns = {a["object_id"]: a for a in doc["annotations"]}
    assert sorted(anns) == [1, 2, 3]
    for i, name in enumerate(video["file_names"]):
        labels = np.asarray(Image.open(out / "masks" / name))
        assert labels.shape == (64, 80) and labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3}
        for obj, a in anns.items():
            m = labels == obj
            assert a["areas"][i] == int(m.sum())
            if a["segmentations"][i] is None:
                assert not m.any()
            else:
                np.testing.assert_array_equal(coco_to_mask(a["segmentations"][i]), m)
            assert isinstance(a["object_scores"][i], float)
    av = pytest.importorskip("av")
    with av.open(str(overlay)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 8


def test_frame_range_and_stride(setup, capsys):
    root, _, _ = setup
    assert track(setup, "--point", "3,20,20", "--start", "1", "--end", "8", "--stride", "2", out="range") == 0
    doc = json.loads((root / "range" / "tracks.json").read_text())
    assert doc["videos"][0]["frame_indices"] == [1, 3, 5, 7]
    assert sorted(p.name for p in (root / "range" / "masks").iterdir()) == ["img1.png", "img3.png", "img5.png", "img7.png"]
    capsys.readouterr()
    assert track(setup, "--point", "2,20,20", "--start", "1", "--stride", "2", out="range2") == 2
    assert "frame 2, which is not tracked" in capsys.readouterr().err
    assert not (root / "range2").exists()


@pytest.mark.parametrize("args, message", [
    (["--point", "0,20"], "FRAME,X,Y"),
    (["--point", "0,20,20,2"], "LABEL must be 1"),
    (["--point", "0.5,20,20"], "FRAME must be a whole number"),
    (["--box", "0,30,30,10,10"], "must not be left of"),
    (["--box", "0,1,1,9,9", "--box", "0,2,2,9,9"], "already has a box"),
    (["--mask", "0,missing.png"], "not found"),
    (["--point", "99,20,20"], "not tracked"),
    ([], "at least one prompt"),
    (["--point", "0,20,20", "--stride", "0"], "--stride"),
])
def test_bad_input_is_one_line_and_writes_nothing(setup, capsys, args, message):
    root, _, _ = setup
    assert track(setup, *args, out="bad") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("samhq track: error:")
    assert not (root / "bad").exists()


def test_unsuitable_checkpoints(setup, tmp_path, capsys):
    _, folder, _ = setup
    from samhq.modeling.sam2 import SamHQ2Model

    from video_ref import tiny_video_config

    config = tiny_video_config()
    config.video_config = None
    SamHQ2Model(config).save_official(tmp_path / "image_only.pt")
    config.to_json_file(tmp_path / "config.json")
    rc = main(["track", str(folder), "--model", str(tmp_path), "--point", "0,5,5", "--out", str(tmp_path / "o")])
    assert rc == 2 and "no video modules" in capsys.readouterr().err


def test_existing_outputs_are_kept_without_force(setup, capsys):
    root, _, _ = setup
    assert track(setup, "--point", "0,20,20", out="keep") == 0
    before = (root / "keep" / "tracks.json").read_bytes()
    capsys.readouterr()
    assert track(setup, "--point", "0,30,30", out="keep") == 2
    assert "--force" in capsys.readouterr().err and (root / "keep" / "tracks.json").read_bytes() == before
    assert track(setup, "--point", "0,30,30", "--force", out="keep") == 0


def test_an_interrupted_run_leaves_only_whole_frames(setup, monkeypatch, capsys):
    """Stopped after three frames (Ctrl-C): three complete PNGs, no temporary files, no tracks.json."""
    root, _, _ = setup
    from samhq.video import SamHQ2VideoPredictor

    original = SamHQ2VideoPredictor.propagate_in_video

    def stop_after_three(self, *args, **kwargs):
        for k, item in enumerate(original(self, *args, **kwargs)):
            if k == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(SamHQ2VideoPredictor, "propagate_in_video", stop_after_three)
    assert track(setup, "--point", "0,20,20", out="stopped") == 130
    files = sorted(p.name for p in (root / "stopped" / "masks").iterdir())
    assert files == ["img0.png", "img1.png", "img2.png"]
    for name in files:
        assert np.asarray(Image.open(root / "stopped" / "masks" / name)).shape == (64, 80)
    assert not (root / "stopped" / "tracks.json").exists()
    assert torch.get_num_threads() >= 1
