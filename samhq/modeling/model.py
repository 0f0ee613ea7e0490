"""`SamHQModel` and `SamHQVisionModel`: the seed's public classes over our modules."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ..config import SamHQConfig, SamHQTinyViTConfig, SamHQVisionConfig
from .image_encoder import VisionEncoder
from .mask_decoder import MaskDecoder, select_masks
from .prompt_encoder import PositionalEmbedding, PromptEncoder
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
    def from_pretrained(cls, source, device=None, dtype=None, **kwargs):
        """Load from an official `.pth`, a seed-layout directory, a `.safetensors` file, a hub id or a bundled name."""
        from ..checkpoints import load_model

        return load_model(source, device=device, dtype=dtype, model_class=cls, **kwargs)

    def save_pretrained(self, directory, safe_serialization: bool = True):
        """Write `config.json` + `model.safetensors` (the seed's layout, loadable by transformers)."""
        from ..checkpoints import save_pretrained

        save_pretrained(self, directory, safe_serialization=safe_serialization)


class SamHQVisionModel(_PretrainedMixin, nn.Module):
    """The image encoder alone: pixel_values (B, 3, S, S) -> last_hidden_state, intermediate_embeddings."""

    def __init__(self, config: SamHQVisionConfig | SamHQTinyViTConfig | SamHQConfig):
        super().__init__()
        if isinstance(config, SamHQConfig):
            config = config.vision_config
        self.config = config
        self.vision_encoder = build_vision_encoder(config)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> SamHQVisionEncoderOutput:
        _check_pixels(pixel_values, self.config.image_size)
        last, inter = self.vision_encoder(pixel_values)
        return SamHQVisionEncoderOutput(last_hidden_state=last, intermediate_embeddings=inter)


class SamHQModel(_PretrainedMixin, nn.Module):
    """SAM-HQ: image encoder, prompt encoder and HQ mask decoder.

    Masks are computed as the official SAM-HQ code does; outputs follow the seed's (transformers)
    shapes and selection. `hq_enabled` is False for a plain SAM checkpoint (no HQ weights).
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

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        emb, inter = self.vision_encoder(pixel_values.to(self.encoder_dtype))
        return emb.to(self.dtype), [t.to(self.dtype) for t in inter]

    def get_image_wide_positional_embeddings(self) -> torch.Tensor:
        """(1, C, h, w) positional encoding of the image-embedding grid."""
        return self.shared_image_embedding.grid(self.config.prompt_encoder_config.image_embedding_size)

    @torch.no_grad()
    def get_image_embeddings(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values (B, 3, S, S) -> image embeddings (B, 256, S/16, S/16) and intermediate embeddings."""
        _check_pixels(pixel_values, self.config.vision_config.image_size)
        return self._encode(pixel_values)

    @torch.no_grad()
    def get_prompt_embeddings(self, input_points=None, input_labels=None, input_boxes=None, input_masks=None):
        """Sparse (B, P, T, C) and dense (B, 1 or P, C, h, w) prompt embeddings."""
        return self.prompt_encoder(input_points, input_labels, input_boxes, input_masks)

    def compute_hq_features(self, image_embeddings: torch.Tensor, intermediate_embeddings) -> torch.Tensor | None:
        """The per-image half of the HQ branch, (B, C/8, 4h, 4w); None for plain SAM."""
        if not self.hq_enabled:
            return None
        if not intermediate_embeddings:
            raise ValueError(
                "SAM-HQ needs intermediate_embeddings with image_embeddings: pass both, as returned by "
                "model.get_image_embeddings(pixel_values)"
            )
        return self.mask_decoder.hq_features(image_embeddings, intermediate_embeddings[0])

    def predict_all(
        self,
        image_embeddings: torch.Tensor,
        hq_features: torch.Tensor | None,
        input_points=None,
        input_labels=None,
        input_boxes=None,
        input_masks=None,
        context: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every output token's mask logits (B, P, 5, 4h, 4w) and IoU predictions (B, P, 4); see `select_masks`.

        context: `decoder_context(image_embeddings)`, kept while the image stays the same, saves the
        decoder's per-image work; it is used for prompts without input_masks.
        """
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
                                 sparse, dense, hq_features, context)

    @torch.no_grad()
    def decoder_context(self, image_embeddings: torch.Tensor) -> dict:
        """The mask decoder's per-image work for prompts without a mask input, (B, C, h, w) embeddings -> tensors for `predict_all`."""
        dense = self.prompt_encoder.no_mask_embed.weight.view(1, 1, -1, 1, 1).to(image_embeddings.dtype)
        return self.mask_decoder.image_context(image_embeddings, self.get_image_wide_positional_embeddings(), dense)

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
        mask_selection: str = "seed",
        **kwargs: Any,
    ) -> SamHQImageSegmentationOutput:
        """Predict low-resolution masks for B images x P prompts.

        input_points (B, P, N, 2) and input_labels (B, P, N) in the 1024-frame; input_boxes (B, P, 4);
        input_masks (B, 1 or P, 256, 256) logits. `mask_selection="official"` returns the single best
        multimask mask as `segment_anything_hq` does. Extra processor keys (`original_sizes`,
        `reshaped_input_sizes`) are accepted and ignored.
        """
        unknown = set(kwargs) - {"original_sizes", "reshaped_input_sizes", "return_dict", "output_attentions", "output_hidden_states"}
        if unknown:
            raise TypeError(f"SamHQModel.forward got unexpected arguments: {sorted(unknown)}")
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("pass exactly one of pixel_values and image_embeddings")
        _check_prompts(input_points, input_labels, input_boxes, input_masks, 4 * self.config.prompt_encoder_config.image_embedding_size)
        if pixel_values is not None:
            _check_pixels(pixel_values, self.config.vision_config.image_size)
            image_embeddings, intermediate_embeddings = self._encode(pixel_values)
        hq_features = self.compute_hq_features(image_embeddings, intermediate_embeddings)
        masks, iou = self.predict_all(image_embeddings, hq_features, input_points, input_labels, input_boxes, input_masks)
        pred_masks, scores = select_masks(masks, iou, multimask_output, hq_token_only, mask_selection)
        loss = None
        if labels is not None:
            from ..train.losses import segmentation_loss

            loss = segmentation_loss(pred_masks, labels)
        return SamHQImageSegmentationOutput(loss=loss, iou_scores=scores, pred_masks=pred_masks)


def _check_pixels(pixel_values: torch.Tensor, image_size: int) -> None:
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}; use SamHQProcessor")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (image_size, image_size):
        raise ValueError(
            f"pixel_values must have shape (B, 3, {image_size}, {image_size}), got {tuple(pixel_values.shape)}; "
            "SamHQProcessor resizes and pads images to that"
        )


def _check_prompts(points, labels, boxes, masks, mask_size: int) -> None:
    if points is not None:
        if points.ndim != 4 or points.shape[-1] != 2:
            raise ValueError(f"input_points must be (batch, point_batch, points, 2), got {tuple(points.shape)}")
        if labels is not None and tuple(labels.shape) != tuple(points.shape[:-1]):
            raise ValueError(f"input_labels shape {tuple(labels.shape)} does not match input_points {tuple(points.shape)}")
        if not torch.isfinite(points).all():
            raise ValueError("input_points contain NaN or infinite values")
    if boxes is not None:
        if boxes.ndim != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"input_boxes must be (batch, boxes, 4), got {tuple(boxes.shape)}")
        if not torch.isfinite(boxes).all():
            raise ValueError("input_boxes contain NaN or infinite values")
        if points is not None and (points.shape[0], points.shape[1]) != (boxes.shape[0], boxes.shape[1]):
            raise ValueError(
                f"points {tuple(points.shape)} and boxes {tuple(boxes.shape)} must agree on batch and prompt count"
            )
    if masks is not None and (masks.ndim not in (4, 5) or tuple(masks.shape[-2:]) != (mask_size, mask_size)):
        raise ValueError(f"input_masks must be (batch, 1 or prompts, {mask_size}, {mask_size}) logits, got {tuple(masks.shape)}")
