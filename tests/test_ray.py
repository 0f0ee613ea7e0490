"""Ray Data runs (samhq.distributed) give the records a local run of the same callable gives.

A local Ray with 2 workers (started by run_ray itself) and a 2-node cluster on this machine
(ray.cluster_utils.Cluster: a head and a second node, each a raylet of its own) run the same job;
killing a worker process mid-run loses and duplicates nothing. Ray's start-up costs tens of
seconds on a busy 2-core machine, so the cluster is shared by the tests that need it.
"""
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

from samhq.checkpoints import BUNDLED  # noqa: E402
from samhq.distributed import SamHQBatchPredictor, run_ray  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_tiles import scene  # noqa: E402

pytestmark = pytest.mark.skipif(not (BUNDLED["samhq-tiny-shapes"] / "model.safetensors").exists(),
                                reason="the demo model is not in this checkout")
OPTIONS = {"points_per_side": 8}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    out = []
    for i in range(4):
        image, _ = scene(128, 160, [("ellipse", (20 + 5 * i, 20, 90, 80), (220, 60, 40)),
                                    ("rectangle", (100, 60, 150, 120), (40, 200, 60))], seed=i)
        Image.fromarray(image).save(folder / f"{i}.png")
        out.append((f"img{i}", str(folder / f"{i}.png")))
    (folder / "bad.png").write_bytes(b"not an image")
    out.append(("bad", str(folder / "bad.png")))
    return out


@pytest.fixture(scope="module")
def local(images):
    """The callable run in this process, with the same thread count as the workers."""
    import torch

    threads = torch.get_num_threads()
    predictor = SamHQBatchPredictor(generator_options=OPTIONS, threads=1)
    rows = {k: predictor.one(k, p) for k, p in images}
    torch.set_num_threads(threads)
    assert not rows["bad"]["ok"] and all(rows[k]["ok"] for k, _ in images[:4])
    assert sum(len(json.loads(r["records"])) for r in rows.values()) > 0  # masks to compare
    return {k: json.loads(r["records"]) for k, r in rows.items() if r["ok"]}


def assert_same_records(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for key in want:
        assert len(got[key]) == len(want[key]), key
        for g, w in zip(got[key], want[key]):
            assert g["segmentation"] == w["segmentation"] and g["bbox"] == w["bbox"] and g["area"] == w["area"]
            assert g["predicted_iou"] == pytest.approx(w["predicted_iou"], abs=1e-5)
            assert g["stability_score"] == pytest.approx(w["stability_score"], abs=1e-5)


class Writer:
    def __init__(self):
        self.records, self.calls, self.errors = {}, [], {}

    def __call__(self, key, result):
        self.calls.append(key)
        self.records[key] = result["records"]

    def error(self, key, message):
        self.errors[key] = message


def test_local_ray_with_two_workers_resumes_and_reports_bad_images(images, local):
    assert not ray.is_initialized()
    writer = Writer()
    done = {"img0"}  # written by an earlier run
    summary = run_ray(images, writer, done=done.__contains__, on_error=writer.error, num_workers=2,
                      generator_options=OPTIONS)
    assert not ray.is_initialized()  # the local Ray it started is shut down
    assert summary.skipped == ["img0"] and summary.lost == [] and summary.duplicates == 0
    assert sorted(writer.calls) == ["img1", "img2", "img3"]  # once each, nothing for the done image
    assert list(writer.errors) == ["bad"] and "bad.png" in writer.errors["bad"]
    assert_same_records(writer.records, {k: v for k, v in local.items() if k != "img0"})


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


class KilledOnce(SamHQBatchPredictor):
    """Kills its own worker process (SIGKILL) the first time it is given img2, mid-batch."""

    marker = None

    def __call__(self, batch):
        if "img2" in [str(k) for k in batch["key"]] and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def test_two_node_cluster_gives_the_local_records(images, local, cluster):
    writer = Writer()
    summary = run_ray(images, writer, on_error=writer.error, num_workers=2, address=cluster.address,
                      generator_options=OPTIONS)
    assert sorted(summary.written) == ["img0", "img1", "img2", "img3"] and summary.lost == [] and summary.duplicates == 0
    assert list(writer.errors) == ["bad"]
    assert_same_records(writer.records, local)


def test_a_worker_killed_mid_run_loses_nothing(images, local, cluster, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    cls = type("KilledOnceHere", (KilledOnce,), {"marker": str(tmp_path / "killed")})
    writer = Writer()
    summary = run_ray(images[:4], writer, num_workers=2, address=cluster.address, generator_options=OPTIONS,
                      predictor_cls=cls)
    assert (tmp_path / "killed").exists()  # a worker really died
    assert sorted(writer.calls) == ["img0", "img1", "img2", "img3"] and summary.lost == []
    assert_same_records(writer.records, local)


def test_prompts_mode_and_arrays(images, cluster):
    """Prompts from a file travel with the rows; arrays work as well as paths."""
    from samhq import SamHQPredictor
    from samhq.masks import coco_to_mask

    arrays = [(k, np.asarray(Image.open(p))) for k, p in images[:2]]
    prompts = {k: (i + 1, [{"box": [20, 20, 90, 80], "score": 0.5, "category_id": 3}]) for i, (k, _) in enumerate(arrays)}
    writer = Writer()
    summary = run_ray(arrays, writer, mode="prompts", prompts=prompts, num_workers=1, address=cluster.address)
    assert sorted(summary.written) == ["img0", "img1"]
    predictor = SamHQPredictor.from_pretrained("samhq-tiny-shapes")
    for (key, image), (image_id, _) in zip(arrays, [prompts[k] for k, _ in arrays]):
        (rec,) = writer.records[key]
        predictor.set_image(image)
        mask, score, _ = predictor.predict(box=np.array([20, 20, 90, 80]), multimask_output=False)
        assert rec["image_id"] == image_id and rec["category_id"] == 3 and rec["score"] == 0.5
        assert np.array_equal(coco_to_mask(rec["segmentation"]), mask[0])
        assert rec["predicted_iou"] == pytest.approx(float(score[0]), abs=1e-5)
