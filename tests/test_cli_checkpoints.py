"""`samhq convert` and `samhq info` run as a user runs them: as subprocesses."""
import json
import subprocess
import sys

import pytest
import torch

from samhq import SamHQModel
from samhq.checkpoints import read_checkpoint

from conftest import small_config


def samhq(*args):
    return subprocess.run([sys.executable, "-m", "samhq.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def seed_dir(tmp_path, small_model):
    small_model.save_pretrained(tmp_path / "seed")
    return tmp_path / "seed"


def test_convert_both_ways_keeps_every_tensor(seed_dir, tmp_path):
    r = samhq("convert", seed_dir, tmp_path / "official.pth")
    assert r.returncode == 0, r.stderr
    r = samhq("convert", tmp_path / "official.pth", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    a, _, _ = read_checkpoint(seed_dir)
    b, _, _ = read_checkpoint(tmp_path / "back")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_convert_refuses_to_overwrite_without_force(seed_dir, tmp_path):
    dst = tmp_path / "official.pth"
    dst.write_bytes(b"user data")
    r = samhq("convert", seed_dir, dst)
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert dst.read_bytes() == b"user data"
    assert samhq("convert", seed_dir, dst, "--force").returncode == 0
    assert dst.stat().st_size > 1000


def test_info_reports_the_checkpoint(seed_dir):
    r = samhq("info", seed_dir, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["parameters"] == sum(p.numel() for p in SamHQModel(small_config()).parameters())
    assert info["image_size"] == 1024 and info["hq"] is True and info["dtype"] == "float32"
    assert info["variant"] == "custom"


def test_missing_checkpoint_is_one_line_error(tmp_path):
    r = samhq("info", tmp_path / "nope.pth")
    assert r.returncode == 2
    assert "nope.pth" in r.stderr and "Traceback" not in r.stderr


def test_every_command_help_shows_an_example():
    r = samhq("--help")
    assert r.returncode == 0
    commands = [c for c in ("segment", "everything", "info", "convert", "train", "evaluate", "export") if f"    {c} " in r.stdout]
    assert "convert" in commands and "info" in commands
    for c in commands:
        h = samhq(c, "--help")
        assert h.returncode == 0 and "example:" in h.stdout, c
