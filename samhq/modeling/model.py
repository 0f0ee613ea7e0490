"""`SamHQModel` and `SamHQVisionModel`: transformers' public classes (same names, inputs and outputs)
over samhq's modules, and loading and saving them.

Data flow: pixel_values -> vision encoder -> image embeddings + early features -> (once per image)
HQ features; prompts -> prompt encoder -> sparse + dense embeddings; both -> mask decoder -> every
token's masks and IoU predictions -> `select_masks` -> the returned masks.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoints
from ..config import SamHQConfig, SamHQTinyViTConfig, SamHQVisionConfig
from . import fast_paths
from .common import set_fast_path
from .image_encoder import VisionEncoder
from .losses import segmentation_loss
from .mask_decoder import MaskDecoder, is_hq_parameter
from .mask_selection import select_masks
from .pretrained import load_pretrained
from .prompt_encoder import PositionalEmbedding, PromptEncoder, check_prompts
from .tiny_vit import TinyViTEncoder


class ModelOutput:
    """Attribute, key (`out["iou_scores"]`) and index (`out[0]`) access to the fields that are set."""

    def _items(self):
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def keys(self):
        return [k for k, _ in self._items()]

    def __getitem__(self, key):
        items = self._items()
        return items[key][1] if isinstance(key, int) else dict(items)[key]

    def __iter__(self):
        return iter(self.keys())

    def to_tuple(self):
        return tuple(v for _, v in self._items())


@dataclass
class SamHQVisionEncoderOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    intermediate_embeddings: list[torch.Tensor] | None = None


@dataclass
class SamHQImageSegmentationOutput(ModelOutput):
    """iou_scores (B, P, M), pred_masks (B, P, M, 256, 256) low-resolution logits; loss when labels are given."""

    loss: torch.Tensor | None = None
    iou_scores: torch.Tensor | None = None
    pred_masks: torch.Tensor | None = None


def build_vision_encoder(config) -> nn.Module:
    if isinstance(config, SamHQTinyViTConfig):
        return TinyViTEncoder(config)
    return VisionEncoder(config)


class _PretrainedMixin:
    @classmethod
    def from_pretrained(cls, source, device=None, dtype=None, strict_hq: bool = False, low_memory: bool = False):
        """Load from an official `.pth`, a transformers-layout folder (config.json + model.safetensors), a
        `.safetensors` file, a hub id (through huggingface_hub, online) or a bundled model name.

        dtype: the image encoder's precision (e.g. torch.bfloat16); the prompt encoder and mask decoder
        stay float32. A plain SAM checkpoint (no HQ weights) loads with a warning and runs as SAM, unless
        strict_hq. low_memory: inference with the weights left in the memory-mapped file, the image
        encoder's pages handed back after each use (`samhq.modeling.low_memory`: CPU, float32, Linux;
        ValueError otherwise). Raises `CheckpointError` naming the file and the problem.
        """
        return load_pretrained(cls, source, device=device, dtype=dtype, strict_hq=strict_hq, low_memory=low_memory)

    def save_pretrained(self, directory, safe_serialization: bool = True) -> Path:
        """Write the transformers layout: `config.json` + `model.safetensors` (or `pytorch_model.bin`)."""
        state = {k: v for k, v in self.state_dict().items() if getattr(self, "hq_enabled", True) or not is_hq_parameter(k)}
        return checkpoints.write_pretrained(state, self.config, directory, safe_serialization=safe_serialization)

    def set_fast_path(self, enabled: bool | str = True):
        """Use the fast forms of `samhq.modeling.fast_paths` in eval mode (True, the default), only those that trace
        to one graph ("graph", what the ONNX export uses), or the plain forms everywhere (False). Returns the model.
        Raises ValueError for any other value."""
        set_fast_path(self, enabled)
        self._fast_path = enabled
        return self

    @property
    def runs_fast_path(self) -> bool:
        """True in eval mode with the eager fast path on: forwards then compute without autograd (the fast forms
        reuse buffers and write in place); train mode, "graph" or `set_fast_path(False)` compute with autograd."""
        return getattr(self, "_fast_path", False) is True and not self.training

    def _autograd(self):
        return torch.set_grad_enabled(torch.is_grad_enabled() and not self.runs_fast_path)


class SamHQVisionModel(_PretrainedMixin, nn.Module):
    """The image encoder alone: pixel_values (B, 3, S, S) -> last_hidden_state, intermediate_embeddings."""

    def __init__(self, config: SamHQVisionConfig | SamHQTinyViTConfig | SamHQConfig):
        super().__init__()
        if isinstance(config, SamHQConfig):
            config = config.vision_config
        self.config = config
        self.vision_encoder = build_vision_encoder(config)
        self.set_fast_path(True)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> SamHQVisionEncoderOutput:
        _check_pixels(pixel_values, self.config.image_size)
        with self._autograd():
            last, inter = self.vision_encoder(pixel_values)
        return SamHQVisionEncoderOutput(last_hidden_state=last, intermediate_embeddings=inter)


class SamHQModel(_PretrainedMixin, nn.Module):
    """SAM-HQ: image encoder, prompt encoder and HQ mask decoder.

    Masks are computed as the official SAM-HQ code does; outputs follow transformers' shapes and, by
    default, its output selection. `hq_enabled` is False for a plain SAM checkpoint (no HQ weights).
    The fast forms of `samhq.modeling.fast_paths` run in eval mode unless `set_fast_path(False)`.
    """

    def __init__(self, config: SamHQConfig | None = None):
        super().__init__()
        config = config or SamHQConfig()
        self.config = config
        self.shared_image_embedding = PositionalEmbedding(config.vision_config.num_pos_feats)
        self.vision_encoder = build_vision_encoder(config.vision_config)
        self.prompt_encoder = PromptEncoder(config.prompt_encoder_config, self.shared_image_embedding)
        self.mask_decoder = MaskDecoder(config.mask_decoder_config)
        self.hq_enabled = True
        self.set_fast_path(True)

    @property
    def device(self) -> torch.device:
        return self.shared_image_embedding.positional_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        """The prompt encoder's and mask decoder's dtype: image embeddings are given to them in it."""
        return self.mask_decoder.iou_token.weight.dtype

    @property
    def encoder_dtype(self) -> torch.dtype:
        """The image encoder's dtype (bfloat16 after `from_pretrained(..., dtype=torch.bfloat16)`)."""
        return next(self.vision_encoder.parameters()).dtype

    @property
    def mask_size(self) -> int:
        """Side of the low-resolution mask logits (256 for the released models)."""
        return 4 * self.config.prompt_encoder_config.image_embedding_size

    def hq_parameter_names(self) -> list[str]:
        """Names of the parameters SAM-HQ adds to SAM (what the paper trains)."""
        return [n for n, _ in self.named_parameters() if is_hq_parameter(n)]

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        emb, inter = self.vision_encoder(pixel_values.to(self.encoder_dtype))
        return emb.to(self.dtype), [t.to(self.dtype) for t in inter]

    def get_image_wide_positional_embeddings(self) -> torch.Tensor:
        """(1, C, h, w) positional encoding of the image-embedding grid."""
        return self.shared_image_embedding.grid(self.config.prompt_encoder_config.image_embedding_size)

    @torch.no_grad()
    def get_image_embeddings(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values (B, 3, S, S) -> image embeddings (B, 256, S/16, S/16) and intermediate embeddings
        (each global-attention layer's output, (B, S/16, S/16, C); SAM-HQ fuses the first)."""
        _check_pixels(pixel_values, self.config.vision_config.image_size)
        return self._encode(pixel_values)

    @torch.no_grad()
    def get_prompt_embeddings(self, input_points=None, input_labels=None, input_boxes=None, input_masks=None):
        """Sparse (B, P, T, C) and dense (B, 1 or P, C, h, w) prompt embeddings."""
        return self.prompt_encoder(input_points, input_labels, input_boxes, input_masks)

    def compute_hq_features(self, image_embeddings: torch.Tensor, intermediate_embeddings) -> torch.Tensor | None:
        """The per-image half of the HQ branch (global-local fusion), (B, C/8, 4h, 4w); None for plain SAM."""
        if not self.hq_enabled:
            return None
        if not intermediate_embeddings:
            raise ValueError(
                "SAM-HQ needs intermediate_embeddings with image_embeddings: pass both, as returned by "
                "model.get_image_embeddings(pixel_values)"
            )
        with self._autograd():
            return self.mask_decoder.hq_features(image_embeddings, intermediate_embeddings[0])

    # The engine interface (samhq.engines.TorchEngine): what a front end needs from a model family.
    saved_features = ("features", "early_features")
    stability = None  # SAM decodes no dynamic multimask (see mask_selection)

    @torch.no_grad()
    def embed_image(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-image features to keep: "features" (B, 256, h, w) and, for SAM-HQ, "early_features" (B, h, w, C)."""
        emb, inter = self.get_image_embeddings(pixel_values)
        return {"features": emb, "early_features": inter[0]} if self.hq_enabled else {"features": emb}

    @torch.no_grad()
    def prepare_features(self, features: dict) -> dict:
        """Add the per-image work every prompt shares (HQ features, the decoder's context), once."""
        if "hq_features" not in features:
            early = [features["early_features"]] if "early_features" in features else []
            features["hq_features"] = self.compute_hq_features(features["features"], early)
        if "context" not in features:
            features["context"] = self.decoder_context(features["features"])
        return features

    def decode_features(self, features: dict, input_points=None, input_labels=None, input_boxes=None, input_masks=None,
                        needed=None, mask_extent=None):
        """`predict_all` on `prepare_features`' dict: every token's masks (B, P, K, 4h, 4w) and IoU (B, P, 4)."""
        features = self.prepare_features(features)
        return self.predict_all(features["features"], features["hq_features"], input_points, input_labels, input_boxes,
                                input_masks, None if input_masks is not None else features["context"], needed, mask_extent)

    @torch.no_grad()
    def decoder_context(self, image_embeddings: torch.Tensor) -> dict | None:
        """The mask decoder's per-image work for prompts without a mask input, to pass to `predict_all`
        for every prompt of these (B, C, h, w) embeddings; None when the fast path is off (nothing to share)."""
        if not self.mask_decoder.use_fast_path_on(image_embeddings):
            return None
        dense = self.prompt_encoder.no_mask_embed.weight.view(1, 1, -1, 1, 1).to(image_embeddings.dtype)
        return fast_paths.image_context(self.mask_decoder, image_embeddings, self.get_image_wide_positional_embeddings(), dense)

    def predict_all(
        self,
        image_embeddings: torch.Tensor,
        hq_features: torch.Tensor | None,
        input_points=None,
        input_labels=None,
        input_boxes=None,
        input_masks=None,
        context: dict | None = None,
        needed=None,
        mask_extent: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every output token's mask logits (B, P, 5, 4h, 4w) (4 for plain SAM) and IoU predictions (B, P, 4).

        Prompts as in `forward`. context: `decoder_context(image_embeddings)`, kept while the image stays
        the same; it is used for prompts without input_masks. needed: a function of the IoU predictions
        (B, P, 4) -> bool (B, P); the masks of the prompts it rejects are NaN, not computed (`MaskDecoder.forward`).
        mask_extent: (rows, columns), how many leading rows and columns of each mask are wanted; the rest may be NaN
        (`MaskDecoder.forward`).
        See `select_masks` for the returned subset.
        """
        with self._autograd():
            return self._predict_all(image_embeddings, hq_features, input_points, input_labels, input_boxes, input_masks,
                                     context, needed, mask_extent)

    def _predict_all(self, image_embeddings, hq_features, input_points, input_labels, input_boxes, input_masks, context,
                     needed=None, mask_extent=None):
        if input_points is not None and input_labels is None:
            input_labels = torch.ones(input_points.shape[:-1], dtype=torch.int, device=input_points.device)
        sparse, dense = self.prompt_encoder(input_points, input_labels, input_boxes, input_masks)
        if sparse.shape[0] != image_embeddings.shape[0]:
            if image_embeddings.shape[0] != 1:
                raise ValueError(
                    f"prompts are given for {sparse.shape[0]} images but there are {image_embeddings.shape[0]} image embeddings"
                )
            image_embeddings = image_embeddings.expand(sparse.shape[0], -1, -1, -1)
            if hq_features is not None:
                hq_features = hq_features.expand(sparse.shape[0], -1, -1, -1)
        if input_masks is not None or (context is not None and context["keys"].shape[0] != sparse.shape[0]):
            context = None
        return self.mask_decoder(image_embeddings, self.get_image_wide_positional_embeddings() if context is None else None,
                                 sparse, dense, hq_features, context, needed, mask_extent)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        input_masks: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        intermediate_embeddings: list[torch.Tensor] | None = None,
        multimask_output: bool = True,
        hq_token_only: bool = False,
        labels: torch.Tensor | None = None,
        mask_selection: str = "sorted",
        **kwargs: Any,
    ) -> SamHQImageSegmentationOutput:
        """Predict low-resolution masks for B images x P prompts.

        input_points (B, P, N, 2) and input_labels (B, P, N) in the resized input frame (what
        `SamHQProcessor` makes); input_boxes (B, P, 4) x0, y0, x1, y1; input_masks (B, 1 or P, 256, 256)
        logits. `mask_selection`: "sorted" (transformers: the 3 multimask masks by IoU) or "best" (the
        official predictor: the single best one), see `samhq.modeling.mask_selection`.
        labels: ground truth in the padded square input frame (B, [P,] S', S') at any resolution S',
        as `SamHQProcessor(images, segmentation_maps=...)` makes them; the loss is BCE + dice of the best
        returned mask. Extra processor keys (`original_sizes`, `reshaped_input_sizes`) are accepted.
        """
        unknown = set(kwargs) - {"original_sizes", "reshaped_input_sizes", "return_dict", "output_attentions",
                                 "output_hidden_states"}
        if unknown:
            raise TypeError(f"SamHQModel.forward got unexpected arguments: {sorted(unknown)}")
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("pass exactly one of pixel_values and image_embeddings")
        check_prompts(input_points, input_labels, input_boxes, input_masks, self.mask_size)
        if labels is not None and labels.shape[-1] != labels.shape[-2]:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} are not in the model's square input frame: pass the masks to "
                "SamHQProcessor(images, segmentation_maps=masks), which resizes and pads them as it does the images"
            )
        if pixel_values is not None:
            _check_pixels(pixel_values, self.config.vision_config.image_size)
        with self._autograd():
            if pixel_values is not None:
                image_embeddings, intermediate_embeddings = self._encode(pixel_values)
            hq_features = self.compute_hq_features(image_embeddings, intermediate_embeddings)
            masks, iou = self._predict_all(image_embeddings, hq_features, input_points, input_labels, input_boxes,
                                           input_masks, None)
        # a plain SAM checkpoint returns what transformers' SamModel returns: the masks in token order
        selection = mask_selection if self.hq_enabled else "token_order"
        pred_masks, scores = select_masks(masks, iou, multimask_output, hq_token_only, selection)
        loss = segmentation_loss(pred_masks, labels) if labels is not None else None
        return SamHQImageSegmentationOutput(loss=loss, iou_scores=scores, pred_masks=pred_masks)


def model_fingerprint(model, hq_fusion: bool = False) -> str:
    """A short hash of the image encoder (its config and a sample of every weight).

    Only the encoder decides an image embedding, so a model whose decoder was fine-tuned on a frozen
    encoder (how SAM-HQ is trained) shares embeddings with its base. Weights are hashed at bfloat16
    precision so that fp32 and bf16 copies of a model agree. `hq_fusion` also hashes the HQ branch's
    per-image convolutions (for engines whose embeddings hold the fused HQ features).
    """
    h = hashlib.sha256(model.config.vision_config.to_json_string().encode())
    state = {f"vision_encoder.{k}": v for k, v in model.vision_encoder.state_dict().items()}
    # weights outside the encoder that the saved features also depend on (SAM 2: the high-resolution
    # projections and the no-memory embedding; see the model's `embedding_parameters`)
    prefixes = tuple(getattr(model, "embedding_parameters", ()))
    if hq_fusion:
        prefixes += ("mask_decoder.encoder_", "mask_decoder.compress_vit_")
    if prefixes:
        state.update({k: v for k, v in model.state_dict().items() if k.startswith(prefixes)})
    for name, value in state.items():
        # a dynamically quantized (int8) layer keeps a (weight, bias) pair and its dtype in the state dict
        tensors = [v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, torch.Tensor)]
        for t in tensors:
            _hash_sample(h, name, t.dequantize() if t.is_quantized else t)
    return h.hexdigest()[:16]


def _hash_sample(h, name: str, t: torch.Tensor) -> None:
    flat = t.detach().flatten()
    flat = flat[:: max(1, flat.numel() // 256)][:256].cpu()
    if flat.is_floating_point():
        flat = flat.to(torch.bfloat16).view(torch.int16)
    h.update(name.removeprefix("vision_encoder.").encode())
    h.update(flat.numpy().tobytes())



def save_pretrained(model, directory, safe_serialization: bool = True) -> Path:
    """`model.save_pretrained(directory)`: config.json + model.safetensors (transformers layout)."""
    return model.save_pretrained(directory, safe_serialization=safe_serialization)


def save_official(model, path, overwrite: bool = False) -> Path:
    """Write an official-format `.pth` state dict (loadable by `segment_anything_hq`)."""
    state = {k: v for k, v in model.state_dict().items() if getattr(model, "hq_enabled", True) or not is_hq_parameter(k)}
    return checkpoints.write_official(state, path, overwrite=overwrite)


def _check_pixels(pixel_values: torch.Tensor, image_size: int) -> None:
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}; use SamHQProcessor")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (image_size, image_size):
        raise ValueError(
            f"pixel_values must have shape (B, 3, {image_size}, {image_size}), got {tuple(pixel_values.shape)}; "
            "SamHQProcessor resizes and pads images to that"
        )
