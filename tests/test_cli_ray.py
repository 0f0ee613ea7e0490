"""`--ray` in `samhq everything` and `samhq segment --prompts`: on a local Ray with 2 workers the commands
write the files the local commands write (identical RLE masks and boxes, scores within 1e-5, the same
PNGs and whole-run files), under the same lock and journal; a worker killed mid-run loses nothing.

One Ray for the module (started here; the commands join it), like tests/test_ray.py."""
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("pycocotools")

from test_tiles import needs_demo, scene  # noqa: E402

from samhq import distributed  # noqa: E402
from samhq.cli import _outputs as O  # noqa: E402
from samhq.cli import main  # noqa: E402

NO_GRAD = True
pytestmark = needs_demo
NAME = "samhq-tiny-shapes"
AMG_ARGS = ["--points-per-side", "8", "--pred-iou-thresh", "0.5", "--stability-thresh", "0.5", "--threads", "1"]


@pytest.fixture(scope="module")
def local_ray():
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_cli")
    (root / "in").mkdir()
    prompts = {}
    for i in range(4):
        image, _ = scene(128, 160, [("ellipse", (20 + 5 * i, 20, 90, 80), (220, 60, 40)),
                                    ("rectangle", (100, 60, 150, 120), (40, 200, 60))], seed=i)
        Image.fromarray(image).save(root / "in" / f"img{i}.png")
        prompts[f"img{i}.png"] = [{"box": [20 + 5 * i, 20, 91, 81], "score": 0.9, "category_id": 1},
                                  {"points": [[125, 90]], "labels": [1], "score": 0.7, "category_id": 2}]
    (root / "in" / "bad.png").write_bytes(b"not an image")
    (root / "prompts.json").write_text(json.dumps(prompts))
    return root


def same_annotations(got: dict, want: dict):
    assert len(got["annotations"]) == len(want["annotations"]) > 0
    for g, w in zip(got["annotations"], want["annotations"]):
        assert g["segmentation"] == w["segmentation"] and g["bbox"] == w["bbox"] and g["area"] == w["area"]
        assert g["predicted_iou"] == pytest.approx(w["predicted_iou"], abs=1e-5)
        assert g["stability_score"] == pytest.approx(w["stability_score"], abs=1e-5)


def test_everything_on_ray_writes_the_local_files(images, local_ray, tmp_path, capsys):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    argv = ["everything", str(images / "in"), "--model", NAME, *AMG_ARGS, "--format", "json,png,coco"]
    assert main([*argv, "--out", str(local)]) == 1  # bad.png
    capsys.readouterr()
    assert main([*argv, "--out", str(on_ray), "--ray", "--num-workers", "2"]) == 1
    out, err = capsys.readouterr()
    assert "4 images done, 0 skipped (already done), 1 failed" in out
    assert "skipped" in err and "bad.png" in err
    for i in range(4):
        same_annotations(json.loads((on_ray / f"img{i}.json").read_text()), json.loads((local / f"img{i}.json").read_text()))
        pngs = sorted((local / f"img{i}_masks").glob("*.png"))
        assert [p.name for p in pngs] == sorted(p.name for p in (on_ray / f"img{i}_masks").glob("*.png"))
        for p in pngs:
            assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(on_ray / f"img{i}_masks" / p.name)))
        assert np.array_equal(np.asarray(Image.open(local / f"img{i}_overlay.png")),
                              np.asarray(Image.open(on_ray / f"img{i}_overlay.png")))
    a, b = (json.loads((d / "coco" / "instances.json").read_text()) for d in (local, on_ray))
    assert [x["segmentation"] for x in a["annotations"]] == [x["segmentation"] for x in b["annotations"]]
    assert set(O.read_done(on_ray, ".samhq-everything.done")) == {f"img{i}" for i in range(4)}
    assert not (on_ray / O.LOCK_FILE).exists() and not list(on_ray.glob(O.TMP_PREFIX + "*"))

    assert main([*argv, "--out", str(on_ray), "--ray", "--num-workers", "2"]) == 1  # resumed: nothing sent again
    assert "0 images done, 4 skipped (already done), 1 failed" in capsys.readouterr().out


def test_prompt_files_on_ray_give_the_local_results(images, local_ray, tmp_path, capsys):
    argv = ["segment", str(images / "in"), "--prompts", str(images / "prompts.json"), "--model", NAME, "--threads", "1"]
    assert main([*argv, "--out", str(tmp_path / "local")]) == 0
    assert main([*argv, "--out", str(tmp_path / "ray"), "--ray", "--num-workers", "2"]) == 0
    assert "4 images done" in capsys.readouterr().out
    want, got = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("local", "ray"))
    assert len(got) == len(want) == 8
    for g, w in zip(got, want):
        assert g["segmentation"] == w["segmentation"] and g["bbox"] == w["bbox"]
        assert (g["image_id"], g["category_id"], g["score"]) == (w["image_id"], w["category_id"], w["score"])
        assert g["predicted_iou"] == pytest.approx(w["predicted_iou"], abs=1e-5)


class KilledOnce(distributed.SamHQBatchPredictor):
    """Kills its own worker process (SIGKILL) the first time it is given img2, mid-batch."""

    marker = None

    def __call__(self, batch):
        if "img2" in [str(k) for k in batch["key"]] and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def test_a_worker_killed_mid_run_loses_nothing(images, local_ray, tmp_path, monkeypatch, capsys):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    monkeypatch.setattr(distributed, "SamHQBatchPredictor", type("KilledOnceHere", (KilledOnce,),
                                                                 {"marker": str(tmp_path / "killed")}))
    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"img{i}.png").write_bytes((images / "in" / f"img{i}.png").read_bytes())
    argv = ["everything", str(tmp_path / "in"), "--model", NAME, *AMG_ARGS]
    assert main([*argv, "--out", str(tmp_path / "ray"), "--ray", "--num-workers", "2"]) == 0
    assert (tmp_path / "killed").exists()  # a worker really died
    assert "4 images done, 0 skipped (already done), 0 failed" in capsys.readouterr().out
    lines = (tmp_path / "ray" / ".samhq-everything.done").read_text().splitlines()
    assert sorted(json.loads(line)["name"] for line in lines) == [f"img{i}" for i in range(4)]  # each once
    monkeypatch.undo()
    assert main([*argv, "--out", str(tmp_path / "local")]) == 0
    for i in range(4):
        same_annotations(json.loads((tmp_path / "ray" / f"img{i}.json").read_text()),
                         json.loads((tmp_path / "local" / f"img{i}.json").read_text()))
