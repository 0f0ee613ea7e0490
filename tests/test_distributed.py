"""A 2-process torchrun (gloo) training run: identical weights on both ranks, and the ranks together
see exactly the global batch a single process sees."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import distributed as dist

from samhq.data.synthetic import SyntheticShapes
from samhq.train import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

OPTIONS = dict(recipe="full", steps=2, batch_size=2, masks_per_image=1, lr=1e-3, warmup_steps=1, log_every=1,
               progress=False, save_every=100, prompt_mix=(1, 1, 0))

SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_train import tiny_model
from samhq.data.synthetic import SyntheticShapes
from samhq.train import TrainConfig, Trainer, init_distributed

torch.set_num_threads(1)
rank, world = init_distributed()
assert world == 2, world
out = sys.argv[1]
model = tiny_model(seed=rank)  # different on purpose: rank 0's weights must be broadcast
trainer = Trainer(model, SyntheticShapes(8, 64, seed=4), TrainConfig(**json.loads(sys.argv[2])), out)
trainer.train(save_final=False)
torch.save({{n: p.detach() for n, p in model.named_parameters()}}, f"{{out}}/rank{{rank}}.pt")
"""


def test_two_process_torchrun_keeps_ranks_identical(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(Path(__file__).parent))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path), json.dumps(OPTIONS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    start = dict(tiny_model(seed=0).named_parameters())
    assert any(not torch.equal(w0[n], start[n]) for n in w0)  # it trained

    # The first step's loss (before any update) is the mean over the whole global batch: a single
    # process with the same options must see the same images and prompts.
    ddp_log = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    torch.set_num_threads(1)
    single = Trainer(tiny_model(seed=0), SyntheticShapes(8, 64, seed=4), TrainConfig(**OPTIONS), tmp_path / "single")
    single.train(save_final=False)
    single_log = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert ddp_log[0]["step"] == single_log[0]["step"] == 1
    assert ddp_log[0]["loss"] == pytest.approx(single_log[0]["loss"], abs=1e-5)
