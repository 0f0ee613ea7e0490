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

SAM 2.1 / HQ-SAM 2 (`SamHQ2Model`; samhq_onnx.json says "family": "sam2"):

encoder.onnx
    pixel_values (1, 3, S, S) float32, resized to S x S (aspect ratio not kept), ImageNet-normalised
    -> image_embeddings (1, 256, S/16, S/16) (no-memory embedding added), high_res_s0 (1, 32, S/4, S/4),
       high_res_s1 (1, 64, S/8, S/8) (after conv_s0 / conv_s1: what Meta's predictor keeps per image)

decoder.onnx
    image_embeddings, high_res_s0, high_res_s1   from the encoder
    point_coords (B, N, 2), point_labels (B, N)  in the S x S input frame, SAM 2's order: box corners first
                                    (labels 2, 3), then the points (1 / 0), then one (0, 0) point labelled
                                    -1 ("not a point"); N = 0 for a mask alone
    mask_input, has_mask_input, multimask_output as above; hq_token_only (1,) only for HQ-SAM 2
    orig_im_size (2,) float32       (height, width); the masks are resized to it directly (no padding)
    -> masks (B, M, H, W), iou_predictions (B, M), low_res_masks (B, M, S/4, S/4),
       object_score_logits (B, 1)
    Output selection is Meta's / SysCV's predictor's: with multimask_output the three masks in token
    order (M = 3), without it the single-mask token unless its stability score is below the threshold
    (then the best of the three); HQ-SAM 2 adds the HQ mask, or returns it alone (M = 1) with
    hq_token_only. Plain SAM 2 weights export too (no HQ input).

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

from ..dtypes import resolve_dtype
from ..modeling.auto import load_model
from ..modeling.mask_selection import select_masks
from ..modeling.model import model_fingerprint
from ..modeling.sam2.model import SamHQ2Model

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
SAM2_ENCODER_OUTPUTS = ["image_embeddings", "high_res_s0", "high_res_s1"]
SAM2_DECODER_INPUTS = [
    "image_embeddings", "high_res_s0", "high_res_s1", "point_coords", "point_labels", "mask_input", "has_mask_input",
    "orig_im_size", "multimask_output", "hq_token_only",
]
SAM2_DECODER_OUTPUTS = ["masks", "iou_predictions", "low_res_masks", "object_score_logits"]


class EncoderForOnnx(nn.Module):
    """pixel_values (1, 3, S, S) -> image_embeddings (1, 256, h, w), hq_features (1, 32, 4h, 4w)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        emb, inter = self.model._encode(pixel_values)  # in the encoder's dtype, then float32 for the decoder
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


class Sam2EncoderForOnnx(nn.Module):
    """pixel_values (1, 3, S, S) -> image_embeddings (1, 256, h, w), high_res_s0 (1, 32, 4h, 4w), high_res_s1 (1, 64, 2h, 2w)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        emb, (s0, s1) = self.model.get_image_embeddings(pixel_values)
        return emb, s0, s1


class Sam2DecoderForOnnx(nn.Module):
    """SAM 2's prompt embedding, (HQ) mask decoding, the official predictor's selection and the resize to the
    original size."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer("image_pe", model.get_image_wide_positional_embeddings().detach().clone(), persistent=False)

    def forward(self, image_embeddings, high_res_s0, high_res_s1, point_coords, point_labels, mask_input, has_mask_input,
                orig_im_size, multimask_output, hq_token_only=None):
        model = self.model
        pe = model.prompt_encoder
        sparse = pe.embed_points(point_coords, point_labels, pad=False)[None]  # (1, B, N, C); the caller lays out SAM 2's tokens
        no_mask = pe.no_mask_embed.weight.view(1, -1, 1, 1)
        dense = pe.mask_embed(mask_input) * has_mask_input + no_mask * (1 - has_mask_input)  # (1 or B, C, h, w)
        masks, iou, object_scores = model.mask_decoder(image_embeddings, self.image_pe, sparse, dense[None],
                                                       [high_res_s0, high_res_s1], model.hq_enabled)
        low_res, scores = select_masks(masks, iou, multimask_output, hq_token_only if model.hq_enabled else False,
                                       "token_order", stability=model.stability)
        low_res, scores = low_res[0], scores[0]  # (B, M, 4h, 4w), (B, M)
        orig = orig_im_size.to(torch.int64)
        out = F.interpolate(low_res, size=(orig[0], orig[1]), mode="bilinear", align_corners=False)
        return out, scores, low_res, object_scores[0]


def sam2_decoder_example_inputs(model, num_prompts: int = 2, num_points: int = 3) -> tuple[torch.Tensor, ...]:
    """Dummy inputs with the shapes `Sam2DecoderForOnnx` takes (used to trace it; hq_token_only only for HQ-SAM 2)."""
    cfg = model.config
    g = cfg.prompt_encoder_config.image_embedding_size
    c = cfg.mask_decoder_config.hidden_size
    s = cfg.image_size
    gen = torch.Generator().manual_seed(0)
    labels = [2.0, 3.0, 1.0, 0.0][:num_points] + [1.0] * max(0, num_points - 4)
    inputs = (
        torch.randn(1, c, g, g, generator=gen),
        torch.randn(1, c // 8, 4 * g, 4 * g, generator=gen),
        torch.randn(1, c // 4, 2 * g, 2 * g, generator=gen),
        torch.rand(num_prompts, num_points, 2, generator=gen) * s,
        torch.tensor([labels] * num_prompts),
        torch.randn(1, 1, 4 * g, 4 * g, generator=gen),
        torch.tensor([1.0]),
        torch.tensor([float(s) * 3 / 4, float(s)]),
        torch.tensor([1.0]),
    )
    return inputs + ((torch.tensor([0.0]),) if model.hq_enabled else ())


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
        raise TypeError(f"export_onnx needs a SamHQModel or SamHQ2Model (or a checkpoint path), got {type(model).__name__}")
    sam2 = isinstance(model, SamHQ2Model)
    if not sam2 and not getattr(model, "hq_enabled", True):
        raise ValueError("ONNX export needs SAM-HQ weights; this model was loaded from a plain SAM checkpoint")
    if sam2 and not model.config.mask_decoder_config.use_high_res_features:
        raise ValueError("ONNX export of SAM 2 needs a config with high-resolution features (every released model has them)")
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
        raise ValueError("cannot export an int8-quantized model; export the fp32 model (onnxruntime has its own quantizer)")
    # the fast forms that trace to one graph (the eager ones write in place and loop over prompts)
    return copy.deepcopy(model).float().cpu().eval().set_fast_path("graph")


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
                overwrite: bool = False, dtype=None) -> dict[str, Path]:
    """Export `model` (a SamHQModel or SamHQ2Model, or any checkpoint `samhq.load_model` loads) to `out_dir`.

    Writes encoder.onnx, decoder.onnx and samhq_onnx.json (family, sizes and the model config, read by
    `OnnxEngine`). dtype: the image encoder's precision in the file, None / "float32" (default, exact) or
    "float16" (half the file; weights and arithmetic in float16, float32 pixels in and features out; for
    GPU providers, a CPU runs it slower than float32); the decoder is always float32, as in the torch
    model. bfloat16 is refused: ONNX runtimes' CPU kernels do not run it (OpenVINO's `precision="bf16"`
    hint gives bf16 arithmetic from the float32 file where the CPU has the units). Returns {"encoder":
    path, "decoder": path, "meta": path} for what was written. Raises ValueError / FileExistsError.
    """
    encoder_dtype = resolve_dtype("float32" if dtype == "auto" else dtype)
    if encoder_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"ONNX export takes dtype float32 or float16, got {dtype!r}: bfloat16 does not run in "
                         "onnxruntime's CPU kernels; export float32 (OpenVINO's precision='bf16' hint runs it in bf16)")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'samhq[onnx]'") from None
    if not (encoder or decoder):
        raise ValueError("nothing to export: encoder and decoder are both disabled")
    if opset < 17:
        raise ValueError(f"opset {opset} is too old: LayerNormalization needs opset 17 or newer")
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
    if isinstance(model, (str, Path)):
        model = load_model(model)
    model = _fp32_copy(model)
    model.vision_encoder.to(encoder_dtype)
    sam2 = isinstance(model, SamHQ2Model)
    out_dir.mkdir(parents=True, exist_ok=True)

    cfg = model.config
    s = cfg.image_size if sam2 else cfg.vision_config.image_size
    if sam2:
        enc, enc_out = Sam2EncoderForOnnx(model), SAM2_ENCODER_OUTPUTS
        dec, dec_args = Sam2DecoderForOnnx(model), sam2_decoder_example_inputs(model)
        dec_in = SAM2_DECODER_INPUTS[:len(dec_args)]
        dec_out = SAM2_DECODER_OUTPUTS
        masks_axes = {0: "num_prompts", 1: "num_masks", 2: "height", 3: "width"}
        extra_axes = {"iou_predictions": {0: "num_prompts", 1: "num_masks"}, "low_res_masks": {0: "num_prompts", 1: "num_masks"},
                      "object_score_logits": {0: "num_prompts"}}
    else:
        enc, enc_out = EncoderForOnnx(model), ENCODER_OUTPUTS
        dec, dec_args, dec_in, dec_out = DecoderForOnnx(model), decoder_example_inputs(model), DECODER_INPUTS, DECODER_OUTPUTS
        masks_axes = {0: "num_prompts", 2: "height", 3: "width"}
        extra_axes = {"iou_predictions": {0: "num_prompts"}, "low_res_masks": {0: "num_prompts"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        if encoder:
            torch.onnx.export(
                enc, (torch.zeros(1, 3, s, s),), str(targets["encoder"]), dynamo=False,
                opset_version=opset, input_names=ENCODER_INPUTS, output_names=enc_out,
                do_constant_folding=True,
            )
        if decoder:
            torch.onnx.export(
                dec, dec_args, str(targets["decoder"]), dynamo=False,
                opset_version=opset, input_names=dec_in, output_names=dec_out,
                do_constant_folding=True,
                dynamic_axes={
                    "point_coords": {0: "num_prompts", 1: "num_points"},
                    "point_labels": {0: "num_prompts", 1: "num_points"},
                    "mask_input": {0: "num_mask_inputs"},
                    "masks": masks_axes,
                    **extra_axes,
                },
            )
    for key in ("encoder", "decoder"):
        if key in targets:
            check_standard_ops(targets[key], opset)
    g = cfg.prompt_encoder_config.image_embedding_size
    meta = {
        "format": "samhq-onnx",
        "format_version": FORMAT_VERSION,
        "family": "sam2" if sam2 else "sam",
        "hq": bool(model.hq_enabled),
        "opset": opset,
        "encoder_dtype": str(encoder_dtype).removeprefix("torch."),
        "image_size": s,
        "embedding_size": g,
        "low_res_size": 4 * g,
        "mask_threshold": 0.0,
        # what made the encoder's outputs (embedding files); SAM 2's are the torch engine's very features
        "fingerprint": model_fingerprint(model) if sam2 else model_fingerprint(model, hq_fusion=True),
        "config": cfg.to_dict(),
    }
    targets["meta"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return targets
