"""Make docs/video_example.png: the video parity test's synthetic clip tracked by Meta's SAM2VideoPredictor and by
samhq's SamHQ2VideoPredictor on the same (random, perturbed) weights.

Rows are frames 0, 3, 6 and 9 (a click on the disk and a box on the square given on frame 0; the bar hides
the square on frame 9); columns: the frame with its ground truth, Meta's masks, samhq's masks, and the pixels
where the two disagree (none). The weights are random, so the masks show agreement, not segmentation quality.

Needs the references the tests use: `sh scripts/install_references.sh`. Run from the repository root:
    python examples/make_video_figure.py [--out docs/video_example.png]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the parity test's model builder and synthetic clip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "video_example.png"))
    args = parser.parse_args(argv)

    from sam2_ref import load_sam2, our_config, save_official
    if load_sam2() is None:
        sys.exit("needs Meta's sam2 and hydra-core: sh scripts/install_references.sh")
    from test_sam2_video_parity import SIZE, Pair, meta_video_predictor, write_jpegs

    from samhq.data.synthetic_video import moving_shapes
    from samhq.modeling.sam2 import load_sam2_model
    from samhq.video import SamHQ2VideoPredictor
    from samhq.visualize import draw_masks, palette

    torch.set_num_threads(1)
    frames, labels = moving_shapes(10)
    tmp = Path(tempfile.mkdtemp())
    ref, hiera = meta_video_predictor()
    ours = load_sam2_model(save_official(ref, tmp / "ckpt", our_config(hiera, SIZE)))
    pair = Pair(ref, SamHQ2VideoPredictor(ours, fill_hole_area=0), frames, write_jpegs(frames, tmp / "jpg")).start()
    pair.prompt("add_new_points_or_box", 0, 1, points=[[30, 30]], labels=[1])
    pair.prompt("add_new_points_or_box", 0, 2, box=[85, 55, 125, 85])
    with torch.inference_mode():
        meta = {t: (m[:, 0] > 0).numpy() for t, _, m in ref.propagate_in_video(pair.ref_state)}
    mine = {t: (m[:, 0] > 0).numpy() for t, _, m in pair.ours.propagate_in_video(pair.state)}

    colours = palette(2)
    rows = []
    for t in (0, 3, 6, 9):
        truth = draw_masks(frames[t], [labels[t] == 1, labels[t] == 2], colors=colours)
        differ = (meta[t] != mine[t]).any(axis=0)
        diff = np.where(differ[..., None], np.array([255, 0, 255], np.uint8), (frames[t] * 0.35).astype(np.uint8))
        tiles = [truth, draw_masks(frames[t], list(meta[t]), colors=colours),
                 draw_masks(frames[t], list(mine[t]), colors=colours), diff]
        rows.append(np.concatenate([np.pad(x, ((2, 2), (2, 2), (0, 0)), constant_values=255) for x in tiles], axis=1))
    grid = np.concatenate(rows, axis=0)
    header = Image.new("RGB", (grid.shape[1], 16), "white")
    draw = ImageDraw.Draw(header)
    width = grid.shape[1] // 4
    for i, text in enumerate(["truth", "Meta sam2", "samhq", "differ"]):
        draw.text((i * width + 4, 2), text, fill="black")
    image = Image.fromarray(np.concatenate([np.asarray(header), grid], axis=0))
    image.quantize(colors=96).save(args.out, optimize=True)  # a palette PNG: small enough for the docs
    print(f"wrote {args.out} ({image.width}x{image.height}); pixels that differ on the frames shown: "
          f"{sum(int((meta[t] != mine[t]).sum()) for t in (0, 3, 6, 9))}")


if __name__ == "__main__":
    main()
