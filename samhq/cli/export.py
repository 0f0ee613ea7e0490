"""`samhq export onnx SRC OUT_DIR`: the image encoder and the prompt decoder as two ONNX models."""
from __future__ import annotations

from ._common import new_command


def register(sub) -> None:
    p = new_command(
        sub, "export", "Export a model to ONNX: encoder.onnx, decoder.onnx and samhq_onnx.json in OUT_DIR.",
        "samhq export onnx sam_hq_vit_b.pth onnx_vit_b/   # then: OnnxPredictor('onnx_vit_b')",
    )
    p.add_argument("format", choices=["onnx"], help="export format (only onnx)")
    p.add_argument("src", help="official .pth, transformers-layout folder (config.json + model.safetensors), .safetensors file, hub id or bundled name")
    p.add_argument("out_dir", help="directory to write the models into (created if missing)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17, what onnxruntime-web runs)")
    p.add_argument("--decoder-only", action="store_true", help="export only the prompt decoder (for a browser page)")
    p.add_argument("--force", action="store_true", help="overwrite existing files in OUT_DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export.onnx import export_onnx

    written = export_onnx(args.src, args.out_dir, encoder=not args.decoder_only, opset=args.opset, overwrite=args.force)
    for key in ("encoder", "decoder", "meta"):
        if key in written:
            print(f"wrote {written[key]}")
    return 0
