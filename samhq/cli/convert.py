"""`samhq convert SRC DST`: official .pth <-> transformers layout (config.json + model.safetensors)."""
from __future__ import annotations

from ._common import new_command


def register(sub) -> None:
    p = new_command(
        sub, "convert", "Convert a checkpoint (SAM-HQ or HQ-SAM 2 / SAM 2) between the official .pth / .pt and the "
        "transformers layout (config.json + model.safetensors).",
        "samhq convert sam_hq_vit_b.pth sam_hq_vit_b/   # and back: samhq convert sam_hq_vit_b/ b.pth\n"
        "  samhq convert sam2.1_hq_hiera_large.pt hq_sam2/   # and back: samhq convert hq_sam2/ hq.pt",
    )
    p.add_argument("src", help="official .pth / .pt, transformers-layout folder (config.json + model.safetensors), "
                   ".safetensors file, hub id or bundled name")
    p.add_argument("dst", help="a path ending in .pth or .pt writes the official format; anything else a "
                   "transformers-layout folder")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..modeling.auto import convert

    out = convert(args.src, args.dst, overwrite=args.force)
    print(f"wrote {out}")
    return 0
