"""`samhq segment`: masks from prompts, for one image or, with --prompts FILE, for a whole set of images.

One image, prompts on the command line (`--point X,Y[,LABEL]`, `--box X0,Y0,X1,Y1`): points and at
most one box make one object; several boxes make one object each (points cannot be added to
several boxes at once). Outputs: the binary mask PNG (0 / 255; with several objects one file per
object, `NAME_0.png`, `NAME_1.png`, ...), an overlay PNG and a JSON with each mask's score,
bounding box (x, y, width, height), area and COCO RLE. With `--format LIST`, `--out` is a folder
holding the formats' files instead (json: NAME.json, png: NAME_masks/ and NAME_overlay.png, coco,
yolo, labelme, labelstudio, geojson, and geotiff / gpkg for georeferenced rasters with --tiles), under
the same lock and journal as `samhq everything` (`samhq.cli._outputs`), so several images segmented
into one folder make one COCO / YOLO / Label Studio dataset. Nothing is written when any input is
bad, and existing files are kept unless --force.

Many images (`INPUT --prompts FILE --out DIR`): INPUT is a folder or a COCO JSON with an "images"
list; the prompts a COCO detection results file, a COCO annotation file, or per-image points and
boxes (`samhq.prompt_files`). Per image DIR/NAME.json (the image's COCO results records under
"masks"), then DIR/results.json, every record in image order: the file `samhq evaluate --coco-ap`
takes. Resumable like `samhq everything`: images already done are skipped, a killed run is finished
by a rerun, and the results file is the same. `--ray` runs it on a Ray cluster (the driver alone writes).

--tiles embeds the image in tiles at its own resolution (`samhq.tiles.TiledPredictor`); rasters are
read in windows (`samhq.geo.RasterSource`), and `--prompts-geojson FILE` takes prompts drawn on a
map (points and boxes in map coordinates) for a georeferenced raster.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

from . import _outputs as O
from ._common import (
    DeprecatedAlias,
    add_format_args,
    add_image_args,
    add_model_arg,
    add_ray_args,
    add_tile_args,
    new_command,
    open_tiled_source,
    ray_options,
    refuse_overwrite,
    tile_options,
    whole_image,
)

COMMAND = "segment"


def register(sub) -> None:
    p = new_command(
        sub, "segment", "Segment objects from points and boxes: one image from the command line, or many from a prompt file.",
        "samhq segment photo.jpg --point 420,310 --point 500,200,0 --box 300,150,640,480 "
        "--out mask.png --overlay overlay.png --json result.json\n"
        "  samhq segment photo.jpg --box 300,150,640,480 --format coco,yolo,labelme --category cat --out labels/\n"
        "  samhq segment val2017/ --prompts detections.json --out masks/   # then: --coco-ap GT.json masks/results.json\n"
        "  samhq segment scene.tif --tiles --prompts-geojson clicks.geojson --format geojson,gpkg,geotiff --out scene/",
    )
    p.add_argument("input", help="an image file; with --prompts a folder of images or a COCO JSON with an \"images\" list")
    p.add_argument("--point", action="append", default=[], metavar="X,Y[,LABEL]",
                   help="a point in pixels; LABEL 1 = object (default), 0 = background. Repeat for more points")
    p.add_argument("--box", action="append", default=[], metavar="X0,Y0,X1,Y1",
                   help="a box in pixels. Repeat for several objects (one mask each)")
    p.add_argument("--prompts", metavar="FILE",
                   help="prompts from a file for every image of INPUT: COCO detection results, a COCO annotation file, or "
                        "{\"FILE\": [{\"box\": [x0, y0, x1, y1]}, {\"points\": [[x, y]], \"labels\": [1]}], ...}; "
                        "--out is a folder")
    p.add_argument("--image-dir", metavar="DIR", help="with --prompts and a COCO image list: the folder its file_names are "
                   "in (default: the list's folder)")
    p.add_argument("--prompts-geojson", metavar="FILE",
                   help="prompts drawn on a map for a georeferenced raster (with --tiles): GeoJSON points (label 1 / 0 in "
                        "properties) and polygons (boxes), WGS 84 unless the file names a crs; one object per feature")
    add_model_arg(p, low_memory=True)
    p.add_argument("--multimask", action="store_true",
                   help="let SAM pick the best of its three candidate masks (good for one ambiguous click)")
    p.add_argument("--hq-token-only", action="store_true", help="return the HQ token's mask alone (else SAM + HQ)")
    p.add_argument("--hq-only", action=DeprecatedAlias, nargs=0, dest="hq_token_only", help=argparse.SUPPRESS)
    p.add_argument("--multiply-iou", action="store_true",
                   help="with --prompts: each result's score is the prompt's score times the predicted IoU")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="with --prompts: boxes decoded at once (default 64)")
    p.add_argument("--out", help="binary mask PNG (default: IMAGE_mask.png in the current folder when no output is given); "
                   "with --format or --prompts the output folder")
    p.add_argument("--overlay", help="overlay PNG: the image with the mask, its outline and the prompts")
    p.add_argument("--json", help="JSON with score, bbox, area and COCO RLE per mask")
    add_format_args(p, None, "score, bbox, area, prompt and COCO RLE per mask")
    p.add_argument("--force", action="store_true", help="overwrite existing output files (with --prompts: redo every image)")
    add_image_args(p, prompts=True)
    add_tile_args(p, store=True, refine=True)
    add_ray_args(p)
    p.set_defaults(func=run)


def _numbers(text: str, counts: tuple[int, ...], what: str, form: str) -> list[float]:
    parts = text.split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = None
    if values is None or len(values) not in counts:
        raise ValueError(f"--{what} expects {form}, got {text!r}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"--{what} {text!r} contains NaN or infinite values")
    return values


def parse_prompts(points: list[str], boxes: list[str]):
    """-> (points (K, 2), labels (K,), boxes (M, 4)) as lists; raises ValueError for malformed text."""
    pts, labels = [], []
    for text in points:
        v = _numbers(text, (2, 3), "point", "X,Y or X,Y,LABEL")
        label = 1 if len(v) == 2 else v[2]
        if label not in (0, 1):
            raise ValueError(f"--point {text!r}: LABEL must be 1 (object) or 0 (background)")
        pts.append(v[:2])
        labels.append(int(label))
    import torch

    from ..modeling.prompt_encoder import check_prompts

    bxs = [_numbers(text, (4,), "box", "X0,Y0,X1,Y1") for text in boxes]
    for b in bxs:
        check_prompts(boxes=torch.tensor([[b]]))
    if not pts and not bxs:
        raise ValueError("give at least one prompt: --point X,Y[,LABEL] or --box X0,Y0,X1,Y1 (or --prompts FILE)")
    if pts and len(bxs) > 1:
        raise ValueError("--point can be combined with one --box only; run once per box to add points to several")
    from ..limits import check_prompt_count

    check_prompt_count(len(pts), len(bxs))
    return pts, labels, bxs


def output_paths(args, n: int) -> dict[str, list[Path]]:
    out = args.out
    if out is None and args.overlay is None and args.json is None:
        out = f"{Path(args.input).stem}_mask.png"
    paths = {"mask": [], "overlay": [], "json": []}
    if out is not None:
        out = Path(out)
        paths["mask"] = [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(n)]
    if args.overlay:
        paths["overlay"] = [Path(args.overlay)]
    if args.json:
        paths["json"] = [Path(args.json)]
    return paths


def run(args) -> int:
    if args.tolerance < 0 or args.min_area < 0:
        raise ValueError("--tolerance and --min-area must be >= 0")
    if args.prompts is not None:
        return run_prompt_file(args)
    if args.ray is not None:
        raise ValueError("--ray runs many images: give them with --prompts FILE")
    if args.image_dir is not None:
        raise ValueError("--image-dir goes with --prompts and a COCO image list")
    return run_image(args)


# ---------------------------------------------------------------------------------------------
# Objects: what both modes hand to the writers


class _Object:
    """One object's mask as a crop (mask (h, w) bool at box (x0, y0, x1, y1) of an (H, W) image), its score,
    category_id and the prompt that made it (as the JSON shows it)."""

    def __init__(self, mask, box, height, width, score, prompt, category_id=1):
        self.mask, self.box, self.height, self.width = mask, tuple(int(v) for v in box), height, width
        self.score, self.prompt, self.category_id = float(score), prompt, int(category_id)

    def full(self) -> np.ndarray:
        if self.mask.shape == (self.height, self.width):
            return self.mask
        out = np.zeros((self.height, self.width), bool)
        x0, y0, x1, y1 = self.box
        out[y0:y1, x0:x1] = self.mask
        return out

    def coco(self) -> dict:
        from ..masks import crop_to_rle, mask_to_coco, rle_to_coco

        if self.mask.shape == (self.height, self.width):
            return mask_to_coco(self.mask)
        return rle_to_coco(crop_to_rle(self.mask, self.box[0], self.box[1], self.height, self.width))

    def bbox(self) -> list[int]:
        from ..masks import mask_bbox

        b = mask_bbox(self.mask)
        return [b[0] + self.box[0], b[1] + self.box[1], b[2], b[3]] if b[2] else b

    def crop(self) -> dict:
        return {"mask": self.mask, "box": self.box, "score": self.score, "category_id": self.category_id}


def _categories(args, ids, found: dict | None = None):
    """The categories for samhq.formats: --category NAME (every mask's class, whatever its category_id),
    --categories ID=NAME,..., a COCO file's own names (`found`), else a name per category_id in `ids`."""
    if args.category is not None and args.categories is not None:
        raise ValueError("give --category NAME or --categories ID=NAME,..., not both")
    if args.category is not None:
        return args.category
    cats = O.category_map(None, args.categories, found)
    if cats == "object" or not cats:
        cats = {cid: "object" if cid == 1 else f"category {cid}" for cid in sorted(set(ids) | {1})}
    return cats


# ---------------------------------------------------------------------------------------------
# One image, prompts on the command line or drawn on a map


def run_image(args) -> int:
    from ..checkpoints import require_finite
    from ..image_io import check_image_size, to_rgb_array
    from ..masks import mask_to_coco
    from ..pipelines import load_for_inference

    tiles = tile_options(args)
    formats = None
    if args.format is not None:
        if args.overlay or args.json:
            raise ValueError("with --format, --out is a folder and the formats name its files (json,png for the JSON, "
                             "masks and overlay): leave out --overlay and --json")
        if args.out is None:
            raise ValueError("--format writes into a folder: give it with --out DIR")
        formats = O.parse_output_formats(args.format)
        if formats[2] and tiles is None:
            raise ValueError(f"--format {','.join(formats[2])} needs --tiles (georeferenced rasters are read in windows)")
    pts = labels = boxes = None
    if args.prompts_geojson is not None:
        if args.point or args.box:
            raise ValueError("give the prompts with --prompts-geojson or with --point / --box, not both")
        if tiles is None:
            raise ValueError("--prompts-geojson needs --tiles (the georeferenced raster is read in windows)")
        if formats is None:
            raise ValueError("--prompts-geojson gives one object per feature: write them with --format LIST --out DIR")
    else:
        pts, labels, boxes = parse_prompts(args.point, args.box)
    if formats is None:
        paths = output_paths(args, max(1, len(boxes)))
        every = [p for group in paths.values() for p in group]
        seen = {}
        for option, group in (("--out", paths["mask"]), ("--overlay", paths["overlay"]), ("--json", paths["json"])):
            for p in group:
                key = p.resolve()
                if key in seen:
                    raise ValueError(f"{seen[key]} and {option} both name {p}; give each output its own file")
                seen[key] = option
        refuse_overwrite(every, args.force)
        for p in every:
            if not p.parent.is_dir():
                raise ValueError(f"output folder {p.parent} does not exist")
        if args.json:
            mask_to_coco(np.zeros((1, 1), bool))  # fail now, before any work, when pycocotools is missing
    else:
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out {out_dir} is a file; with --format it is a folder")

    # the image
    source = rgb = None
    if tiles is not None:
        source = open_tiled_source(args.input, args.bit_depth)
        height, width = source.shape
        rgb = getattr(source, "rgb", None)
    else:
        rgb = to_rgb_array(args.input, bit_depth=args.bit_depth)
        height, width = rgb.shape[:2]
        check_image_size(height, width)
    raster = source if hasattr(source, "crs") else None
    try:
        if args.prompts_geojson is not None:
            if raster is None:
                raise ValueError(f"--prompts-geojson needs a georeferenced raster read with samhq.geo (the geo extra); "
                                 f"{args.input} is not one")
            from ..geo import prompts_from_geojson

            prompts = prompts_from_geojson(args.prompts_geojson, raster)
            if not prompts:
                raise ValueError(f"{args.prompts_geojson} has no features to prompt with")
        else:
            prompts = _command_line_prompts(pts, labels, boxes)

        model = load_for_inference(args.model, args.device, args.dtype, low_memory=args.low_memory)
        flags = dict(multimask_output=args.multimask, hq_token_only=args.hq_token_only)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if tiles is not None:
                objects = _segment_tiled(args, model, tiles, source, prompts, flags)
            else:
                objects = _segment_whole(model, rgb, prompts, flags)
        for w in caught:
            print(f"samhq segment: warning: {w.message}", file=sys.stderr)
        require_finite(np.array([o.score for o in objects]), "scores")
        if formats is None:
            return _write_files(args, paths, every, objects, rgb, source, pts, labels, boxes, height, width)
        return _write_folder(args, formats, objects, rgb, source, raster, height, width)
    finally:
        if hasattr(source, "close"):
            source.close()


def _command_line_prompts(pts, labels, boxes):
    """--point / --box as FilePrompts: points with at most one box = one object, or one object per box."""
    from ..prompt_files import FilePrompt

    p = np.array(pts, dtype=np.float64) if pts else None
    lab = np.array(labels, dtype=np.float64) if pts else None
    if len(boxes) <= 1:
        return [FilePrompt(np.array(boxes[0], dtype=np.float64) if boxes else None, p, lab, 1.0, 1, None, "command line")]
    return [FilePrompt(np.array(b, dtype=np.float64), None, None, 1.0, 1, None, f"--box {i}") for i, b in enumerate(boxes)]


def _prompt_json(p) -> dict:
    out = {}
    if p.points is not None:
        out["points"], out["labels"] = p.points.tolist(), [int(v) for v in p.labels]
    if p.box is not None:
        out["box"] = [float(v) for v in p.box]
    return out


def _segment_whole(model, rgb, prompts, flags) -> list[_Object]:
    import torch

    from ..masks import best_mask
    from ..predictor import SamHQPredictor

    predictor = SamHQPredictor(model)
    predictor.set_image(rgb)
    h, w = rgb.shape[:2]
    if len(prompts) == 1:
        p = prompts[0]
        m, s, _ = predictor.predict(point_coords=p.points, point_labels=p.labels, box=p.box, return_low_res=False,
                                    **flags)
        m, s = m[None], s[None]
    else:  # several boxes: one batch
        tb = predictor.transform.apply_boxes_torch(torch.tensor(np.stack([p.box for p in prompts]), dtype=torch.float),
                                                   predictor.original_size)
        m, s, _ = predictor.predict_torch(None, None, tb.to(predictor.device), return_low_res=False, **flags)
        m, s = m.cpu().numpy(), s.cpu().numpy()
    masks, scores = best_mask(m, s)
    return [_Object(masks[i], (0, 0, w, h), h, w, scores[i], _prompt_json(p), p.category_id) for i, p in enumerate(prompts)]


def _store(args, name: str):
    return None if getattr(args, "tile_store", None) is None else Path(args.tile_store) / f"{name}.zarr"


def _tiled_predictor(args, model, tiles):
    from ..tiles import TiledPredictor

    return TiledPredictor(model, **tiles, refine=None if args.refine == "none" else args.refine)


def _segment_tiled(args, model, tiles, source, prompts, flags) -> list[_Object]:
    tp = _tiled_predictor(args, model, tiles)
    tp.set_image(source, store=_store(args, Path(args.input).stem))
    h, w = source.shape
    out = []
    for p in prompts:
        (r,) = tp.predict_regions(None if p.points is None else p.points[None], None if p.labels is None else p.labels[None],
                                  None if p.box is None else p.box[None], None, **flags)
        out.append(_Object(r.mask, r.box, h, w, r.score, _prompt_json(p), p.category_id))
    return out


def _full_rgb(rgb, source):
    return rgb if rgb is not None else whole_image(source)


def _write_files(args, paths, every, objects, rgb, source, pts, labels, boxes, height, width) -> int:
    """The classic outputs: mask PNG(s), overlay, JSON (nothing is written when the JSON cannot be made)."""
    from PIL import Image

    from ..visualize import draw_masks

    results = []
    for o in objects:
        entry = {"score": o.score, "bbox": o.bbox(), "area": int(o.mask.sum()), "prompt": o.prompt}
        if args.json:
            entry["segmentation"] = o.coco()
        results.append(entry)
    text = None
    if paths["json"]:  # made before any file is written: nothing is written when it cannot be
        doc = {"image": str(args.input), "height": int(height), "width": int(width), "model": str(args.model),
               "multimask": args.multimask, "hq_token_only": args.hq_token_only, "masks": results}
        text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    for path, o in zip(paths["mask"], objects):
        Image.fromarray(o.full().astype(np.uint8) * 255).save(path)
    if paths["overlay"]:
        overlay = draw_masks(_full_rgb(rgb, source), [o.full() for o in objects], points=pts or None, labels=labels or None,
                             boxes=boxes or None)
        Image.fromarray(overlay).save(paths["overlay"][0])
    if text is not None:
        paths["json"][0].write_text(text)
    for p in every:
        print(f"wrote {p}")
    for i, r in enumerate(results):
        print(f"mask {i}: score {r['score']:.3f}, area {r['area']} px, bbox {r['bbox']}")
    return 0


def _write_folder(args, formats, objects, rgb, source, raster, height, width) -> int:
    """--format LIST: the image's files under --out (locked and journaled), then the whole-run files."""
    own, fmts, geo = formats
    if fmts and "json" not in own:
        own = ["json", *own]
    name = Path(args.input).stem
    cats = _categories(args, [o.category_id for o in objects])
    masks = [{"score": o.score, "bbox": o.bbox(), "area": int(o.mask.sum()), "prompt": o.prompt,
              "category_id": o.category_id, "segmentation": o.coco()} for o in objects]
    doc = {"image": str(args.input), "height": int(height), "width": int(width), "model": str(args.model),
           "multimask": args.multimask, "hq_token_only": args.hq_token_only, "masks": masks}
    with O.OutputFolder(args.out, COMMAND) as out:
        writer = _ImageWriter(args, out, own, fmts, geo, cats)
        refuse_overwrite(writer.paths(name), args.force)
        writer.write(name, doc, [o.crop() for o in objects] if source is not None else None,
                     _full_rgb(rgb, source) if "png" in own else None, raster)
        writer.write_dataset()
        for p in sorted(out.done[name]):
            print(f"wrote {out.folder / p}")
    for i, m in enumerate(masks):
        print(f"mask {i}: score {m['score']:.3f}, area {m['area']} px, bbox {m['bbox']}")
    return 0


# ---------------------------------------------------------------------------------------------
# Writing an image's files (both modes)


class _ImageWriter:
    """One image's files in a `samhq segment` output folder: NAME.json (the document), png, the annotation and geo formats."""

    def __init__(self, args, out: O.OutputFolder, own, formats, geo, categories):
        self.args, self.out, self.own, self.formats, self.geo, self.categories = args, out, own, formats, geo, categories

    def category(self, category_id: int) -> int:
        """The id a mask's category_id has in the formats (with --category NAME every mask is that one class)."""
        return 1 if isinstance(self.categories, str) else int(category_id)

    def paths(self, name: str) -> list[Path]:
        return O.image_paths(self.out.folder, name, self.own, self.formats, self.geo)

    def outputs(self, name: str, doc: dict, crops=None, rgb=None, raster=None) -> dict:
        """{final path: writer}; ValueError when the document cannot be written (NaN) or a format needs a CRS."""
        from PIL import Image

        from ..visualize import draw_masks

        folder, files = self.out.folder, {}
        try:
            text = json.dumps(doc, allow_nan=False)
        except ValueError:
            raise ValueError(O.NAN_MESSAGE) from None
        files[folder / f"{name}.json"] = O.data_writer(text)
        if "png" in self.own:
            masks = [O.segmentation_mask(m["segmentation"]) for m in doc["masks"]]
            files[folder / f"{name}_masks"] = O.data_writer({f"{i:03d}.png": _png(m) for i, m in enumerate(masks)})
            if rgb is not None:
                overlay = draw_masks(rgb, sorted(masks, key=lambda m: -int(m.sum())))
                files[folder / f"{name}_overlay.png"] = lambda t: O.write_file(
                    t, lambda f: Image.fromarray(overlay).save(f, format="PNG"))
        if self.formats or self.geo:
            polygons = None
            if crops is not None and set(self.formats) & {"yolo", "labelme", "geojson"}:
                polygons = O.polygons_on_crops(crops, self.args.tolerance, self.args.min_area)
            objects = [{"segmentation": m["segmentation"], "score": m["score"], "category_id": self.category(m["category_id"]),
                        **({"polygons": polygons[i]} if polygons is not None else {})} for i, m in enumerate(doc["masks"])]
            if crops is not None:
                crops = [dict(c, category_id=self.category(c["category_id"])) for c in crops]
            image = {"file_name": doc["image"], "name": name, "height": doc["height"], "width": doc["width"], "objects": objects}
            files.update(O.format_outputs(self.out, image, [f for f in self.formats if f not in O.DATASET_FORMATS],
                                          self.geo, self.categories, tolerance=self.args.tolerance,
                                          min_area=self.args.min_area, raster=raster, crops=crops))
        return files

    def write(self, name: str, doc: dict, crops=None, rgb=None, raster=None) -> None:
        files = self.outputs(name, doc, crops, rgb, raster)
        try:
            self.out.write(name, files)
        except OSError as e:
            raise ValueError(f"cannot write the outputs of {doc['image']} to {self.out.folder} ({e.strerror or e}); "
                             "nothing of that image was kept, and a rerun redoes it") from None

    def write_dataset(self) -> None:
        """The whole-run files (coco, labelstudio, yolo's data.yaml) of every image journaled in the folder."""
        if not set(self.formats) & {"coco", "labelstudio", "yolo"}:
            return
        from ..formats import image_from_samhq_doc

        images = []
        for name in sorted(self.out.done):
            try:
                image, _ = image_from_samhq_doc(json.loads((self.out.folder / f"{name}.json").read_text(encoding="utf-8")), name)
            except (OSError, ValueError):
                continue
            if image is not None:
                for o in image["objects"]:
                    o["category_id"] = self.category(o.get("category_id", 1))
                images.append(image)
        try:
            O.write_dataset(self.out, images, self.formats, self.categories, tolerance=self.args.tolerance,
                            min_area=self.args.min_area)
        except OSError as e:
            raise ValueError(f"cannot write the whole-run files ({', '.join(self.formats)}) to {self.out.folder} "
                             f"({e.strerror or e}); the images are done, a rerun writes them") from None


def _png(mask: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Many images from a prompt file


def _found_categories(*paths) -> dict:
    """A COCO file's categories {id: name} (the prompt file or the image list), else {}."""
    for path in paths:
        if path is None or Path(path).is_dir() or not Path(path).is_file():
            continue
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("categories"), list):
            cats = {c.get("id"): c.get("name") for c in doc["categories"] if isinstance(c, dict)}
            if cats and all(isinstance(k, int) and isinstance(v, str) and v for k, v in cats.items()):
                return cats
    return {}


def run_prompt_file(args) -> int:
    from ..prompt_files import read_prompts

    if args.point or args.box or args.prompts_geojson:
        raise ValueError("give the prompts with --prompts FILE or on the command line (--point / --box), not both")
    if args.overlay or args.json:
        raise ValueError("with --prompts, --out is a folder and --format names its files: leave out --overlay and --json")
    if args.out is None:
        raise ValueError("--prompts writes a folder: give it with --out DIR")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    own, formats, geo = O.parse_output_formats(args.format or "json")
    if "json" not in own:
        own = ["json", *own]  # NAME.json is the per-image record results.json is made from
    tiles = tile_options(args)
    if geo and tiles is None:
        raise ValueError(f"--format {','.join(geo)} needs --tiles (georeferenced rasters are read in windows)")
    ray = ray_options(args)
    if ray is not None and (geo or args.tile_store):
        raise ValueError("--format geotiff,gpkg and --tile-store are for local runs; leave out --ray")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; with --prompts it is a folder")
    src = Path(args.input)
    if src.is_dir() and out_dir.resolve() == src.resolve():
        raise ValueError(f"--out {out_dir} is the image folder; give another folder")
    entries = read_prompts(args.prompts, src, args.image_dir)
    if not entries:
        raise ValueError(f"{args.prompts} has no prompts for the images of {src}")
    names, seen = [], {}
    for e in entries:
        name = Path(e.name).with_suffix("").as_posix()
        if name in seen:
            raise ValueError(f"{seen[name]} and {e.path} would write the same outputs ({name}.*); rename one")
        seen[name] = e.path
        names.append(name)
    ids = {p.category_id for e in entries for p in e.prompts}
    cats = _categories(args, ids, _found_categories(args.prompts, src))
    with O.OutputFolder(out_dir, COMMAND) as out:
        return _PromptRun(args, out, _ImageWriter(args, out, own, formats, geo, cats), tiles).run(entries, names, ray)


class _PromptRun(O.FolderRun):
    def __init__(self, args, out, writer: _ImageWriter, tiles):
        super().__init__(COMMAND, out)
        self.args, self.writer, self.tiles = args, writer, tiles

    def options(self) -> dict:
        a = self.args
        return dict(multiply_iou=a.multiply_iou, multimask_output=True if a.multimask else None,
                    hq_token_only=a.hq_token_only, batch_size=a.batch_size)

    def doc(self, entry, height: int, width: int, records: list[dict]) -> dict:
        return {"image": str(entry.path), "image_id": entry.image_id, "height": int(height), "width": int(width),
                "model": str(self.args.model), "prompts": str(self.args.prompts), "multiply_iou": self.args.multiply_iou,
                "hq_token_only": self.args.hq_token_only, "masks": records}

    def write(self, entry, name, height, width, records, crops=None, rgb=None, raster=None) -> None:
        self.commit(entry.path, name, lambda: self.writer.outputs(name, self.doc(entry, height, width, records), crops,
                                                                  rgb, raster), len(records))

    def run(self, entries, names, ray) -> int:
        todo = []
        for entry, name in zip(entries, names):
            if not self.args.force and self.out.is_done(name, self.writer.paths(name)):
                self.skipped += 1
            else:
                todo.append((entry, name))
        if ray is not None:
            self._ray(todo, ray)
        else:
            self._local(todo)
        self.write_results(names)
        self.writer.write_dataset()
        self.summary()
        return 1 if self.failed else 0

    def write_results(self, names) -> None:
        """DIR/results.json: the records of every done image of this prompt file, in image order (COCO results)."""
        results = []
        for name in names:
            if name not in self.out.done:
                continue
            try:
                results += json.loads((self.out.folder / f"{name}.json").read_text(encoding="utf-8"))["masks"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
        try:
            self.out.write_data(self.out.folder / "results.json", json.dumps(results))
        except OSError as e:
            self.summary()
            raise ValueError(f"cannot write {self.out.folder / 'results.json'} ({e.strerror or e}); "
                             "the images are done, a rerun writes it") from None

    def _local(self, todo) -> None:
        from ..pipelines import load_for_inference
        from ..predictor import SamHQPredictor
        from ..prompt_files import check_entry_size, read_entry_image, segment_prompts

        if not todo:
            return
        a = self.args
        model = load_for_inference(a.model, a.device, a.dtype, low_memory=a.low_memory)
        predictor = _tiled_predictor(a, model, self.tiles) if self.tiles is not None else SamHQPredictor(model)
        for entry, name in _progress(todo):
            source = None
            try:
                image_id = entry.image_id if entry.image_id is not None else entry.name
                crops = rgb = raster = None
                try:
                    if self.tiles is not None:
                        source = open_tiled_source(entry.path, a.bit_depth)
                        check_entry_size(entry, *source.shape)
                        records = segment_prompts(predictor, source, entry.prompts, image_id, **self.options(),
                                                  set_image_options={"store": _store(a, name)})
                        rgb = whole_image(source) if "png" in self.writer.own else None
                        raster = source if hasattr(source, "crs") else None
                        if raster is not None and self.writer.geo:
                            crops = _record_crops(records)
                        height, width = source.shape
                    else:
                        rgb = read_entry_image(entry, a.bit_depth)
                        height, width = rgb.shape[:2]
                        records = segment_prompts(predictor, rgb, entry.prompts, image_id, **self.options())
                except (ValueError, TypeError, OSError) as e:
                    self.fail(entry.path, e)
                    continue
                self.write(entry, name, height, width, records, crops, rgb if "png" in self.writer.own else None, raster)
            finally:
                if hasattr(source, "close"):
                    source.close()

    def _ray(self, todo, ray: dict) -> None:
        import torch

        from .. import distributed
        from ..limits import get_limits
        from ..prompt_files import check_entry_size, prompt_dict, read_entry_image
        from .everything import _model_source

        a = self.args
        by_name = {name: entry for entry, name in todo}
        limits = get_limits()

        def writer(key: str, result: dict) -> None:
            entry = by_name[key]
            try:
                check_entry_size(entry, result["height"], result["width"])
                rgb = read_entry_image(entry, a.bit_depth) if "png" in self.writer.own else None
            except (ValueError, TypeError, OSError) as e:
                self.fail(entry.path, e)
                return
            self.write(entry, key, result["height"], result["width"], result["records"], None, rgb)

        prompts = {name: (entry.image_id if entry.image_id is not None else entry.name, [prompt_dict(p) for p in entry.prompts])
                   for entry, name in todo}
        tiles = None if self.tiles is None else dict(self.tiles, refine=None if a.refine == "none" else a.refine)
        summary = distributed.run_ray(
            [(name, str(Path(entry.path).resolve())) for entry, name in todo], writer,
            on_error=lambda key, message: self.fail(by_name[key].path, message), mode="prompts", model=_model_source(a.model),
            prompts=prompts, prompt_options=self.options(), tiles=tiles, threads=torch.get_num_threads(),
            device=None if ray["gpus_per_worker"] else a.device, dtype=a.dtype, bit_depth=a.bit_depth,
            limits={"max_pixels": limits.max_pixels, "max_tiled_pixels": limits.max_tiled_pixels,
                    "max_prompts": limits.max_prompts},
            predictor_cls=distributed.SamHQBatchPredictor, **ray)
        for key in summary.lost:
            self.fail(by_name[key].path, "it never came back from the Ray workers; a rerun redoes it")


def _record_crops(records: list[dict]) -> list[dict]:
    """COCO results records as crops (mask, box) for the geo writers (each record's mask decoded, cut to its bbox)."""
    out = []
    for r in records:
        m = O.segmentation_mask(r["segmentation"])
        x, y, w, h = r["bbox"]
        if not w:
            x, y, w, h = 0, 0, 1, 1
        out.append({"mask": m[y:y + h, x:x + w].copy(), "box": (x, y, x + w, y + h), "score": r["score"],
                    "category_id": r["category_id"]})
    return out


def _progress(items):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, unit="image", desc="samhq segment", disable=None)
