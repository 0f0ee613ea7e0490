"""`samhq track VIDEO --point FRAME,X,Y[,LABEL[,OBJ]] --box FRAME,X0,Y0,X1,Y1[,OBJ] --mask FRAME,PNG[,OBJ] --out DIR`.

Tracks objects through a video (a video file or a folder of frames) with a SAM 2 / SAM 2.1 / HQ-SAM 2
checkpoint that has the video modules. Prompts name the frame (0-based, in the whole video) and the
object id (default 1); points are LABEL 1 (object, default) or 0 (background), so a point on a later
frame corrects the track there; all prompts are given before tracking (every prompted frame is a
conditioning frame of its object). Tracking runs forwards from the first prompted frame to the end of
the range and backwards from it to the start.

DIR receives:
  DIR/masks/NAME.png   one label map per frame: each pixel the id of its object (0: none; uint8, or uint16
                       for ids over 255), where objects overlap the one with the higher logit
  DIR/tracks.json      YouTube-VIS-style: the video (file names, size), one annotation per object with a COCO
                       RLE (or null), area, bbox and object-score logit per frame
and, with --overlay FILE.mp4 / FILE.gif, the video with the masks drawn on it.

Each frame's PNG is written to a temporary name and renamed when complete, so an interrupted run leaves no
half-written frame; tracks.json and the overlay are written at the end. Existing outputs are replaced only
with --force. Bad prompts, missing files and unsuitable checkpoints are reported in one line before any
tracking starts.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ._common import add_image_args, new_command, refuse_overwrite


def register(sub) -> None:
    p = new_command(
        sub, "track", "Track objects through a video from point, box or mask prompts; write a mask per frame.",
        "samhq track clip.mp4 --model sam2.1_hq_hiera_large.pt --point 0,210,350 --box 0,300,0,500,400,2 "
        "--point 40,220,330,0 --out tracks/ --overlay tracks/overlay.mp4",
    )
    p.add_argument("video", help="a video file (mp4, mov, avi, mkv, webm, gif; needs PyAV) or a folder of frame images")
    p.add_argument("--model", "-m", required=True, metavar="SRC",
                   help="a full SAM 2 / SAM 2.1 / HQ-SAM 2 checkpoint with the video modules (official .pt such as "
                        "sam2.1_hq_hiera_large.pt, a transformers Sam2Video folder, or a hub id)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the image encoder's precision (default float32, exact; auto: bfloat16 on a GPU or a CPU with "
                   "BF16 units, else float32)")
    p.add_argument("--point", action="append", default=[], metavar="FRAME,X,Y[,LABEL[,OBJ]]",
                   help="a click in pixels on frame FRAME; LABEL 1 = object (default), 0 = background; OBJ the object id "
                        "(default 1). Repeat for more points, frames and objects")
    p.add_argument("--box", action="append", default=[], metavar="FRAME,X0,Y0,X1,Y1[,OBJ]",
                   help="a box in pixels on frame FRAME for object OBJ (default 1); at most one per object and frame")
    p.add_argument("--mask", action="append", default=[], metavar="FRAME,PNG[,OBJ]",
                   help="a mask image of the frame's size (non-zero pixels: the object) for object OBJ (default 1)")
    p.add_argument("--out", "-o", required=True, help="output folder (masks/ and tracks.json)")
    p.add_argument("--start", type=int, default=0, help="first frame to track (default 0)")
    p.add_argument("--end", type=int, help="stop before this frame (default: the end of the video)")
    p.add_argument("--stride", type=int, default=1, help="track every K-th frame from --start (default 1)")
    p.add_argument("--overlay", metavar="FILE", help="also write the video with the masks drawn on it (.mp4, .mkv, .avi or .gif)")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate of the overlay video (default 10)")
    p.add_argument("--fill-hole-area", type=int, default=8,
                   help="fill holes of up to this many low-resolution pixels in each mask, as Meta's video predictor "
                        "(default 8; 0 = off)")
    p.add_argument("--feature-window", type=int, default=4,
                   help="frames whose image features are kept in memory (default 4)")
    p.add_argument("--offload", action="store_true",
                   help="keep the tracking state and features in CPU memory when tracking on a GPU")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    add_image_args(p, prompts=True, bit_depth=False)
    p.set_defaults(func=run)


def _numbers(text: str, option: str, counts: tuple[int, ...], form: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = None
    if values is None or len(values) not in counts:
        raise ValueError(f"--{option} expects {form}, got {text!r}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"--{option} {text!r} contains NaN or infinite values")
    return values


def _integer(value: float, what: str, text: str, option: str, low: int = 0) -> int:
    if value != int(value) or value < low:
        raise ValueError(f"--{option} {text!r}: {what} must be a whole number >= {low}")
    return int(value)


def parse_prompts(points: list[str], boxes: list[str], masks: list[str]) -> dict:
    """{(frame, obj): {"points": [[x, y]], "labels": [...], "box": [4] or None, "mask": path or None}} from the options."""
    prompts: dict = {}

    def entry(frame, obj):
        return prompts.setdefault((frame, obj), {"points": [], "labels": [], "box": None, "mask": None})

    for text in points:
        v = _numbers(text, "point", (3, 4, 5), "FRAME,X,Y[,LABEL[,OBJ]]")
        label = 1 if len(v) < 4 else v[3]
        if label not in (0, 1):
            raise ValueError(f"--point {text!r}: LABEL must be 1 (object) or 0 (background)")
        e = entry(_integer(v[0], "FRAME", text, "point"), _integer(v[4], "OBJ", text, "point", 1) if len(v) == 5 else 1)
        e["points"].append(v[1:3])
        e["labels"].append(int(label))
    for text in boxes:
        v = _numbers(text, "box", (5, 6), "FRAME,X0,Y0,X1,Y1[,OBJ]")
        e = entry(_integer(v[0], "FRAME", text, "box"), _integer(v[5], "OBJ", text, "box", 1) if len(v) == 6 else 1)
        if e["box"] is not None:
            raise ValueError(f"--box {text!r}: object {int(v[5]) if len(v) == 6 else 1} already has a box on frame {int(v[0])}")
        if v[3] < v[1] or v[4] < v[2]:
            raise ValueError(f"--box {text!r}: X1,Y1 must not be left of or above X0,Y0")
        e["box"] = v[1:5]
    for text in masks:
        parts = text.split(",")
        if len(parts) not in (2, 3):
            raise ValueError(f"--mask expects FRAME,PNG[,OBJ], got {text!r}")
        try:
            frame, obj = int(parts[0]), int(parts[2]) if len(parts) == 3 else 1
        except ValueError:
            raise ValueError(f"--mask {text!r}: FRAME and OBJ must be whole numbers") from None
        if frame < 0 or obj < 1:
            raise ValueError(f"--mask {text!r}: FRAME must be >= 0 and OBJ >= 1")
        e = entry(frame, obj)
        if not Path(parts[1]).is_file():
            raise FileNotFoundError(f"--mask {text!r}: {parts[1]} not found")
        e["mask"] = parts[1]
    if not prompts:
        raise ValueError("give at least one prompt: --point FRAME,X,Y, --box FRAME,X0,Y0,X1,Y1 or --mask FRAME,PNG")
    for (frame, obj), e in prompts.items():
        if e["mask"] is not None and (e["points"] or e["box"] is not None):
            raise ValueError(f"object {obj} on frame {frame} has a --mask and points or a box: give one kind of prompt per "
                             "object and frame")
    if max(obj for _, obj in prompts) > 65535:
        raise ValueError("object ids must be at most 65535 (they are the pixel values of the 16-bit label maps)")
    return prompts


def _read_mask(path: str, height: int, width: int) -> np.ndarray:
    from ..image_io import open_image

    arr = np.asarray(open_image(path))
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.shape != (height, width):
        raise ValueError(f"--mask {path} is {arr.shape[1]}x{arr.shape[0]} pixels but the video's frames are {width}x{height}")
    return arr > 0


def _write_png_atomically(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            Image.fromarray(array).save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_overlay(path: Path, frames, masks_dir: Path, names: list[str], obj_ids: list[int], fps: float) -> None:
    """The frames with their label maps drawn (one colour per object), encoded with PyAV, one frame at a time."""
    import av
    from PIL import Image

    from ..visualize import draw_masks, palette

    colours = palette(len(obj_ids))
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        container = av.open(str(tmp), "w")
        gif = path.suffix.lower() == ".gif"
        codec = "gif" if gif else ("libx264" if "libx264" in av.codecs_available else "mpeg4")
        stream = container.add_stream(codec, rate=max(1, round(fps)))
        h, w = frames.height, frames.width
        # yuv420p needs even sides: the frame is padded by a row / column when needed
        stream.height, stream.width = (h, w) if gif else (h + h % 2, w + w % 2)
        stream.pix_fmt = "rgb8" if gif else "yuv420p"
        for i, name in enumerate(names):
            labels = np.asarray(Image.open(masks_dir / f"{name}.png"))
            image = draw_masks(frames[i], [labels == o for o in obj_ids], colors=colours)
            if not gif:
                image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        container.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def run(args) -> int:
    from ..dtypes import resolve_dtype
    from ..masks import mask_bbox, mask_to_coco
    from ..video import SamHQ2VideoPredictor, masks_to_label_map, open_video

    if args.stride < 1 or args.start < 0 or (args.end is not None and args.end <= args.start):
        raise ValueError("--stride must be >= 1, --start >= 0 and --end after --start")
    if args.fill_hole_area < 0 or args.feature_window < 1 or args.fps <= 0:
        raise ValueError("--fill-hole-area must be >= 0, --feature-window >= 1 and --fps > 0")
    prompts = parse_prompts(args.point, args.box, args.mask)
    out = Path(args.out)
    masks_dir, json_path = out / "masks", out / "tracks.json"
    overlay = Path(args.overlay) if args.overlay else None
    if overlay is not None:
        if overlay.suffix.lower() not in (".mp4", ".mkv", ".avi", ".gif", ".mov"):
            raise ValueError(f"--overlay {overlay}: use a .mp4, .mkv, .avi, .mov or .gif file name")
        if not overlay.parent.is_dir() and overlay.parent != out:
            raise ValueError(f"--overlay folder {overlay.parent} does not exist")
    existing = [json_path] + ([masks_dir] if masks_dir.is_dir() and any(masks_dir.iterdir()) else []) + \
        ([overlay] if overlay is not None else [])
    refuse_overwrite(existing, args.force)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    mask_to_coco(np.zeros((1, 1), bool))  # fail now, before any work, when pycocotools is missing
    if overlay is not None:
        try:
            import av  # noqa: F401
        except ImportError:
            raise ImportError("--overlay needs PyAV: pip install 'samhq[video]'") from None

    video = open_video(args.video)
    frames = video.subset(args.start, args.end, args.stride)
    position = {frame: i for i, frame in enumerate(range(len(video))[args.start:args.end:args.stride])}
    for (frame, obj) in prompts:
        if frame not in position:
            raise ValueError(f"a prompt for object {obj} is on frame {frame}, which is not tracked (the video has "
                             f"{len(video)} frames; --start {args.start}, --end {args.end}, --stride {args.stride})")
    masks = {key: _read_mask(e["mask"], frames.height, frames.width) for key, e in prompts.items() if e["mask"] is not None}

    predictor = SamHQ2VideoPredictor.from_pretrained(args.model, device=args.device, dtype=resolve_dtype(args.dtype, args.device),
                                                     fill_hole_area=args.fill_hole_area, feature_window=args.feature_window)
    state = predictor.init_state(frames, offload_state_to_cpu=args.offload)
    for (frame, obj), e in sorted(prompts.items()):
        i = position[frame]
        if e["mask"] is not None:
            predictor.add_new_mask(state, i, obj, masks[(frame, obj)])
            continue
        if e["box"] is not None:
            predictor.add_new_points_or_box(state, i, obj, box=e["box"])
        if e["points"]:
            predictor.add_new_points_or_box(state, i, obj, points=e["points"], labels=e["labels"],
                                            clear_old_points=e["box"] is None)

    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(exist_ok=True)
    n = len(frames)
    obj_ids = list(state.obj_ids)
    records = {obj: {"segmentations": [None] * n, "areas": [None] * n, "bboxes": [None] * n, "object_scores": [None] * n}
               for obj in obj_ids}
    first = min(position[frame] for frame, _ in prompts)
    done = set()
    with tqdm(total=n, desc="track", unit="frame") as bar:
        for reverse in (False, True):
            if reverse and first == 0:
                break
            for i, ids, logits in predictor.propagate_in_video(state, start_frame_idx=first, reverse=reverse):
                if i in done:
                    continue
                labels = masks_to_label_map(ids, logits[:, 0].float().cpu().numpy())
                _write_png_atomically(masks_dir / f"{frames.names[i]}.png", labels)
                scores = predictor.object_scores(state, i)
                for k, obj in enumerate(ids):
                    m = labels == obj
                    r = records[obj]
                    r["object_scores"][i] = round(float(scores[k]), 4)
                    r["areas"][i] = int(m.sum())
                    if r["areas"][i]:
                        r["segmentations"][i], r["bboxes"][i] = mask_to_coco(m), mask_bbox(m)
                done.add(i)
                bar.update(1)
    doc = {
        "videos": [{"id": 1, "file_names": [f"{name}.png" for name in frames.names], "source": str(args.video),
                    "height": int(frames.height), "width": int(frames.width), "length": n,
                    "frame_indices": list(position)}],
        "annotations": [{"id": k + 1, "video_id": 1, "object_id": int(obj), "category_id": 1, "iscrowd": 0,
                         **records[obj]} for k, obj in enumerate(obj_ids)],
        "categories": [{"id": 1, "name": "object"}],
        "info": {"model": str(args.model), "hq": bool(predictor.model.hq_enabled)},
    }
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(doc, allow_nan=False) + "\n")
    os.replace(tmp, json_path)
    print(f"wrote {n} label maps to {masks_dir} and {json_path}")
    if overlay is not None:
        write_overlay(overlay, frames, masks_dir, frames.names, obj_ids, args.fps)
        print(f"wrote {overlay}")
    return 0
