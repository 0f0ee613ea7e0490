"""Short stage-2 trials from a stage-1 model: which change lifts the HQ box mIoU of the demo recipe?

Each trial starts from the same stage-1 model, trains on SyntheticShapes(2000, 64, seed=1) with a
batch of 8 on one thread, and reports SAM-token and HQ box mIoU / mBIoU on 100 held-out images
(SyntheticShapes(100, 64, seed=1000)) three times along the way. Trials:
  hq        the paper's recipe (HQ parts only, dense BCE + dice), the baseline
  decoder   the whole mask decoder trainable (loss on the HQ mask)
  full      everything trainable, lr 3e-4, half the steps (a step costs twice as much)
  points    HQ parts only with the point-sampled loss
  block0, block1
            HQ parts only, fusing the output of ViT block 0 or 1 instead of the first global-attention block

Usage: python benchmarks/stage2_trials.py runs/samhq-tiny-shapes/stage1/model [--trials hq,decoder] [--steps 1500]
Run two at a time on a 2-core machine (one thread each); 1,500 steps take ~11 minutes.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

TRIALS = {
    "hq": dict(recipe="hq"),
    "decoder": dict(recipe="decoder", outputs="hq"),
    "full": dict(recipe="full", outputs="hq", lr=3e-4, step_fraction=0.5),
    "points": dict(recipe="hq", point_loss=True),
    "block0": dict(recipe="hq"),
    "block1": dict(recipe="hq"),
}


def fuse_block(encoder, block: int) -> None:
    """Make the encoder return the output of `block` as its early (fused) feature."""
    seen = {}
    encoder.layers[block].register_forward_hook(lambda module, args, out: seen.update(x=out))
    forward = encoder.forward

    def with_block(pixel_values):
        embeddings, _ = forward(pixel_values)
        return embeddings, [seen["x"]]

    encoder.forward = with_block


def run_trial(name: str, model_dir: str, steps: int) -> list[dict]:
    from samhq import SamHQModel
    from samhq.data.synthetic import SyntheticShapes
    from samhq.eval import evaluate
    from samhq.train.trainer import TrainConfig, Trainer

    opts = {"lr": 1e-3, **TRIALS[name]}
    steps = max(3, int(steps * opts.pop("step_fraction", 1)))
    model = SamHQModel.from_pretrained(model_dir)
    if name.startswith("block"):
        fuse_block(model.vision_encoder, int(name[5:]))
    config = TrainConfig(targets="fine", steps=steps, batch_size=8, masks_per_image=4, warmup_steps=50,
                         save_every=10**9, progress=False, **opts)
    held = SyntheticShapes(100, 64, seed=1000)
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, SyntheticShapes(2000, 64, seed=1), config, out)
        for stop in (steps // 3, 2 * steps // 3, steps):
            while trainer.step < stop:
                trainer.train_step()
            box = evaluate(model, held, "box", progress=False).summary["box"]
            row = {"trial": name, "step": stop, "seconds": round(time.time() - t0),
                   **{f"{o}_{k}": round(v[k], 4) for o, v in box.items() for k in ("mIoU", "mBIoU")}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="the stage-1 model folder (runs/samhq-tiny-shapes/stage1/model after train_demo.sh)")
    p.add_argument("--trials", default=",".join(TRIALS), help=f"comma-separated, from {','.join(TRIALS)}")
    p.add_argument("--steps", type=int, default=1500)
    a = p.parse_args(argv)
    names = [t for t in a.trials.split(",") if t]
    unknown = [t for t in names if t not in TRIALS]
    if unknown:
        p.error(f"unknown trials {unknown}; choose from {list(TRIALS)}")
    if a.steps < 3:
        p.error("--steps must be at least 3")
    torch.set_num_threads(1)
    for name in names:
        run_trial(name, a.model, a.steps)


if __name__ == "__main__":
    main()
