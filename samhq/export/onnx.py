"""ONNX export: the image encoder and the prompt decoder as two separate models.

encoder.onnx
    pixel_values (1, 3, S, S) float32, resized (longest side S), normalised and zero-padded
    -> image_embeddings (1, 256, S/16, S/16), hq_features (1, 32, S/4, S/4)
    (the image-only half of the HQ branch, so the decoder does no per-image work).

decoder.onnx, for B prompts of N points each (B and N dynamic):
    image_embeddings, hq_features   from the encoder
    point_coords (B, N, 2) float32  in the resized input frame (as `SamPredictor.predict_torch`)
    point_labels (B, N) float32     1 foreground, 0 background, 2 / 3 box top-left / bottom-right,
                                    -1 padding (add one (0, 0) padding point when there is no box)
    mask_input (1 or B, 1, S/4, S/4) low-res logits, used when has_mask_input (1,) is 1
    orig_im_size (2,) float32       (height, width) of the original image
    multimask_output (1,), hq_token_only (1,) float32 switches (0 or 1)
    -> masks (B, 1, H, W) logits at the original size, iou_predictions (B, 1),
       low_res_masks (B, 1, S/4, S/4)
    Output selection is the official predictor's: with multimask_output the best of the three SAM
    masks by predicted IoU, plus the HQ mask (or the HQ mask alone with hq_token_only).

Both models use opset 17 standard operators only (no custom domains), so the decoder also runs in
onnxruntime-web's wasm backend.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..modeling.mask_selection import select_masks
from ..modeling.model import SamHQModel, model_fingerprint

OPSET = 17
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
META_FILE = "samhq_onnx.json"
FORMAT_VERSION = 1

ENCODER_INPUTS = ["pixel_values"]
ENCODER_OUTPUTS = ["image_embeddings", "hq_features"]
DECODER_INPUTS = [
    "image_embeddings", "hq_features", "point_coords", "point_labels", "mask_input", "has_mask_input",
    "orig_im_size", "multimask_output", "hq_token_only",
]
DECODER_OUTPUTS = ["masks", "iou_predictions", "low_res_masks"]


class EncoderForOnnx(nn.Module):
    """pixel_values (1, 3, S, S) -> image_embeddings (1, 256, h, w), hq_features (1, 32, 4h, 4w)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        emb, inter = self.model.vision_encoder(pixel_values)
        return emb, self.model.compute_hq_features(emb, inter)


class DecoderForOnnx(nn.Module):
    """Prompt embedding, HQ mask decoding, the official output selection and upscaling to the original size."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.image_size = model.config.prompt_encoder_config.image_size
        self.register_buffer("image_pe", model.get_image_wide_positional_embeddings().detach().clone(), persistent=False)

    def input_size(self, orig_im_size: torch.Tensor) -> torch.Tensor:
        """(h, w) of the image after resizing its longest side to S, as int64 (2,)."""
        scale = self.image_size / orig_im_size.max()
        return torch.floor(orig_im_size * scale + 0.5).to(torch.int64)

    def forward(self, image_embeddings, hq_features, point_coords, point_labels, mask_input, has_mask_input,
                orig_im_size, multimask_output, hq_token_only):
        pe = self.model.prompt_encoder
        sparse = pe.embed_points(point_coords, point_labels, pad=False)[None]  # (1, B, N, C)
        no_mask = pe.no_mask_embed.weight.view(1, -1, 1, 1)
        dense = pe.mask_embed(mask_input) * has_mask_input + no_mask * (1 - has_mask_input)  # (1 or B, C, h, w)
        masks, iou = self.model.mask_decoder(image_embeddings, self.image_pe, sparse, dense[None], hq_features)
        low_res, scores = select_masks(masks, iou, multimask_output, hq_token_only, "best")
        low_res, scores = low_res[0], scores[0]  # (B, 1, 4h, 4w), (B, 1)

        # the front end's post-processing (processing.upscale_logits), with sizes that are graph inputs
        up = F.interpolate(low_res, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        size = self.input_size(orig_im_size)
        up = up[:, :, : size[0], : size[1]]
        orig = orig_im_size.to(torch.int64)
        out = F.interpolate(up, size=(orig[0], orig[1]), mode="bilinear", align_corners=False)
        return out, scores, low_res


def decoder_example_inputs(model, num_prompts: int = 2, num_points: int = 3) -> tuple[torch.Tensor, ...]:
    """Dummy decoder inputs with the shapes `DecoderForOnnx` takes (used to trace it)."""
    cfg = model.config
    g = cfg.prompt_encoder_config.image_embedding_size
    c = cfg.mask_decoder_config.hidden_size
    s = cfg.prompt_encoder_config.image_size
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, c, g, g, generator=gen),
        torch.randn(1, c // 8, 4 * g, 4 * g, generator=gen),
        torch.rand(num_prompts, num_points, 2, generator=gen) * s,
        torch.tensor([[1.0, 0.0, -1.0][:num_points] + [1.0] * max(0, num_points - 3)] * num_prompts),
        torch.randn(1, 1, 4 * g, 4 * g, generator=gen),
        torch.tensor([1.0]),
        torch.tensor([float(s) * 3 / 4, float(s)]),
        torch.tensor([1.0]),
        torch.tensor([0.0]),
    )


def _fp32_copy(model):
    if not hasattr(model, "mask_decoder") or not hasattr(model, "vision_encoder"):
        raise TypeError(f"export_onnx needs a SamHQModel (or a checkpoint path), got {type(model).__name__}")
    if not getattr(model, "hq_enabled", True):
        raise ValueError("ONNX export needs SAM-HQ weights; this model was loaded from a plain SAM checkpoint")
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
        raise ValueError("cannot export an int8-quantized model; export the fp32 model (onnxruntime has its own quantizer)")
    # the plain forms (samhq.modeling.fast_paths' in-place and chunked forms do not trace to one graph)
    return copy.deepcopy(model).float().cpu().eval().set_fast_path(False)


def check_standard_ops(path: str | Path, opset: int = OPSET) -> list[str]:
    """Return the operator types of an ONNX model; raise ValueError if any is outside the standard domain."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise ValueError(f"{path} uses non-standard operators {custom}; onnxruntime-web cannot run them")
    versions = {o.domain: o.version for o in proto.opset_import}
    if versions.get("", versions.get("ai.onnx")) != opset:
        raise ValueError(f"{path} has opset {versions}, expected {opset}")
    return sorted({n.op_type for n in proto.graph.node})


def export_onnx(model, out_dir: str | Path, *, encoder: bool = True, decoder: bool = True, opset: int = OPSET,
                overwrite: bool = False) -> dict[str, Path]:
    """Export `model` (a SamHQModel or anything `SamHQModel.from_pretrained` loads) to `out_dir`.

    Writes encoder.onnx, decoder.onnx and samhq_onnx.json (sizes and the model config, read by
    `OnnxPredictor`). Returns {"encoder": path, "decoder": path, "meta": path} for what was written.
    """
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'samhq[onnx]'") from None
    if not (encoder or decoder):
        raise ValueError("nothing to export: encoder and decoder are both disabled")
    if opset < 17:
        raise ValueError(f"opset {opset} is too old: LayerNormalization needs opset 17 or newer")
    if isinstance(model, (str, Path)):
        model = SamHQModel.from_pretrained(model)
    model = _fp32_copy(model)
    out_dir = Path(out_dir)
    targets = {"meta": out_dir / META_FILE}
    if encoder:
        targets["encoder"] = out_dir / ENCODER_FILE
    if decoder:
        targets["decoder"] = out_dir / DECODER_FILE
    if not overwrite:
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} already exists; pass overwrite=True (--force) to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file; give a directory to write the ONNX models into")
    out_dir.mkdir(parents=True, exist_ok=True)

    cfg = model.config
    s = cfg.vision_config.image_size
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        if encoder:
            torch.onnx.export(
                EncoderForOnnx(model), (torch.zeros(1, 3, s, s),), str(targets["encoder"]), dynamo=False,
                opset_version=opset, input_names=ENCODER_INPUTS, output_names=ENCODER_OUTPUTS,
                do_constant_folding=True,
            )
        if decoder:
            torch.onnx.export(
                DecoderForOnnx(model), decoder_example_inputs(model), str(targets["decoder"]), dynamo=False,
                opset_version=opset, input_names=DECODER_INPUTS, output_names=DECODER_OUTPUTS,
                do_constant_folding=True,
                dynamic_axes={
                    "point_coords": {0: "num_prompts", 1: "num_points"},
                    "point_labels": {0: "num_prompts", 1: "num_points"},
                    "mask_input": {0: "num_mask_inputs"},
                    "masks": {0: "num_prompts", 2: "height", 3: "width"},
                    "iou_predictions": {0: "num_prompts"},
                    "low_res_masks": {0: "num_prompts"},
                },
            )
    for key in ("encoder", "decoder"):
        if key in targets:
            check_standard_ops(targets[key], opset)
    g = cfg.prompt_encoder_config.image_embedding_size
    meta = {
        "format": "samhq-onnx",
        "format_version": FORMAT_VERSION,
        "opset": opset,
        "image_size": s,
        "embedding_size": g,
        "low_res_size": 4 * g,
        "mask_threshold": 0.0,
        "fingerprint": model_fingerprint(model, hq_fusion=True),  # what made the encoder's outputs (embedding files)
        "config": cfg.to_dict(),
    }
    targets["meta"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return targets
