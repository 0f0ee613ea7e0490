"""`samhq everything INPUT --out DIR`: automatic masks for one image, a folder of images or a list of paths.

Per image NAME (its path relative to the input folder, without the suffix), by --format (default json):
  json      DIR/NAME.json           COCO-style: image info and one annotation per mask (COCO RLE, bbox, area, scores)
  png       DIR/NAME_masks/NNN.png  one 0/255 PNG per mask, and DIR/NAME_overlay.png, the image with every mask
  yolo      DIR/yolo/labels/NAME.txt (+ yolo/data.yaml, yolo/images/ links)
  labelme   DIR/labelme/NAME.json
  geojson   DIR/geojson/NAME.geojson   pixel coordinates; WGS 84 for a georeferenced raster with --tiles
  geotiff   DIR/geotiff/NAME.tif       label raster with the source's georeferencing (--tiles, rasters with a CRS)
  gpkg      DIR/gpkg/NAME.gpkg         polygons in the source's CRS (--tiles, rasters with a CRS)
  coco      DIR/coco/instances.json    every image of DIR (written at the end of each run)
  labelstudio DIR/label_studio/tasks.json, config.xml (every image of DIR, at the end of each run)
`both` is json,png. With any of the annotation formats NAME.json is written too: the whole-run files
are made from it.

The run owns DIR while it works (`samhq.cli._outputs`): a second run on the same DIR stops at once
with "another run is writing to DIR" (a lock on DIR/.samhq.lock, released by the system even when
the run is killed). DIR is checked to be writable before the model is loaded, and it is never read
as input: DIR equal to the input folder is refused, DIR inside it is left out of the search. All of
an image's files (every format) are written under a temporary folder, flushed to disk (fsync),
moved into place, and only then is the image recorded as done in DIR/.samhq-everything.done; a
rerun skips the images recorded there whose outputs all exist and redoes everything else, so a
killed run, a full disk or a read-only folder never leaves an image half done. A failed write
removes its temporary files and stops the run (exit 2). Existing outputs are only replaced with
--force. Unreadable or too-large images are reported ("skipped: reason") and the run goes on; the
exit code is 1 when any failed.

--tiles segments each image in overlapping tiles at its own resolution (`samhq.tiles.TiledMaskGenerator`);
rasters (.tif, .tiff, .vrt, .jp2, .img) are then read window by window (`samhq.geo.RasterSource`). --ray runs
the images on a Ray cluster (`samhq.distributed.run_ray`): the workers return records, this process
alone writes DIR, the same files as a local run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import _outputs as O
from ._common import (
    add_format_args,
    add_image_args,
    add_model_arg,
    add_ray_args,
    add_tile_args,
    new_command,
    open_tiled_source,
    ray_options,
    tile_options,
    whole_image,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
COMMAND = "everything"
JOURNAL = f".samhq-{COMMAND}.done"


def register(sub) -> None:
    p = new_command(
        sub, "everything", "Segment everything: automatic masks for an image, a folder (recursive) or a list of paths.",
        "samhq everything photos/ --out masks/ --format both,coco,yolo --points-per-side 32\n"
        "  samhq everything scene.tif --out scene/ --tiles --format json,geotiff,gpkg,geojson\n"
        "  samhq everything photos/ --out masks/ --ray --num-workers 4",
    )
    p.add_argument("input", help="an image, a folder (searched recursively) or a .txt file with one image path per line")
    p.add_argument("--out", "-o", required=True, help="output folder")
    add_model_arg(p, low_memory=True)
    add_format_args(p, "json", "COCO-style masks per image")
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
    add_tile_args(p)
    add_ray_args(p)
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


def _coco_bbox(segmentation: dict) -> list[int]:
    """COCO's bbox of a COCO RLE, by pycocotools' own `toBbox`: [x, y, w, h] with w = x_max - x_min + 1."""
    from ..masks import _coco_mask_api

    rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return [int(v) for v in _coco_mask_api().toBbox(rle)]


def coco_json(image_path: Path, height: int, width: int, records: list[dict], settings: dict, category: str = "object") -> dict:
    """COCO-style document: one image and its mask annotations (segmentation as COCO RLE, bbox as COCO's).

    records: the generator's, with uncompressed RLE or COCO RLE segmentations (what Ray workers send)."""
    anns = []
    for i, r in enumerate(records):
        segmentation = O.coco_rle(r["segmentation"])
        anns.append({
            "id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
            "segmentation": segmentation, "area": r["area"], "bbox": _coco_bbox(segmentation),
            "predicted_iou": r["predicted_iou"], "stability_score": r["stability_score"],
            "point_coords": r["point_coords"], "crop_box": r["crop_box"],
        })
    return {
        "images": [{"id": 1, "file_name": str(image_path), "height": height, "width": width}],
        "categories": [{"id": 1, "name": category}],
        "annotations": anns,
        "info": {"description": "samhq everything", **settings},
    }


def _progress(items, total=None):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, unit="image", desc="samhq everything", disable=None, total=total)  # no bar unless a terminal


def _model_source(model) -> str:
    """The --model for Ray workers: a local path made absolute (workers run elsewhere), a name or hub id as it is."""
    return str(Path(model).resolve()) if Path(str(model)).exists() else str(model)


def _write_mask_pngs(folder: Path, masks: list[np.ndarray]) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, m in enumerate(masks):
        O.write_file(folder / f"{i:03d}.png", lambda f, m=m: Image.fromarray(m.astype(np.uint8) * 255).save(f, format="PNG"))
    O.fsync_dir(folder)


# ---------------------------------------------------------------------------------------------


def run(args) -> int:
    own, formats, geo = O.parse_output_formats(args.format)
    if args.categories is not None:
        raise ValueError("--categories names prompt files' category ids; automatic masks have none: give --category NAME")
    if args.tolerance < 0 or args.min_area < 0:
        raise ValueError("--tolerance and --min-area must be >= 0")
    if formats and "json" not in own:
        own = ["json", *own]  # NAME.json is the per-image record the whole-run files are made from
    tiles = tile_options(args)
    if geo and tiles is None:
        raise ValueError(f"--format {','.join(geo)} needs --tiles (georeferenced rasters are read in windows in tiled mode)")
    ray = ray_options(args)
    if ray is not None and geo:
        raise ValueError(f"--format {','.join(geo)} is written by local runs only (it reads the raster's georeferencing); "
                         "leave out --ray, or write json with --ray and convert afterwards")
    src, out_dir = Path(args.input), Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a folder")
    if src.is_dir() and out_dir.resolve() == src.resolve():
        raise ValueError(f"--out {out_dir} is the input folder: its outputs would be read as images by the next run; "
                         f"give another folder, e.g. --out {out_dir / 'samhq'} (left out of the input)")
    images = list_images(src, out_dir)
    with O.OutputFolder(out_dir, COMMAND) as out:  # also the check that DIR is writable, before any work
        return _Run(args, out, own, formats, geo, tiles).run(images, ray)


class _Run(O.FolderRun):
    """One run's state: what to write, counters, and the per-image writer shared by the local and the Ray paths."""

    def __init__(self, args, out: O.OutputFolder, own, formats, geo, tiles):
        super().__init__("everything", out)
        self.args, self.own, self.formats, self.geo, self.tiles = args, own, formats, geo, tiles
        self.category = args.category or "object"
        self.settings = {
            "model": str(args.model), "points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
            "stability_score_thresh": args.stability_thresh, "box_nms_thresh": args.box_nms_thresh,
            "crop_n_layers": args.crop_layers, "min_mask_region_area": args.min_region_area,
            "hq_token_only": args.hq_token_only, "use_m2m": args.use_m2m,
        }
        if tiles is not None:
            self.settings["tiles"] = dict(tiles)

    def generator_options(self) -> dict:
        a = self.args
        return dict(points_per_side=a.points_per_side, points_per_batch=a.points_per_batch, pred_iou_thresh=a.pred_iou_thresh,
                    stability_score_thresh=a.stability_thresh, box_nms_thresh=a.box_nms_thresh, crop_n_layers=a.crop_layers,
                    min_mask_region_area=a.min_region_area, use_m2m=a.use_m2m)

    def run(self, images, ray) -> int:
        todo = []
        for path, name in images:
            if _inside(path, self.out.folder):
                self.fail(path, f"it is inside the output folder {self.out.folder}")
            elif not self.args.force and self.out.is_done(name, self.paths(name)):
                self.skipped += 1
            else:
                todo.append((path, name))
        if ray is not None:
            self.run_ray(todo, ray)
        else:
            self.run_local(todo)
        if set(self.formats) & {"coco", "labelstudio", "yolo"}:
            self.write_dataset()
        self.summary()
        return 1 if self.failed else 0

    # ---------------------------------------------------------------- one image's files

    def paths(self, name: str) -> list[Path]:
        return O.image_paths(self.out.folder, name, self.own, self.formats, self.geo)

    def outputs(self, path: Path, name: str, height: int, width: int, records: list[dict], rgb=None, raster=None,
                crops=None) -> dict:
        """{final path: writer} for one image; ValueError when its masks cannot be written (NaN scores, no CRS)."""
        from PIL import Image

        from ..visualize import draw_masks

        files = {}
        folder = self.out.folder
        if "json" in self.own:
            try:
                text = json.dumps(coco_json(path, height, width, records, self.settings, self.category), allow_nan=False)
            except ValueError:
                raise ValueError(O.NAN_MESSAGE) from None
            files[folder / f"{name}.json"] = O.data_writer(text)
        if "png" in self.own:
            masks = [O.segmentation_mask(r["segmentation"]) for r in records]
            files[folder / f"{name}_masks"] = lambda t: _write_mask_pngs(t, masks)
            if rgb is not None:  # larger masks first, so the small ones stay visible on top (rgb: png needs it)
                overlay = draw_masks(rgb, sorted(masks, key=lambda m: -int(m.sum())))
                files[folder / f"{name}_overlay.png"] = lambda t: O.write_file(
                    t, lambda f: Image.fromarray(overlay).save(f, format="PNG"))
        if self.formats or self.geo:
            polygons = None
            if crops is not None and set(self.formats) & {"yolo", "labelme", "geojson"}:
                polygons = O.polygons_on_crops(crops, self.args.tolerance, self.args.min_area)
            objects = [{"segmentation": r["segmentation"], "score": r["predicted_iou"], "category_id": 1,
                        **({"polygons": polygons[i]} if polygons is not None else {})} for i, r in enumerate(records)]
            image = {"file_name": str(path), "name": name, "height": height, "width": width, "objects": objects}
            files.update(O.format_outputs(self.out, image, [f for f in self.formats if f not in O.DATASET_FORMATS],
                                          self.geo, self.category, tolerance=self.args.tolerance,
                                          min_area=self.args.min_area, raster=raster, crops=crops))
        return files

    def write_dataset(self) -> None:
        """coco/instances.json, label_studio/, yolo/data.yaml: from every image of DIR recorded as done."""
        from ..formats import image_from_samhq_doc

        images = []
        for name in sorted(self.out.done):
            try:
                doc = json.loads((self.out.folder / f"{name}.json").read_text(encoding="utf-8"))
                image, _ = image_from_samhq_doc(doc, name)
            except (OSError, ValueError):
                continue  # journaled by a run without json
            if image is not None:
                images.append(image)
        try:
            O.write_dataset(self.out, images, self.formats, self.category, tolerance=self.args.tolerance,
                            min_area=self.args.min_area)
        except OSError as e:
            self.summary()
            raise ValueError(f"cannot write the whole-run files ({', '.join(self.formats)}) to {self.out.folder} "
                             f"({e.strerror or e}); the images are done, a rerun writes them") from None

    # ---------------------------------------------------------------- local

    def run_local(self, todo) -> None:
        from ..image_io import to_rgb_array
        from ..pipelines import load_for_inference

        if not todo:
            return
        a = self.args
        model = load_for_inference(a.model, a.device, a.dtype, low_memory=a.low_memory)
        if self.tiles is not None:
            from ..tiles import TiledMaskGenerator

            generator = TiledMaskGenerator(model, **self.tiles, output_mode="uncompressed_rle", **self.generator_options())
        else:
            from ..automatic import SamHQAutomaticMaskGenerator

            generator = SamHQAutomaticMaskGenerator(model, output_mode="uncompressed_rle", **self.generator_options())
        gen = getattr(generator, "generator", generator)
        self.settings["pred_iou_thresh"] = gen.pred_iou_thresh  # the model family's default when not given
        for path, name in _progress(todo):
            source = None
            try:
                try:
                    crops = None
                    if self.tiles is not None:
                        source = open_tiled_source(path, a.bit_depth)
                        crops = generator.objects(source, hq_token_only=a.hq_token_only)
                        height, width = source.shape
                        records = generator.records(crops, height, width)
                        rgb = whole_image(source) if "png" in self.own else None
                    else:
                        rgb = to_rgb_array(path, bit_depth=a.bit_depth)
                        height, width = rgb.shape[:2]
                        records = generator.generate(rgb, hq_token_only=a.hq_token_only)
                    raster = source if hasattr(source, "crs") else None
                    files = self.outputs(path, name, height, width, records, rgb, raster, crops)
                except (ValueError, TypeError, OSError) as e:
                    self.fail(path, e)
                    continue
                self.commit(path, name, files, len(records))
            finally:
                if hasattr(source, "close"):
                    source.close()

    # ---------------------------------------------------------------- Ray

    def run_ray(self, todo, ray: dict) -> None:
        import torch

        from .. import distributed
        from ..image_io import to_rgb_array
        from ..limits import get_limits

        a = self.args
        paths = {name: path for path, name in todo}
        limits = get_limits()

        def writer(key: str, result: dict) -> None:
            path = paths[key]
            records = result["records"]
            try:
                rgb = None
                if "png" in self.own:  # the overlay: this process reads the image too
                    lim = limits.replace(max_pixels=limits.max_tiled_pixels) if self.tiles is not None else limits
                    rgb = to_rgb_array(path, bit_depth=a.bit_depth, limits=lim)
                files = self.outputs(path, key, result["height"], result["width"], records, rgb)
            except (ValueError, TypeError, OSError) as e:
                self.fail(path, e)
                return
            self.commit(path, key, files, len(records))

        summary = distributed.run_ray(
            [(name, str(Path(path).resolve())) for path, name in todo], writer,
            on_error=lambda key, message: self.fail(paths[key], message), mode="everything", model=_model_source(a.model),
            generator_options=self.generator_options(), tiles=self.tiles, threads=torch.get_num_threads(),
            device=None if ray["gpus_per_worker"] else a.device, dtype=a.dtype, hq_token_only=a.hq_token_only,
            bit_depth=a.bit_depth, limits={"max_pixels": limits.max_pixels, "max_tiled_pixels": limits.max_tiled_pixels},
            predictor_cls=distributed.SamHQBatchPredictor, **ray)
        for key in summary.lost:
            self.fail(paths[key], "it never came back from the Ray workers; a rerun redoes it")
