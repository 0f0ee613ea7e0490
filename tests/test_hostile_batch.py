"""Issue 14, kind 3 (and kind 5's bbox): `samhq everything` owns its output folder.

Two runs on one --out (in-process with the lock held, and two real processes at once), --out equal
to or inside the input folder, a read-only folder and a full disk (a real small tmpfs when the test
may mount one, and a write made to fail otherwise), a run killed mid-batch and an image whose
outputs were moved into place but never recorded: afterwards every image's outputs agree with the
generator run directly, nothing temporary is left, and a rerun finishes what is missing. Also
`samhq segment` refusing two options that name one file, and COCO's bbox in the JSON.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_automatic import tiny_256_model
from test_predictor import make_image

from samhq.automatic import SamHQAutomaticMaskGenerator
from samhq.cli import _outputs as O
from samhq.cli import main
from samhq.masks import coco_to_mask

NO_GRAD = True
AMG = dict(points_per_side=4, pred_iou_thresh=0.1, stability_score_thresh=0.3, box_nms_thresh=1.0)
AMG_ARGS = ["--points-per-side", "4", "--pred-iou-thresh", "0.1", "--stability-thresh", "0.3", "--box-nms-thresh", "1.0"]
NAMES = ["a", "b", "c", "d"]
JOURNAL = ".samhq-everything.done"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    model = tiny_256_model()
    model.save_pretrained(root / "model")
    (root / "in").mkdir()
    refs = {}
    gen = SamHQAutomaticMaskGenerator(model, **AMG)
    for i, name in enumerate(NAMES):
        image = make_image(48 + 8 * i, 64, seed=i)
        Image.fromarray(image).save(root / "in" / f"{name}.png")
        refs[name] = [r["segmentation"] for r in gen.generate(image)]
    return root, refs


def everything(root, out, *extra):
    return ["everything", str(root / "in"), "--out", str(out), "--model", str(root / "model"), *AMG_ARGS, *extra]


def check_outputs(out: Path, refs: dict, names=NAMES, fmt="both"):
    """Every named image's outputs are complete and equal the generator's masks; nothing temporary is left."""
    for name in names:
        if fmt in ("json", "both"):
            doc = json.loads((out / f"{name}.json").read_text())
            got = [coco_to_mask(a["segmentation"]) for a in doc["annotations"]]
            assert len(got) == len(refs[name]) > 0
            for g, r in zip(got, refs[name]):
                np.testing.assert_array_equal(g, r)
        if fmt in ("png", "both"):
            pngs = sorted((out / f"{name}_masks").glob("*.png"))
            assert len(pngs) == len(refs[name])
            for p, r in zip(pngs, refs[name]):
                np.testing.assert_array_equal(np.asarray(Image.open(p)) > 0, r)
            assert (out / f"{name}_overlay.png").is_file()
    assert not list(out.glob(O.TMP_PREFIX + "*")) and not (out / O.LOCK_FILE).exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert set(names) <= set(O.read_done(out, JOURNAL))


def test_a_held_lock_stops_a_second_run(setup, tmp_path, capsys):
    root, refs = setup
    out = tmp_path / "out"
    out.mkdir()
    with O.OutputLock(out):
        assert main(everything(root, out)) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"samhq everything: error: another run (pid {os.getpid()}) is writing to {out}; " \
                      "wait for it to finish, or give another --out"
        assert list(out.iterdir()) == [out / O.LOCK_FILE]  # nothing written
    assert main(everything(root, out, "--format", "both")) == 0
    capsys.readouterr()
    check_outputs(out, refs)


def test_two_processes_at_once(setup, tmp_path):
    root, refs = setup
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "samhq.cli", *everything(root, out, "--format", "both")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    assert any(code == 0 for code, _, _ in results), results
    for code, _, err in results:
        assert code == 0 or (code == 2 and "another run" in err and "is writing to" in err), err
    check_outputs(out, refs)


def test_out_equal_to_input_is_refused_before_any_work(setup, capsys):
    root, _ = setup
    code = main(["everything", str(root / "in"), "--out", str(root / "in" / "."), "--model", "/no/such/model"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is the input folder" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in (root / "in").iterdir()) == [f"{n}.png" for n in NAMES]


def test_out_inside_input_is_never_read(setup, tmp_path, capsys):
    root, refs = setup
    data = tmp_path / "photos"
    data.mkdir()
    for n in NAMES[:2]:
        (data / f"{n}.png").write_bytes((root / "in" / f"{n}.png").read_bytes())
    out = data / "masks"
    args = ["everything", str(data), "--out", str(out), "--model", str(root / "model"), *AMG_ARGS, "--format", "both"]
    assert main(args) == 0
    assert "2 images done" in capsys.readouterr().out
    files = sorted(p for p in tmp_path.rglob("*"))
    for _ in range(2):  # reruns find the same two images, never the outputs
        assert main(args) == 0
        assert "0 images done, 2 skipped (already done), 0 failed" in capsys.readouterr().out
    assert sorted(p for p in tmp_path.rglob("*")) == files
    check_outputs(out, refs, NAMES[:2])
    # an explicit list naming a file inside --out: reported and skipped
    (tmp_path / "list.txt").write_text(f"{data / 'a.png'}\n{out / 'a_overlay.png'}\n")
    code = main(["everything", str(tmp_path / "list.txt"), "--out", str(out), "--model", str(root / "model"), *AMG_ARGS])
    assert code == 1 and "inside the output folder" in capsys.readouterr().err


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and sys.platform.startswith("linux")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, ro=False) -> a fresh tmpfs folder; unmounted afterwards. Skips where mounting is not allowed."""
    mounted = []

    def mount(size: str, ro: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(point)
        return point

    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root on Linux")
    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_read_only_output_is_found_before_the_model_loads(setup, tmp_path, capsys):
    root, _ = setup
    if _can_mount():
        ro = tmp_path / "ro"
        ro.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)]).returncode:
            pytest.skip("cannot mount a read-only tmpfs")
        try:
            code = main(everything(root, ro, "--model", "/no/such/model"))
        finally:
            subprocess.run(["umount", str(ro)])
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        code = main(everything(root, ro, "--model", "/no/such/model"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"samhq everything: error: cannot write to --out {ro}") and "no/such" not in err


def test_full_disk_real(setup, tmpfs, capsys):
    root, refs = setup
    out = tmpfs("48k")  # room for about one image's outputs
    code = main(everything(root, out, "--format", "both"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "No space left on device" in err and "a rerun redoes it" in err
    done = O.read_done(out, JOURNAL)
    assert 0 < len(done) < len(NAMES)
    assert not list(out.glob(O.TMP_PREFIX + "*"))  # the failed image's temporary files are gone
    check = subprocess.run(["mount", "-o", "remount,size=16m", str(out)], capture_output=True)
    assert check.returncode == 0, check.stderr
    assert main(everything(root, out, "--format", "both")) == 0
    assert f"{len(NAMES) - len(done)} images done, {len(done)} skipped" in capsys.readouterr().out
    check_outputs(out, refs)


def test_failed_write_is_cleaned_up_and_redone(setup, tmp_path, monkeypatch, capsys):
    root, refs = setup
    out = tmp_path / "out"
    real, calls = O.write_file, []

    def fail_on_fifth(path, write):
        calls.append(path)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, write)

    monkeypatch.setattr(O, "write_file", fail_on_fifth)
    assert main(everything(root, out, "--format", "both")) == 2
    assert "No space left on device" in capsys.readouterr().err
    failed_in = calls[-1].relative_to(out).parts[1]  # .samhq-tmp-PID/NAME...
    assert not list(out.glob(O.TMP_PREFIX + "*"))
    done = O.read_done(out, JOURNAL)
    assert all(not failed_in.startswith(n) for n in done)
    monkeypatch.setattr(O, "write_file", real)
    assert main(everything(root, out, "--format", "both")) == 0
    capsys.readouterr()
    check_outputs(out, refs)


def test_killed_run_resumes(setup, tmp_path):
    root, refs = setup
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "samhq.cli", *everything(root, out, "--format", "both")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not O.read_done(out, JOURNAL) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = O.read_done(out, JOURNAL)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{len(NAMES) - len(before)} images done, {len(before)} skipped" in r.stdout
    check_outputs(out, refs)


def test_outputs_not_recorded_as_done_are_redone(setup, tmp_path, capsys):
    """Killed after moving an image's files into place but before recording it: the rerun redoes it."""
    root, refs = setup
    out = tmp_path / "out"
    assert main(everything(root, out, "--format", "both")) == 0
    lines = (out / JOURNAL).read_text().splitlines()
    (out / JOURNAL).write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["name"] not in "bc")
                                   + '{"name": "c", "fi')  # c's record torn, b's missing
    (out / "b.json").write_text('{"images": [], "annot')  # as if cut short
    (out / "b_masks" / "000.png").unlink()
    capsys.readouterr()
    assert main(everything(root, out, "--format", "both")) == 0
    assert "2 images done, 2 skipped" in capsys.readouterr().out  # b and c
    check_outputs(out, refs)


def test_coco_bbox_is_pycocotools_own(setup, tmp_path, capsys):
    pytest.importorskip("pycocotools")
    from pycocotools import mask as mask_utils

    root, refs = setup
    assert main(everything(root, tmp_path / "out")) == 0
    capsys.readouterr()
    for name in NAMES:
        for ann in json.loads((tmp_path / "out" / f"{name}.json").read_text())["annotations"]:
            rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
            assert ann["bbox"] == mask_utils.toBbox(rle).tolist()
            ys, xs = np.nonzero(coco_to_mask(ann["segmentation"]))
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_segment_refuses_one_file_for_two_outputs(setup, tmp_path, capsys, monkeypatch):
    root, _ = setup
    monkeypatch.chdir(tmp_path)
    base = ["segment", str(root / "in" / "a.png"), "--model", str(root / "model"), "--point", "5,5"]
    for extra, text in ((["--out", "x.png", "--overlay", "x.png"], "--out and --overlay both name x.png"),
                        (["--out", "x.png", "--json", "./x.png"], "--out and --json both name x.png"),
                        (["--overlay", str(tmp_path / "o.png"), "--json", "o.png"], "--overlay and --json both name o.png")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
