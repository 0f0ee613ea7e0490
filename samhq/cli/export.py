"""`samhq export onnx SRC OUT_DIR` (the model as two ONNX files) and `samhq export masks SRC_DIR
--format coco,yolo,... --out DIR` (an existing samhq output folder in labelling and training formats)."""
from __future__ import annotations

import json
from pathlib import Path

from ._common import new_command


def register(sub) -> None:
    p = new_command(
        sub, "export", "Export a model to ONNX, or convert samhq's masks to COCO, YOLO, LabelMe, Label Studio, GeoJSON.",
        "samhq export onnx sam_hq_vit_b.pth onnx_vit_b/\n"
        "  samhq export masks masks/ --format coco,yolo,labelme --out dataset/",
    )
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)

    o = new_command(
        kinds, "onnx", "The image encoder and the prompt decoder as encoder.onnx, decoder.onnx and samhq_onnx.json in OUT_DIR.",
        "samhq export onnx sam_hq_vit_b.pth onnx_vit_b/   # then: OnnxPredictor('onnx_vit_b')",
    )
    o.add_argument("src", help="official .pth, transformers-layout folder, .safetensors file, hub id or bundled name")
    o.add_argument("out_dir", help="directory to write the models into (created if missing)")
    o.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17, what onnxruntime-web runs)")
    o.add_argument("--decoder-only", action="store_true", help="export only the prompt decoder (for a browser page)")
    o.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="the image encoder's precision in encoder.onnx (default float32, exact; float16: half the file, "
                   "for GPU providers); the decoder is always float32")
    o.add_argument("--force", action="store_true", help="overwrite existing files in OUT_DIR")
    o.set_defaults(func=run_onnx)

    m = new_command(
        kinds, "masks",
        "Convert a samhq output folder (NAME.json from `samhq everything` or `samhq segment --json`, NAME_masks/ "
        "PNG folders) into annotation formats: coco/instances.json, yolo/ (labels + data.yaml), labelme/NAME.json, "
        "label_studio/tasks.json + config.xml, geojson/NAME.geojson, NAME_masks/NNN.png.",
        "samhq export masks masks/ --format coco,yolo,labelme,labelstudio,geojson --out dataset/ --category cell",
    )
    m.add_argument("src_dir", help="a folder samhq everything / segment --json wrote")
    m.add_argument("--format", "-f", required=True, metavar="LIST",
                   help="comma-separated: coco, yolo, labelme, labelstudio, geojson, png")
    m.add_argument("--out", "-o", required=True, help="output folder (may be SRC_DIR itself)")
    m.add_argument("--category", metavar="NAME",
                   help='the class name of every mask (default: the files\' categories, else "object")')
    m.add_argument("--categories", metavar="ID=NAME,...|FILE",
                   help="class names by category_id: '1=cat,2=dog', or a JSON file mapping ids to names "
                        "or holding COCO categories")
    m.add_argument("--tolerance", type=float, default=0.0, metavar="PX",
                   help="polygon simplification in pixels (default 0: exact, every pixel corner)")
    m.add_argument("--min-area", type=float, default=0.0, metavar="PX2",
                   help="drop polygon parts and holes smaller than this many square pixels (default 0)")
    m.add_argument("--coco-segmentation", choices=["rle", "polygons"], default="rle",
                   help="COCO masks as RLE (exact, default) or polygons")
    m.add_argument("--label-studio", choices=["brush", "polygon"], default="brush", dest="label_studio_kind",
                   help="Label Studio regions: BrushLabels masks (default) or PolygonLabels")
    m.add_argument("--image-url-prefix", metavar="URL",
                   help="Label Studio image URLs: URL + the image path, e.g. '/data/local-files/?d=' (default: the path)")
    m.add_argument("--images", metavar="DIR",
                   help="folder the images are in, for relative paths and NAME_masks/ folders without a NAME.json")
    m.add_argument("--embed-images", action="store_true", help="put each image into its LabelMe JSON (imageData)")
    m.add_argument("--force", action="store_true", help="overwrite existing output files")
    m.set_defaults(func=run_masks)


def run_onnx(args) -> int:
    from ..export.onnx import export_onnx

    written = export_onnx(args.src, args.out_dir, encoder=not args.decoder_only, opset=args.opset, overwrite=args.force,
                          dtype=args.dtype)
    for key in ("encoder", "decoder", "meta"):
        if key in written:
            print(f"wrote {written[key]}")
    return 0


def parse_categories(category: str | None, categories: str | None, found: dict[int, str]):
    """--category / --categories -> a name or {id: name}; the files' own categories otherwise."""
    if category is not None and categories is not None:
        raise ValueError("give --category NAME or --categories ID=NAME,..., not both")
    if category is not None:
        return category
    if categories is None:
        return found
    path = Path(categories)
    if path.suffix.lower() == ".json" or path.is_file():
        if not path.is_file():
            raise ValueError(f"--categories file not found: {path}")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"--categories {path}: not a JSON file ({e})") from None
        if isinstance(doc, dict) and isinstance(doc.get("categories"), list):
            doc = {c.get("id"): c.get("name") for c in doc["categories"] if isinstance(c, dict)}
        if not isinstance(doc, dict):
            raise ValueError(f"--categories {path}: expected {{\"1\": \"cat\", ...}} or a COCO file's categories")
        return doc
    out = {}
    for item in categories.split(","):
        cid, sep, name = item.partition("=")
        if not sep or not cid.strip().lstrip("-").isdigit() or not name.strip():
            raise ValueError(f"--categories expects ID=NAME pairs separated by commas, got {item!r}")
        out[int(cid)] = name.strip()
    return out


def run_masks(args) -> int:
    from ..formats import parse_formats, read_samhq_outputs, write_formats

    formats = parse_formats(args.format)
    if args.tolerance < 0 or args.min_area < 0:
        raise ValueError("--tolerance and --min-area must be >= 0")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if args.images is not None and not Path(args.images).is_dir():
        raise ValueError(f"--images {args.images} is not a folder")
    images, found = read_samhq_outputs(args.src_dir, images_dir=args.images)
    categories = parse_categories(args.category, args.categories, found)
    written = write_formats(
        images, out, formats, categories, tolerance=args.tolerance, min_area=args.min_area,
        coco_segmentation=args.coco_segmentation, label_studio_kind=args.label_studio_kind,
        image_url_prefix=args.image_url_prefix, image_root=args.images, embed_images=args.embed_images,
        overwrite=args.force,
    )
    n = sum(len(im["objects"]) for im in images)
    print(f"samhq export: {len(images)} images, {n} masks -> {', '.join(formats)} ({len(written)} files) in {out}")
    return 0
