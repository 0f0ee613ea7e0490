"""A run's output folder, owned while it works (shared by `samhq everything` and `samhq segment --prompts`).

- A lock: DIR/.samhq.lock (flock; the system drops it when the process dies). A second run on the
  same DIR stops at once with "another run (pid N) is writing to DIR".
- A journal of finished images: DIR/.samhq-COMMAND.done, one JSON line {"name", "files"} per image,
  appended and fsync'ed after the image's files are in place. An image counts as done when the
  journal lists every file it needs and they all exist; a torn last line is ignored.
- Staged writes: an image's files are written under DIR/.samhq-tmp-PID/, fsync'ed, moved into place
  (a folder is replaced as a whole), the folders fsync'ed, and only then is the image journaled, so a
  killed run, a full disk or a read-only folder never leaves an image half done; a failed write
  removes its staged files. Stale staging folders of killed runs are removed when a run takes DIR.
- Files made of all images together (COCO instances, Label Studio tasks, results.json) are written
  last, staged and renamed the same way, from the journaled images: a rerun rewrites them.

Also the commands' --format lists: `parse_output_formats` and the per-image and whole-run files of the
annotation formats (`samhq.formats`), the georeferenced ones (`samhq.geo`) for rasters with a CRS.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

LOCK_FILE = ".samhq.lock"
TMP_PREFIX = ".samhq-tmp-"
OWN_FORMATS = ("json", "png")  # the commands' own files: NAME.json, NAME_masks/ + NAME_overlay.png
GEO_FORMATS = ("geotiff", "gpkg")  # georeferenced rasters only (samhq.geo): geotiff/NAME.tif, gpkg/NAME.gpkg
DATASET_FORMATS = ("coco", "labelstudio")  # one file for all images (yolo adds data.yaml)
NAN_MESSAGE = "the model produced NaN or infinite scores (damaged weights, or a dtype that overflows)"


# ---------------------------------------------------------------------------------------------
# The lock


class OutputLock:
    """An exclusive lock on DIR/.samhq.lock (flock: the system drops it when the process dies)."""

    def __init__(self, folder: Path):
        self.folder, self.path, self.fd = Path(folder), Path(folder) / LOCK_FILE, None

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


# ---------------------------------------------------------------------------------------------
# Files on disk


def fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, write) -> None:
    """write(binary file object) into path, flushed to disk."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def data_writer(data):
    """A writer (staged path -> None) for `samhq.formats` file data: text, bytes, or a folder's {name: bytes}."""
    if isinstance(data, dict):
        def write_folder(path: Path) -> None:
            path.mkdir(parents=True)
            for name, blob in data.items():
                write_file(path / name, lambda f, blob=blob: f.write(blob))
            fsync_dir(path)
        return write_folder
    blob = data if isinstance(data, bytes) else data.encode("utf-8")
    return lambda path: write_file(path, lambda f: f.write(blob))


# ---------------------------------------------------------------------------------------------
# The journal


def read_done(out_dir: Path, journal: str) -> dict[str, set[str]]:
    """Image name -> its output files (relative to DIR) recorded as complete; a torn last line is ignored."""
    done: dict[str, set[str]] = {}
    try:
        lines = (Path(out_dir) / journal).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return done
    for line in lines:
        try:
            entry = json.loads(line)
            done[entry["name"]] = set(entry["files"])
        except (ValueError, KeyError, TypeError):
            continue
    return done


class OutputFolder:
    """Own an output folder for one run (see the module docstring): `with OutputFolder(DIR, "everything") as out:`.

    Entering creates DIR, takes the lock (ValueError "cannot write to --out DIR" or "another run is
    writing to DIR": before any work), removes stale staging folders and reads the journal.
    `is_done(name, paths)`, `write(name, {path: writer})` (an image's files, journaled), `write_data`
    (a whole-run file, not journaled). Leaving removes the staging folder and rewrites the journal
    with one line per image.
    """

    def __init__(self, folder, command: str):
        self.folder = Path(folder)
        self.journal = f".samhq-{command}.done"
        self.done: dict[str, set[str]] = {}
        self.lock = OutputLock(self.folder)
        self.staging = self.folder / f"{TMP_PREFIX}{os.getpid()}"
        self.changed = False

    def __enter__(self) -> OutputFolder:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create --out {self.folder}: {e.strerror or e}") from None
        self.lock.__enter__()  # also the check that DIR is writable
        for stale in self.folder.glob(TMP_PREFIX + "*"):  # left by a killed run; we own DIR now
            remove(stale)
        self.done = read_done(self.folder, self.journal)
        return self

    def __exit__(self, *exc) -> None:
        try:
            remove(self.staging)
            if self.changed:
                try:
                    self._compact()
                except OSError:
                    pass  # the appended journal stays valid
        finally:
            self.lock.__exit__(*exc)

    def relative(self, path: Path) -> str:
        return Path(path).relative_to(self.folder).as_posix()

    def is_done(self, name: str, paths) -> bool:
        """Whether the journal lists all of `paths` for `name` and they all exist."""
        paths = list(paths)
        return {self.relative(p) for p in paths} <= self.done.get(name, set()) and all(p.exists() for p in paths)

    def write(self, name: str, outputs: dict) -> None:
        """Write one image's outputs {final path: writer(staged path)}, fsync them, move them into place, then
        journal the image (with the files it had before). On any error (OSError) the staged files are
        removed and the error raised; the image is not journaled, so a rerun redoes it."""
        staged = []
        try:
            for final, writer in outputs.items():
                tmp = self.staging / Path(final).relative_to(self.folder)
                tmp.parent.mkdir(parents=True, exist_ok=True)
                remove(tmp)
                staged.append((tmp, Path(final)))
                writer(tmp)
            for tmp, final in staged:
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.is_dir() and not final.is_symlink():
                    shutil.rmtree(final)  # a folder of masks is replaced as a whole
                os.replace(tmp, final)
            for parent in {final.parent for _, final in staged}:
                fsync_dir(parent)
        finally:
            for tmp, _ in staged:
                remove(tmp)
        files = self.done.get(name, set()) | {self.relative(p) for p in outputs}
        with open(self.folder / self.journal, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "files": sorted(files)}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[name] = files
        self.changed = True

    def write_data(self, path: Path, data) -> None:
        """A whole-run file (text, bytes or a folder's {name: bytes}): staged, fsync'ed, renamed into place."""
        tmp = self.staging / Path(path).relative_to(self.folder)
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            remove(tmp)
            data_writer(data)(tmp)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if Path(path).is_dir() and not Path(path).is_symlink():
                shutil.rmtree(path)
            os.replace(tmp, path)
            fsync_dir(Path(path).parent)
        finally:
            remove(tmp)

    def _compact(self) -> None:
        """Rewrite the journal with one line per image (reruns with --force append duplicates)."""
        tmp = self.folder / (self.journal + f".{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"name": n, "files": sorted(fs)}) + "\n" for n, fs in sorted(self.done.items()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / self.journal)
        fsync_dir(self.folder)


# ---------------------------------------------------------------------------------------------
# --format lists


class FolderRun:
    """One batch command's run over many images into an `OutputFolder`: counters, skip messages, the summary line,
    and committing one image's files (`samhq everything`, `samhq segment --prompts`; local and Ray alike)."""

    def __init__(self, command: str, out: OutputFolder):
        self.command, self.out = command, out
        self.done = self.skipped = self.failed = self.n_masks = 0
        self.start = time.time()

    def fail(self, path, reason) -> None:
        """Count an image as failed and say why on stderr; the run goes on."""
        self.failed += 1
        print(f"samhq {self.command}: skipped {path}: {reason}", file=sys.stderr)

    def summary(self) -> None:
        print(f"samhq {self.command}: {self.done} images done, {self.skipped} skipped (already done), {self.failed} "
              f"failed, {self.n_masks} masks written to {self.out.folder} in {time.time() - self.start:.1f}s")

    def commit(self, path, name: str, files, n_masks: int) -> None:
        """Write one image's {final path: writer} (or a callable that makes it) all or nothing. A ValueError from a
        writer or from making them (they refused these masks) fails the image; an OSError (disk full, permissions)
        ends the run with a ValueError after the summary."""
        try:
            self.out.write(name, files() if callable(files) else files)
        except OSError as e:
            self.summary()
            raise ValueError(f"cannot write the outputs of {path} to {self.out.folder} ({e.strerror or e}); "
                             "nothing of that image was kept, and a rerun redoes it") from None
        except ValueError as e:
            self.fail(path, e)
            return
        self.done += 1
        self.n_masks += n_masks


def parse_output_formats(text: str) -> tuple[list[str], list[str], list[str]]:
    """A --format list -> (own, annotation, geo) formats, each in the order given, without repeats.

    own: json (NAME.json), png (NAME_masks/ and NAME_overlay.png); `both` = json,png. annotation:
    `samhq.formats.FORMATS` but png (coco, yolo, labelme, labelstudio, geojson). geo: geotiff, gpkg.
    ValueError naming the choices for an unknown name or an empty list.
    """
    from ..formats import FORMATS, split_output_formats

    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    geo = [g for g in GEO_FORMATS if g in items]
    rest = [t for t in items if t not in GEO_FORMATS]
    if not rest and geo:
        return [], [], geo
    try:
        own, extra = split_output_formats(rest)
    except ValueError:
        names = ", ".join(["json", "png", "both", *(f for f in FORMATS if f != "png"), *GEO_FORMATS])
        bad = [t for t in rest if t not in ("json", "png", "both") and t.replace("-", "").replace("_", "") not in FORMATS]
        raise ValueError(f"unknown format {bad[0] if bad else text!r} in --format; choose from {names}") from None
    return own, extra, geo


def category_map(category: str | None, categories: str | None, found: dict | None = None):
    """--category NAME / --categories ID=NAME,...|FILE -> a name or {id: name} for `samhq.formats`; `found`
    (e.g. a COCO file's categories) when neither is given, else "object"."""
    from .export import parse_categories

    result = parse_categories(category, categories, found or {})
    return result if result else "object"


def image_paths(out_dir: Path, name: str, own, formats, geo) -> list[Path]:
    """Every file one image's outputs consist of (what must exist for it to count as done)."""
    from ..formats.writers import format_paths

    paths = []
    if "json" in own:
        paths.append(out_dir / f"{name}.json")
    if "png" in own:
        paths += [out_dir / f"{name}_masks", out_dir / f"{name}_overlay.png"]
    per_image = [f for f in formats if f not in DATASET_FORMATS]
    if per_image:
        whole_run = {out_dir / "yolo" / "data.yaml"}
        paths += [p for group in format_paths([{"file_name": name, "name": name}], out_dir, per_image).values()
                  for p in group if p not in whole_run]
    paths += [out_dir / "geotiff" / f"{name}.tif" for g in geo if g == "geotiff"]
    paths += [out_dir / "gpkg" / f"{name}.gpkg" for g in geo if g == "gpkg"]
    return paths


def format_outputs(out: OutputFolder, image: dict, formats, geo_formats, categories, *, tolerance: float = 0.0,
                   min_area: float = 0.0, raster=None, crops=None) -> dict:
    """One image's files of the annotation formats (`samhq.formats.image_files`) and geo formats, as
    {final path: writer} for `OutputFolder.write`.

    image: a `samhq.formats` image dict. raster: the image's `samhq.geo.RasterSource` when it is a
    georeferenced raster: geojson is then WGS 84 (`to_wgs84_geojson`), and geotiff / gpkg are written
    (ValueError when it has no CRS). crops: the objects as crops (`mask`, `box`, `score`, `category_id`),
    for the geo writers (no full-size mask).
    """
    from ..formats import image_files

    files = {}
    if formats:
        files = {out.folder / rel: data_writer(data) for rel, data in
                 image_files(image, formats, categories, out_dir=out.folder, tolerance=tolerance, min_area=min_area).items()}
    georeferenced = raster is not None and getattr(raster, "crs", None) is not None
    if geo_formats and not georeferenced:
        raise ValueError(f"{' and '.join(geo_formats)} need a georeferenced raster (a GeoTIFF with a CRS, read with "
                         "--tiles); this image has no CRS")
    if not georeferenced:
        return files
    from ..formats import normalize_categories
    from ..geo import to_wgs84_geojson, write_label_geotiff, write_vector

    cats = normalize_categories(categories)
    stem = image.get("name") or Path(str(image["file_name"])).stem
    if "geojson" in formats:
        doc = to_wgs84_geojson(crops, raster, tolerance, min_area, cats)
        files[out.folder / "geojson" / f"{stem}.geojson"] = data_writer(json.dumps(doc))

    def synced(write):
        def run(path: Path) -> None:
            write(path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        return run

    if "geotiff" in geo_formats:
        files[out.folder / "geotiff" / f"{stem}.tif"] = synced(lambda t: write_label_geotiff(t, crops, raster, overwrite=True))
    if "gpkg" in geo_formats:
        files[out.folder / "gpkg" / f"{stem}.gpkg"] = synced(
            lambda t: write_vector(t, crops, raster, tolerance, min_area, cats, overwrite=True))
    return files


def write_dataset(out: OutputFolder, images: list[dict], formats, categories, *, tolerance: float = 0.0,
                  min_area: float = 0.0) -> None:
    """The whole-run files of the annotation formats (`samhq.formats.dataset_files`: coco/instances.json,
    label_studio/, yolo/data.yaml and its image links) for `images`, written through `out`."""
    from ..formats import dataset_files, link_yolo_images

    files = dataset_files(images, formats, categories, out_dir=out.folder, tolerance=tolerance, min_area=min_area)
    for rel, data in files.items():
        out.write_data(out.folder / rel, data)
    if "yolo" in formats:
        link_yolo_images(images, out.folder)


def segmentation_mask(seg: dict):
    """A record's segmentation (uncompressed RLE with list counts, or COCO RLE with str counts) -> (H, W) bool."""
    from ..masks import coco_to_mask, rle_to_mask

    return rle_to_mask(seg) if isinstance(seg.get("counts"), list) else coco_to_mask(seg)


def coco_rle(seg: dict) -> dict:
    """A record's segmentation as COCO compressed RLE (JSON-ready), whichever RLE it is."""
    from ..masks import rle_to_coco

    return rle_to_coco(seg) if isinstance(seg.get("counts"), list) else {"size": list(seg["size"]), "counts": seg["counts"]}


def polygons_on_crops(crops: list[dict], tolerance: float = 0.0, min_area: float = 0.0) -> list:
    """Pixel-edge polygons (`samhq.formats.mask_to_polygons`' layout) of objects given as crops (`mask`, `box`
    (x0, y0, x1, y1)): traced on each crop and shifted into the image, so no full-size mask is made."""
    import numpy as np

    from ..formats import mask_to_polygons

    return [[[ring + np.array(c["box"][:2], dtype=np.float64) for ring in p]
             for p in mask_to_polygons(c["mask"], tolerance, min_area)] for c in crops]
