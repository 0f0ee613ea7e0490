"""`samhq everything INPUT --out DIR`: automatic masks for one image, a folder of images or a list of paths.

Per image NAME (its path relative to the input folder, without the suffix) it writes
  DIR/NAME.json           COCO-style: image info and one annotation per mask (COCO RLE, bbox, area, scores)
  DIR/NAME_masks/NNN.png  one 0/255 PNG per mask            (--format png or both)
  DIR/NAME_overlay.png    the image with every mask in its own colour  (--format png or both)

The run owns DIR while it works: a second run on the same DIR stops at once with "another run is
writing to DIR" (a lock on DIR/.samhq-everything.lock, released by the system even when the run is
killed). DIR is checked to be writable before the model is loaded, and it is never read as input:
DIR equal to the input folder is refused, DIR inside it is left out of the search. An image's
outputs are written under a temporary folder, flushed to disk (fsync), moved into place, and only
then is the image recorded as done in DIR/.samhq-everything.done; a rerun skips the images recorded
there whose outputs all exist and redoes everything else, so a killed run, a full disk or a
read-only folder never leaves an image half done. A failed write removes its temporary files and
stops the run (exit 2). Existing outputs are only replaced with --force. Unreadable or too-large
images are reported ("skipped: reason") and the run goes on; the exit code is 1 when any failed.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ._common import add_image_args, add_model_arg, new_command

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
LOCK_FILE = ".samhq-everything.lock"
DONE_FILE = ".samhq-everything.done"
TMP_PREFIX = ".samhq-tmp-"


def register(sub) -> None:
    p = new_command(
        sub, "everything", "Segment everything: automatic masks for an image, a folder (recursive) or a list of paths.",
        "samhq everything photos/ --out masks/ --format both --points-per-side 32",
    )
    p.add_argument("input", help="an image, a folder (searched recursively) or a .txt file with one image path per line")
    p.add_argument("--out", "-o", required=True, help="output folder")
    add_model_arg(p)
    p.add_argument("--format", choices=["json", "png", "both"], default="json",
                   help="json: COCO-style masks; png: mask PNGs and an overlay; both (default: json)")
    p.add_argument("--points-per-side", type=int, default=32, help="prompt grid size (default 32)")
    p.add_argument("--points-per-batch", type=int, default=64, help="prompts per decoder call (default 64)")
    p.add_argument("--pred-iou-thresh", type=float, default=None,
                   help="minimum predicted IoU (default: the official generator's, 0.88 for SAM-HQ, 0.8 for SAM 2)")
    p.add_argument("--stability-thresh", type=float, default=0.95, help="minimum stability score (default 0.95)")
    p.add_argument("--box-nms-thresh", type=float, default=0.7, help="box IoU above which duplicates are dropped (default 0.7)")
    p.add_argument("--crop-layers", type=int, default=0, help="extra layers of image crops (default 0)")
    p.add_argument("--min-region-area", type=int, default=0,
                   help="fill holes / drop islands below this many pixels (default 0); SAM 2 models, as Meta's generator: "
                   "holes / specks of the low-res logits below this many low-res pixels")
    p.add_argument("--hq-token-only", action="store_true", help="use the HQ mask alone instead of SAM mask + HQ mask")
    p.add_argument("--use-m2m", action="store_true", help="SAM 2's mask-to-mask refinement: decode every mask once more "
                   "with its own low-res logits as the mask input")
    p.add_argument("--force", action="store_true", help="recompute and overwrite existing outputs")
    add_image_args(p)
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


def _inside(path: Path, folder: Path) -> bool:
    """Whether path is folder or lies under it (both resolved)."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def list_images(src, out_dir=None) -> list[tuple[Path, str]]:
    """(image path, output name) pairs for an image file, a folder (recursive) or a .txt list of paths.

    A folder's search leaves out `out_dir` when it lies inside the folder (outputs are never inputs).
    """
    src = Path(src)
    if not src.exists():
        raise ValueError(f"input not found: {src}")
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not (out_dir is not None and _inside(p, Path(out_dir))))
        pairs = [(p, p.relative_to(src).with_suffix("").as_posix()) for p in files]
        if not pairs:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {src}"
                             + (f" outside --out {out_dir}" if out_dir is not None and _inside(Path(out_dir), src) else ""))
    elif src.suffix.lower() == ".txt":
        lines = [s.strip() for s in src.read_text().splitlines()]
        paths = [Path(s) if Path(s).is_absolute() else src.parent / s for s in lines if s and not s.startswith("#")]
        if not paths:
            raise ValueError(f"{src} lists no image paths (one path per line expected)")
        pairs = []
        for p in paths:
            try:
                name = p.resolve().relative_to(src.parent.resolve()).with_suffix("").as_posix()
            except ValueError:  # outside the list's folder
                name = p.stem
            pairs.append((p, name))
    else:
        pairs = [(src, src.stem)]
    seen = {}
    for path, name in pairs:
        if name in seen:
            raise ValueError(f"{seen[name]} and {path} would write the same outputs ({name}.*); rename one")
        seen[name] = path
    return pairs


def outputs(out_dir: Path, name: str, fmt: str) -> dict[str, Path]:
    files = {}
    if fmt in ("json", "both"):
        files["json"] = out_dir / f"{name}.json"
    if fmt in ("png", "both"):
        files["masks"] = out_dir / f"{name}_masks"
        files["overlay"] = out_dir / f"{name}_overlay.png"
    return files


def _coco_bbox(segmentation: dict) -> list[int]:
    """COCO's bbox of a COCO RLE, by pycocotools' own `toBbox`: [x, y, w, h] with w = x_max - x_min + 1."""
    from ..masks import _coco_mask_api

    rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return [int(v) for v in _coco_mask_api().toBbox(rle)]


def coco_json(image_path: Path, height: int, width: int, records: list[dict], settings: dict) -> dict:
    """COCO-style document: one image and its mask annotations (segmentation as COCO RLE, bbox as COCO's)."""
    from ..masks import rle_to_coco

    anns = []
    for i, r in enumerate(records):
        segmentation = rle_to_coco(r["segmentation"])
        anns.append({
            "id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
            "segmentation": segmentation, "area": r["area"], "bbox": _coco_bbox(segmentation),
            "predicted_iou": r["predicted_iou"], "stability_score": r["stability_score"],
            "point_coords": r["point_coords"], "crop_box": r["crop_box"],
        })
    return {
        "images": [{"id": 1, "file_name": str(image_path), "height": height, "width": width}],
        "categories": [{"id": 1, "name": "object"}],
        "annotations": anns,
        "info": {"description": "samhq everything", **settings},
    }


# ---------------------------------------------------------------------------------------------
# Owning the output folder: a lock, a journal of finished images, staged and synced writes


class OutputLock:
    """An exclusive lock on DIR/.samhq-everything.lock (flock: the system drops it when the process dies)."""

    def __init__(self, folder: Path):
        self.folder, self.path, self.fd = folder, folder / LOCK_FILE, None

    def __enter__(self):
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ValueError(f"cannot write to --out {self.folder}: {e.strerror or e}") from None
            if not _try_lock(fd):
                owner = os.read(fd, 64).decode("ascii", "replace").strip()
                os.close(fd)
                raise ValueError(f"another run{f' (pid {owner})' if owner.isdigit() else ''} is writing to "
                                 f"{self.folder}; wait for it to finish, or give another --out")
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:  # the previous owner removed it between our open and our lock
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        try:
            os.unlink(self.path)  # while still holding the lock, so no one locks a file about to vanish
        except OSError:
            pass
        os.close(self.fd)


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def read_done(out_dir: Path) -> dict[str, set[str]]:
    """Image name -> its output files (relative to DIR) recorded as complete; a torn last line is ignored."""
    done: dict[str, set[str]] = {}
    try:
        lines = (out_dir / DONE_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return done
    for line in lines:
        try:
            entry = json.loads(line)
            done[entry["name"]] = set(entry["files"])
        except (ValueError, KeyError, TypeError):
            continue
    return done


def _mark_done(out_dir: Path, name: str, files) -> None:
    with open(out_dir / DONE_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"name": name, "files": sorted(files)}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _compact_done(out_dir: Path, done: dict[str, set[str]]) -> None:
    """Rewrite the journal with one line per image (reruns with --force append duplicates)."""
    tmp = out_dir / (DONE_FILE + f".{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"name": n, "files": sorted(fs)}) + "\n" for n, fs in sorted(done.items()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / DONE_FILE)
    _fsync_dir(out_dir)


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    """write(binary file object) into path, flushed to disk."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_outputs(out_dir: Path, staging: Path, files: dict[str, Path], writers: dict) -> None:
    """Write every output of one image under `staging`, fsync, then move each into place.

    writers: kind -> function(staged path). On any error the staged files are removed and the error
    is raised; the image is not marked done, so a rerun redoes it.
    """
    staged = []
    try:
        for kind, final in files.items():
            tmp = staging / final.relative_to(out_dir)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
            staged.append((tmp, final))
            writers[kind](tmp)
        for tmp, final in staged:
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)  # a mask folder is replaced as a whole
            os.replace(tmp, final)
        for parent in {final.parent for _, final in staged}:
            _fsync_dir(parent)
    finally:
        for tmp, _ in staged:
            _remove(tmp)


def _progress(items):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, unit="image", desc="samhq everything", disable=None)  # None: no bar when stderr is not a terminal


# ---------------------------------------------------------------------------------------------


def run(args) -> int:
    src, out_dir = Path(args.input), Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a folder")
    if src.is_dir() and out_dir.resolve() == src.resolve():
        raise ValueError(f"--out {out_dir} is the input folder: its outputs would be read as images by the next run; "
                         f"give another folder, e.g. --out {out_dir / 'samhq'} (left out of the input)")
    images = list_images(src, out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create --out {out_dir}: {e.strerror or e}") from None
    with OutputLock(out_dir):  # also the check that DIR is writable, before any work
        for stale in out_dir.glob(TMP_PREFIX + "*"):  # left by a killed run; we own DIR now
            _remove(stale)
        return _run_locked(args, images, out_dir)


def _run_locked(args, images, out_dir: Path) -> int:
    from PIL import Image

    from ..automatic import SamHQAutomaticMaskGenerator
    from ..image_io import to_rgb_array
    from ..masks import rle_to_mask
    from ..pipelines import load_for_inference
    from ..visualize import draw_masks

    done_files = read_done(out_dir)
    todo, skipped, failed = [], 0, 0
    for path, name in images:
        files = outputs(out_dir, name, args.format)
        rel = {p.relative_to(out_dir).as_posix() for p in files.values()}
        if _inside(path, out_dir):
            failed += 1
            print(f"samhq everything: skipped {path}: it is inside the output folder {out_dir}", file=sys.stderr)
        elif not args.force and rel <= done_files.get(name, set()) and all(p.exists() for p in files.values()):
            skipped += 1
        else:
            todo.append((path, name, files))
    settings = {
        "model": str(args.model), "points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
        "stability_score_thresh": args.stability_thresh, "box_nms_thresh": args.box_nms_thresh,
        "crop_n_layers": args.crop_layers, "min_mask_region_area": args.min_region_area, "hq_token_only": args.hq_token_only,
        "use_m2m": args.use_m2m,
    }
    done = n_masks = 0
    start = time.time()
    staging = out_dir / f"{TMP_PREFIX}{os.getpid()}"

    def summary():
        print(f"samhq everything: {done} images done, {skipped} skipped (already done), {failed} failed, "
              f"{n_masks} masks written to {out_dir} in {time.time() - start:.1f}s")

    try:
        if todo:
            model = load_for_inference(args.model, args.device, args.dtype)
            generator = SamHQAutomaticMaskGenerator(
                model, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_thresh,
                box_nms_thresh=args.box_nms_thresh, crop_n_layers=args.crop_layers,
                min_mask_region_area=args.min_region_area, output_mode="uncompressed_rle", use_m2m=args.use_m2m,
            )
            settings["pred_iou_thresh"] = generator.pred_iou_thresh  # the model family's default when not given
        for path, name, files in _progress(todo):
            try:
                image = to_rgb_array(path, bit_depth=args.bit_depth)
                records = generator.generate(image, hq_token_only=args.hq_token_only)
                text = None
                if "json" in files:
                    try:
                        text = json.dumps(coco_json(path, image.shape[0], image.shape[1], records, settings), allow_nan=False)
                    except ValueError:
                        raise ValueError("the model produced NaN or infinite scores (damaged weights, or a dtype that "
                                         "overflows)") from None
            except (ValueError, TypeError, OSError) as e:
                failed += 1
                print(f"samhq everything: skipped {path}: {e}", file=sys.stderr)
                continue
            masks = [rle_to_mask(r["segmentation"]) for r in records] if "masks" in files or "overlay" in files else []
            writers = {
                "json": lambda t: _write_file(t, lambda f: f.write(text.encode("utf-8"))),
                "masks": lambda t: _write_mask_pngs(t, masks),
                # larger masks first, so the small ones stay visible on top
                "overlay": lambda t: _write_file(t, lambda f: Image.fromarray(
                    draw_masks(image, sorted(masks, key=lambda m: -int(m.sum())))).save(f, format="PNG")),
            }
            complete = done_files.get(name, set()) | {p.relative_to(out_dir).as_posix() for p in files.values()}
            try:
                write_outputs(out_dir, staging, files, writers)
                _mark_done(out_dir, name, complete)
            except OSError as e:
                summary()
                raise ValueError(f"cannot write the outputs of {path} to {out_dir} ({e.strerror or e}); "
                                 "nothing of that image was kept, and a rerun redoes it") from None
            done_files[name] = complete
            done += 1
            n_masks += len(records)
    finally:
        _remove(staging)
    if done:
        try:
            _compact_done(out_dir, done_files)
        except OSError:
            pass  # the appended journal stays valid
    summary()
    return 1 if failed else 0


def _write_mask_pngs(folder: Path, masks: list[np.ndarray]) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, m in enumerate(masks):
        _write_file(folder / f"{i:03d}.png", lambda f: Image.fromarray(m.astype(np.uint8) * 255).save(f, format="PNG"))
    _fsync_dir(folder)
