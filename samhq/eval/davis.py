"""Video object segmentation on DAVIS-style folders: J (region similarity), F (boundary F-measure) and J&F.

The semi-supervised protocol of the DAVIS benchmark (Pont-Tuset et al. 2017, `davis2017-evaluation`):
each sequence's first-frame annotation gives the objects (ids 1..the largest id in it; 255 is void and
counts as background) and is the only input; the tracker predicts every other frame; the metrics are
computed per object on every frame except the first and the last, then summarised per object (mean,
recall = fraction of frames above 0.5, decay = the mean of the first quarter of frames minus that of the
last), averaged over all objects of all sequences; J&F is the mean of J and F.

- J: |prediction ∩ truth| / |prediction ∪ truth|, 1 when both are empty.
- F: the masks' one-pixel boundary maps (a pixel differs from its right, lower or lower-right neighbour;
  on the last row only the right one counts, on the last column the lower one, the bottom-right pixel
  never), each dilated by a disk of radius ceil(0.008 x the image diagonal); precision = predicted
  boundary pixels within the disk of a true one / predicted boundary pixels, recall the other way;
  F = 2PR / (P + R) (P = R = 1 when both boundaries are empty, P = 1, R = 0 when only the prediction's is).

Layout: ROOT/JPEGImages[/480p]/SEQ/*.jpg and ROOT/Annotations[/480p]/SEQ/*.png (indexed PNGs with the
object ids, at least the first frame's); DAVIS 2016 / 2017 and YouTube-VOS-style folders read as they are.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..video import IMAGE_SUFFIXES, masks_to_label_map, natural_key, open_video

VOID = 255


# ---------------------------------------------------------------------------------------------
# Metrics


def region_similarity(truth: np.ndarray, prediction: np.ndarray) -> float:
    """J of two (H, W) masks: intersection over union, 1 when both are empty."""
    truth, prediction = np.asarray(truth, bool), np.asarray(prediction, bool)
    union = np.logical_or(truth, prediction).sum()
    return 1.0 if union == 0 else float(np.logical_and(truth, prediction).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """The one-pixel boundary of an (H, W) mask, as the DAVIS benchmark draws it (see the module docstring)."""
    m = np.asarray(mask, bool)
    right, down, diag = np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
    right[:, :-1], down[:-1, :], diag[:-1, :-1] = m[:, 1:], m[1:, :], m[1:, 1:]
    edge = (m != right) | (m != down) | (m != diag)
    edge[-1, :] = m[-1, :] != right[-1, :]
    edge[:, -1] = m[:, -1] != down[:, -1]
    edge[-1, -1] = False
    return edge


def _disk(radius: float) -> np.ndarray:
    r = int(radius)
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= radius * radius


def boundary_f_measure(truth: np.ndarray, prediction: np.ndarray, bound_th: float = 0.008) -> float:
    """F of two (H, W) masks: the boundary F-measure with a tolerance of `bound_th` x the image diagonal (pixels when
    bound_th >= 1). Needs scipy."""
    try:
        from scipy.ndimage import binary_dilation
    except ImportError:
        raise ImportError("the boundary F-measure needs scipy: pip install 'samhq[video]'") from None
    truth, prediction = np.asarray(truth, bool), np.asarray(prediction, bool)
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*truth.shape))
    disk = _disk(radius)
    pred_edge, true_edge = boundary_map(prediction), boundary_map(truth)
    n_pred, n_true = int(pred_edge.sum()), int(true_edge.sum())
    if n_pred == 0 or n_true == 0:
        precision, recall = (1.0, 0.0) if n_true else (0.0, 1.0) if n_pred else (1.0, 1.0)
    else:
        precision = float((pred_edge & binary_dilation(true_edge, disk)).sum() / n_pred)
        recall = float((true_edge & binary_dilation(pred_edge, disk)).sum() / n_true)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def davis_statistics(values) -> tuple[float, float, float]:
    """(mean, recall, decay) of per-frame values, as the DAVIS benchmark: recall = fraction > 0.5; decay = mean of the
    first of four equal (overlapping at the edges) bins of frames minus the mean of the last."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    edges = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)
    bins = [v[edges[i]:edges[i + 1] + 1] for i in range(4)]
    return float(np.nanmean(v)), float(np.nanmean(v > 0.5)), float(np.nanmean(bins[0]) - np.nanmean(bins[3]))


# ---------------------------------------------------------------------------------------------
# The dataset


def _level(root: Path, name: str, resolution: str | None) -> Path:
    folder = root / name
    if resolution is not None:
        return folder / resolution
    return folder / "480p" if (folder / "480p").is_dir() else folder


def is_davis_folder(path) -> bool:
    """Whether `path` is a folder with JPEGImages/ and Annotations/ (a DAVIS-style video dataset)."""
    p = Path(path)
    return p.is_dir() and (p / "JPEGImages").is_dir() and (p / "Annotations").is_dir()


@dataclass
class DavisSequence:
    name: str
    frames: Path
    annotations: Path

    def annotation(self, frame_name: str) -> np.ndarray | None:
        path = self.annotations / f"{frame_name}.png"
        if not path.exists():
            return None
        from PIL import Image

        with Image.open(path) as im:
            labels = np.array(im if im.mode in ("P", "L", "I", "I;16") else im.convert("L"))
        if labels.ndim != 2:
            raise ValueError(f"{path}: an annotation must be an indexed (palette) or greyscale PNG of object ids")
        labels[labels == VOID] = 0
        return labels


def davis_sequences(root, sequences=None, resolution: str | None = None) -> list[DavisSequence]:
    """The sequences of a DAVIS-style folder (all, or the names in `sequences`). Raises ValueError for a missing layout
    or sequence."""
    root = Path(root)
    if not is_davis_folder(root):
        raise ValueError(f"{root} is not a DAVIS-style folder: it needs JPEGImages/ and Annotations/ sub-folders")
    images, annotations = _level(root, "JPEGImages", resolution), _level(root, "Annotations", resolution)
    names = sorted((p.name for p in images.iterdir() if p.is_dir() and (annotations / p.name).is_dir()), key=natural_key) \
        if images.is_dir() else []
    if sequences:
        missing = [s for s in sequences if s not in names]
        if missing:
            raise ValueError(f"{root}: no sequence {missing[0]!r} with both frames and annotations; found {names[:8]}")
        names = list(sequences)
    if not names:
        raise ValueError(f"{root}: no sequence folders under both {images} and {annotations}")
    return [DavisSequence(n, images / n, annotations / n) for n in names]


# ---------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class DavisResult:
    """Per-object records and their means. records: one dict per (sequence, object) with "frames" evaluated and
    J_mean, J_recall, J_decay, F_mean, F_recall, F_decay; summary: "J&F", "J_mean", ... over all objects."""

    records: list[dict]
    settings: dict = field(default_factory=dict)

    @property
    def summary(self) -> dict:
        out = {"sequences": len({r["sequence"] for r in self.records}), "objects": len(self.records)}
        for key in ("J_mean", "J_recall", "J_decay", "F_mean", "F_recall", "F_decay"):
            out[key] = float(np.nanmean([r[key] for r in self.records])) if self.records else float("nan")
        out["J&F"] = (out["J_mean"] + out["F_mean"]) / 2
        return out

    def table(self) -> str:
        s = self.summary
        head = f"{'':>12} {'J&F':>7} {'J mean':>7} {'J rec':>7} {'J decay':>7} {'F mean':>7} {'F rec':>7} {'F decay':>7}"
        row = (f"{'all':>12} {s['J&F']:7.4f} {s['J_mean']:7.4f} {s['J_recall']:7.4f} {s['J_decay']:7.4f} "
               f"{s['F_mean']:7.4f} {s['F_recall']:7.4f} {s['F_decay']:7.4f}")
        return f"{head}\n{row}  ({s['objects']} objects in {s['sequences']} sequences)"

    def save_json(self, path, overwrite: bool = False) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
        doc = {"summary": self.summary, "settings": self.settings, "objects": self.records}
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path

    def save_csv(self, path, overwrite: bool = False) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
        keys = ["sequence", "object", "frames", "J_mean", "J_recall", "J_decay", "F_mean", "F_recall", "F_decay"]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows({k: r[k] for k in keys} for r in self.records)
        return path


def evaluate_davis(predictor, root, sequences=None, resolution: str | None = None, bound_th: float = 0.008,
                   progress: bool = False, results_dir=None) -> DavisResult:
    """Run `predictor` (a `samhq.video.SamHQ2VideoPredictor`) on a DAVIS-style folder with the semi-supervised protocol
    (first-frame masks as prompts) and score it (see the module docstring).

    results_dir: also write the predicted label maps there (SEQ/FRAME.png, the benchmark's results layout).
    Raises ValueError for a folder that is not DAVIS-style, a sequence without a first-frame annotation or frames and
    annotations of different sizes.
    """
    records = []
    seqs = davis_sequences(root, sequences, resolution)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(seqs), desc="davis", unit="sequence")
    for seq in seqs:
        files = sorted((p for p in seq.frames.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: natural_key(p.name))
        frames = open_video(seq.frames)
        first = seq.annotation(frames.names[0])
        if first is None:
            raise ValueError(f"{seq.annotations}: no annotation {frames.names[0]}.png for the sequence's first frame "
                             f"{files[0].name}")
        if first.shape != (frames.height, frames.width):
            raise ValueError(f"{seq.name}: the annotations are {first.shape[1]}x{first.shape[0]}, the frames "
                             f"{frames.width}x{frames.height}")
        obj_ids = list(range(1, int(first.max()) + 1))
        if not obj_ids:
            raise ValueError(f"{seq.name}: the first frame's annotation has no object")
        state = predictor.init_state(frames)
        for obj in obj_ids:
            predictor.add_new_mask(state, 0, obj, first == obj)
        scores = {obj: ([], []) for obj in obj_ids}
        out = Path(results_dir) / seq.name if results_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        last = len(frames) - 1
        for i, ids, logits in predictor.propagate_in_video(state, start_frame_idx=0):
            labels = masks_to_label_map(ids, logits[:, 0].float().cpu().numpy())
            if out is not None:
                from PIL import Image

                Image.fromarray(labels).save(out / f"{frames.names[i]}.png")
            if i in (0, last):
                continue
            truth = seq.annotation(frames.names[i])
            if truth is None:  # frames without annotation are not scored
                continue
            for obj in obj_ids:
                scores[obj][0].append(region_similarity(truth == obj, labels == obj))
                scores[obj][1].append(boundary_f_measure(truth == obj, labels == obj, bound_th))
        for obj in obj_ids:
            j, f = scores[obj]
            jm, jr, jd = davis_statistics(j)
            fm, fr, fd = davis_statistics(f)
            records.append({"sequence": seq.name, "object": obj, "frames": len(j), "J_mean": jm, "J_recall": jr,
                            "J_decay": jd, "F_mean": fm, "F_recall": fr, "F_decay": fd})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return DavisResult(records, {"root": str(root), "protocol": "semi-supervised, first-frame masks", "bound_th": bound_th})


__all__ = ["region_similarity", "boundary_f_measure", "boundary_map", "davis_statistics", "is_davis_folder",
           "davis_sequences", "evaluate_davis", "DavisResult", "DavisSequence"]
