"""DAVIS J&F: the metrics against hand computations (and against the benchmark's own `davis2017/metrics.py` when
$DAVIS2017_EVALUATION points at a davis2017-evaluation checkout), the protocol with an oracle tracker (perfect
predictions score 1, empty ones 0), and `samhq evaluate` on a DAVIS-style folder."""
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samhq.data.synthetic_video import moving_shapes
from samhq.eval.davis import (
    boundary_f_measure,
    boundary_map,
    davis_statistics,
    evaluate_davis,
    is_davis_folder,
    region_similarity,
)

from video_ref import save_tiny_checkpoint

NO_GRAD = True


def square(shift=0, size=5):
    m = np.zeros((size, size), bool)
    m[1:3, 1 + shift:3 + shift] = True
    return m


def test_boundary_map_by_hand():
    # A pixel is on the boundary when it differs from its right, lower or lower-right neighbour; the last column
    # compares downwards only, the last row rightwards only. For the 2x2 square at rows 1-2, columns 1-2 of a 5x5 image:
    expected = {(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)}
    assert set(zip(*np.nonzero(boundary_map(square())))) == expected
    # moved to columns 3-4, (1, 4) is in the last column and equals the pixel below it: not a boundary pixel
    assert set(zip(*np.nonzero(boundary_map(square(2))))) == {(0, 2), (0, 3), (0, 4), (1, 2), (2, 2), (2, 3), (2, 4)}


def test_j_and_f_by_hand():
    truth = square()
    assert region_similarity(truth, truth) == 1.0
    assert region_similarity(truth, square(1)) == pytest.approx(2 / 6)
    assert region_similarity(truth, square(2)) == 0.0
    assert region_similarity(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    # tolerance 1 pixel (a plus-shaped disk): shifted by one column every boundary pixel has a match
    assert boundary_f_measure(truth, square(1), bound_th=1) == 1.0
    # shifted by two: 5 of the 7 predicted boundary pixels are within 1 of a true one, 5 of the 8 true ones
    # within 1 of a predicted one: P = 5/7, R = 5/8, F = 2PR / (P + R) = 2/3
    assert boundary_f_measure(truth, square(2), bound_th=1) == pytest.approx(2 / 3)
    assert boundary_f_measure(truth, np.zeros_like(truth)) == 0.0
    assert boundary_f_measure(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    # the default tolerance is ceil(0.008 x the diagonal): 1 pixel here
    assert boundary_f_measure(truth, square(2)) == pytest.approx(2 / 3)


def test_statistics_by_hand():
    values = [1, 1, 1, 1, 0, 0, 0, 0]
    # bins of frames [0..2], [2..4], [4..5], [5..7]: decay = mean(1, 1, 1) - mean(0, 0, 0)
    assert davis_statistics(values) == (0.5, 0.5, 1.0)
    mean, recall, decay = davis_statistics([0.2, 0.6, 0.9, 0.4, 0.7])
    assert mean == pytest.approx(0.56) and recall == pytest.approx(0.6)
    # five frames: bins [0..1], [1..2], [2..3], [3..4]
    assert decay == pytest.approx(np.mean([0.2, 0.6]) - np.mean([0.4, 0.7]))


def load_davis_reference():
    root = os.environ.get("DAVIS2017_EVALUATION")
    path = Path(root or "") / "davis2017" / "metrics.py"
    if not root or not path.is_file():
        return None
    pytest.importorskip("cv2")
    morphology = types.ModuleType("skimage.morphology")

    def disk(radius):  # scikit-image's disk: the grid points within `radius` of the centre
        r = int(radius)
        y, x = np.mgrid[-r:r + 1, -r:r + 1]
        return (x * x + y * y <= radius * radius).astype(np.uint8)

    morphology.disk = disk
    sys.modules.setdefault("skimage", types.ModuleType("skimage"))
    sys.modules["skimage.morphology"] = morphology
    spec = importlib.util.spec_from_file_location("davis2017_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metrics_match_the_davis_benchmark_code():
    ref = load_davis_reference()
    if ref is None:
        pytest.skip("set DAVIS2017_EVALUATION to a davis2017-evaluation checkout to compare with the benchmark's code")
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    for k in range(20):
        h, w = rng.integers(20, 120, size=2)
        truth = gaussian_filter(rng.normal(size=(h, w)), 3) > 0.02 * k - 0.1
        pred = gaussian_filter(rng.normal(size=(h, w)), 2) > 0.1
        assert region_similarity(truth, pred) == pytest.approx(ref.db_eval_iou(truth, pred))
        assert boundary_f_measure(truth, pred) == pytest.approx(ref.db_eval_boundary(truth, pred))


def write_davis(root: Path, sequences=(("shapes-a", 0), ("shapes-b", 1)), num_frames=8) -> Path:
    for name, seed in sequences:
        frames, labels = moving_shapes(num_frames, 48, 64, seed=seed)
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True)
        for i, (f, lab) in enumerate(zip(frames, labels)):
            Image.fromarray(f).save(root / "JPEGImages" / "480p" / name / f"{i:05d}.jpg")
            im = Image.fromarray(lab).convert("P")
            im.putpalette([0, 0, 0, 200, 0, 0, 0, 0, 200] + [0] * 759)
            im.save(root / "Annotations" / "480p" / name / f"{i:05d}.png")
    return root


class OracleTracker:
    """A stand-in predictor that returns the ground truth (or nothing): what the protocol must score 1 (or 0)."""

    def __init__(self, root: Path, empty: bool = False):
        self.root, self.empty = root, empty

    def init_state(self, frames):
        return {"frames": frames, "objects": {}}

    def add_new_mask(self, state, frame_idx, obj_id, mask):
        assert frame_idx == 0
        state["objects"][obj_id] = mask

    def propagate_in_video(self, state, start_frame_idx=0):
        frames = state["frames"]
        ids = sorted(state["objects"])
        folder = Path(str(frames.source).replace("JPEGImages", "Annotations"))
        for i, name in enumerate(frames.names):
            labels = np.asarray(Image.open(folder / f"{name}.png"))
            logits = np.stack([np.where(labels == o, 5.0, -5.0) for o in ids])[:, None]
            yield i, ids, torch.from_numpy(np.full_like(logits, -5.0) if self.empty else logits)


def test_protocol_scores_perfect_and_empty_tracks(tmp_path):
    root = write_davis(tmp_path / "davis")
    assert is_davis_folder(root)
    perfect = evaluate_davis(OracleTracker(root), root, results_dir=tmp_path / "results")
    s = perfect.summary
    assert (s["sequences"], s["objects"]) == (2, 4)
    assert s["J&F"] == 1.0 and s["J_mean"] == 1.0 and s["F_mean"] == 1.0
    assert all(r["frames"] == 6 for r in perfect.records)  # first and last frames are not scored
    written = np.asarray(Image.open(tmp_path / "results" / "shapes-a" / "00004.png"))
    np.testing.assert_array_equal(written, np.asarray(Image.open(root / "Annotations" / "480p" / "shapes-a" / "00004.png")))
    empty = evaluate_davis(OracleTracker(root, empty=True), root).summary
    # every object is visible on most frames; where one is hidden behind the bar, an empty prediction is right
    hidden = [(np.asarray(Image.open(p)) == o).sum() == 0
              for p in sorted((root / "Annotations" / "480p").glob("*/0000[1-6].png")) for o in (1, 2)]
    assert empty["J_mean"] == pytest.approx(np.mean(hidden))
    with pytest.raises(ValueError, match="no sequence 'nope'"):
        evaluate_davis(OracleTracker(root), root, sequences=["nope"])


def test_cli_evaluate_on_a_davis_folder(tmp_path, capsys):
    from samhq.cli import main

    root = write_davis(tmp_path / "davis", sequences=(("shapes-a", 0),), num_frames=5)
    model = save_tiny_checkpoint(tmp_path / "model")
    rc = main(["evaluate", str(model), str(root), "--json", str(tmp_path / "r.json"), "--results", str(tmp_path / "res"),
               "--threads", "1", "-q"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["summary"]["objects"] == 2 and 0 <= doc["summary"]["J&F"] <= 1
    assert len(list((tmp_path / "res" / "shapes-a").glob("*.png"))) == 5
    assert "J&F" in capsys.readouterr().out
