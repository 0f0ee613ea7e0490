"""`SamHQ2Model`: SAM 2.1 and HQ-SAM 2 for images, and `load_sam2_model`.

The image path of Meta's `SAM2Base` + `SAM2ImagePredictor` (and of SysCV's `SAM2HQBase` + its
predictor): Hiera + FPN neck, `no_memory_embedding` added to the image embedding, the SAM 2
prompt encoder and the (HQ) mask decoder. Parameter names are transformers' `Sam2Model` names
where the modules are SAM 2's own, so the video modules (memory encoder, memory attention, object
pointers; transformers' `Sam2VideoModel` names) can join the same model later.
`hq_enabled` is False for plain SAM 2 / 2.1 weights, as `SamHQModel` for plain SAM.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ... import checkpoints_sam2 as ckpt
from ...checkpoints import CheckpointError, check_tensors, is_hq_parameter
from ...config_sam2 import SamHQ2Config
from ...dtypes import resolve_dtype
from .. import low_memory as low_memory_weights
from ..common import set_fast_path
from ..losses import segmentation_loss
from ..mask_selection import select_masks
from ..model import ModelOutput
from ..pretrained import load_weights
from ..prompt_encoder import PositionalEmbedding, check_prompts
from .hiera import Sam2VisionEncoder
from .mask_decoder import Sam2MaskDecoder
from .memory import add_video_modules
from .prompt_encoder import Sam2PromptEncoder

# SAM 2's pixel normalisation (Meta's SAM2Transforms): RGB in [0, 1], then ImageNet mean and std.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


@dataclass
class SamHQ2ImageSegmentationOutput(ModelOutput):
    """iou_scores (B, P, M'), pred_masks (B, P, M, 4h, 4w) low-resolution logits (256 x 256 at 1024 px),
    object_score_logits (B, P, 1) (> 0: the object is predicted present); loss when labels are given."""

    loss: torch.Tensor | None = None
    iou_scores: torch.Tensor | None = None
    pred_masks: torch.Tensor | None = None
    object_score_logits: torch.Tensor | None = None


class SamHQ2Model(nn.Module):
    """SAM 2.1 / HQ-SAM 2 image model: image encoder, prompt encoder, (HQ) mask decoder.

    Frames: pixel_values are the image resized (without keeping the aspect ratio) to
    `config.image_size` squared, to [0, 1], normalised with `PIXEL_MEAN` / `PIXEL_STD`. Points and
    boxes are (x, y) pixels in that resized frame; mask inputs and outputs are logits at 4x the
    embedding grid (256 x 256 at 1024 px) covering the whole resized image.
    """

    def __init__(self, config: SamHQ2Config | None = None):
        super().__init__()
        config = config or SamHQ2Config()
        self.config = config
        self.vision_encoder = Sam2VisionEncoder(config.vision_config)
        self.shared_image_embedding = PositionalEmbedding(config.prompt_encoder_config.num_pos_feats)
        self.prompt_encoder = Sam2PromptEncoder(config.prompt_encoder_config, self.shared_image_embedding)
        self.mask_decoder = Sam2MaskDecoder(config.mask_decoder_config)
        # Added to the image embedding when there is no memory (every image), Meta's `no_mem_embed`.
        self.no_memory_embedding = nn.Parameter(torch.zeros(1, 1, config.vision_config.d_model))
        if config.video_config is not None:  # memory encoder, memory attention, object pointers; run by samhq.video
            add_video_modules(self, config.video_config, config.vision_config.d_model, config.mask_decoder_config.pred_obj_scores)
        self.hq_enabled = True
        # Video-module tensors of a loaded checkpoint, under the names of `video_layout` ("official" or
        # "transformers"), kept for the video model and for writing that layout back; not parameters.
        self.video_state: dict[str, torch.Tensor] = {}
        self.video_layout = "official"

    def set_fast_path(self, enabled: bool | str = True):
        """Set the fast-path switch of the modules shared with SAM-HQ v1 (`samhq.modeling.fast_paths`; off by default
        here): True, False or "graph" (`SamHQModel.set_fast_path`). Returns the model."""
        set_fast_path(self, enabled)
        return self

    @property
    def has_video(self) -> bool:
        """Whether the model has SAM 2's video modules (built from a checkpoint that has them, or `config.video_config`)."""
        return self.config.video_config is not None

    @property
    def no_mem_embed(self) -> nn.Parameter:
        """Meta's name for `no_memory_embedding`, (1, 1, C)."""
        return self.no_memory_embedding

    @property
    def device(self) -> torch.device:
        return self.no_memory_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        """The prompt encoder's and mask decoder's dtype: image embeddings are given to them in it."""
        return self.mask_decoder.iou_token.weight.dtype

    @property
    def encoder_dtype(self) -> torch.dtype:
        """The image encoder's dtype (bfloat16 after `from_pretrained(..., dtype=torch.bfloat16)`)."""
        return self.vision_encoder.backbone.pos_embed.dtype

    @property
    def mask_size(self) -> int:
        """Side of the low-resolution mask logits (256 for the released models)."""
        return 4 * self.config.prompt_encoder_config.image_embedding_size

    def get_image_wide_positional_embeddings(self) -> torch.Tensor:
        """(1, C, h, w) positional encoding of the image-embedding grid (the prompt encoder's `get_dense_pe`)."""
        return self.shared_image_embedding.grid(self.config.prompt_encoder_config.image_embedding_size)

    @torch.no_grad()
    def get_image_embeddings(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embed images once; decode any number of prompts with `predict_all` afterwards.

        pixel_values (B, 3, S, S) normalised as SAM 2 does (see the class docstring), S =
        config.image_size (1024). Returns the image embeddings (B, C, S/16, S/16) with
        `no_memory_embedding` added (as SAM2ImagePredictor does) and the high-resolution features
        [(B, C/8, S/4, S/4), (B, C/4, S/8, S/8)] after `conv_s0` / `conv_s1` ([] when the config
        does not use them); C = 256: (B, 256, 64, 64), [(B, 32, 256, 256), (B, 64, 128, 128)].
        Raises ValueError for a wrong pixel_values shape.
        """
        _check_pixels(pixel_values, self.config.image_size)
        return self.embeddings_from_features(self.encode(pixel_values))

    def encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The image encoder alone (Hiera + FPN neck), with autograd when enabled: pixel_values (B, 3, S, S) ->
        the neck's levels [(B, C, S/4, S/4), (B, C, S/8, S/8), (B, C, S/16, S/16)] in the decoder's dtype."""
        features, _ = self.vision_encoder(pixel_values.to(self.encoder_dtype))
        return [f.to(self.dtype) for f in features]

    def embeddings_from_features(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`encode`'s levels -> the image embeddings (B, C, h, w) with `no_memory_embedding` added and the
        high-resolution features after `conv_s0` / `conv_s1` ([] without them), with autograd when enabled."""
        embeddings = features[-1] + self.no_memory_embedding.view(1, -1, 1, 1)
        high_res = self.mask_decoder.high_res_features(features) if self.config.mask_decoder_config.use_high_res_features else []
        return embeddings, high_res

    # The engine interface (samhq.engines.TorchEngine): what a front end needs from a model family.
    saved_features = ("features", "high_res_s0", "high_res_s1")
    # parameters outside the image encoder that the saved features depend on (`model_fingerprint`)
    embedding_parameters = ("mask_decoder.conv_s0.", "mask_decoder.conv_s1.", "no_memory_embedding")

    @torch.no_grad()
    def embed_image(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-image features: "features" (B, 256, h, w) and the high-resolution "high_res_s0" / "high_res_s1"."""
        emb, high_res = self.get_image_embeddings(pixel_values)
        return {"features": emb, **{f"high_res_s{i}": t for i, t in enumerate(high_res)}}

    def prepare_features(self, features: dict) -> dict:
        return features  # nothing is derived per image

    def decode_features(self, features: dict, input_points=None, input_labels=None, input_boxes=None, input_masks=None,
                        needed=None, mask_extent=None):
        """`predict_all` on `embed_image`'s dict: every token's masks (B, P, K, 4h, 4w) and IoU (B, P, 4).
        mask_extent is accepted for the engines' common call and not used: SAM 2 resizes without padding, so every
        pixel of its masks is read."""
        high_res = [features[k] for k in ("high_res_s0", "high_res_s1") if k in features]
        masks, iou, _ = self.predict_all(features["features"], high_res, input_points, input_labels, input_boxes, input_masks,
                                         needed)
        return masks, iou

    def get_prompt_embeddings(self, input_points=None, input_labels=None, input_boxes=None, input_masks=None):
        """Sparse (B, P, T, C) and dense (B, 1 or P, C, h, w) prompt embeddings (see `Sam2PromptEncoder.forward`)."""
        if input_points is not None and input_labels is None:
            input_labels = torch.ones(input_points.shape[:-1], dtype=torch.int, device=input_points.device)
        return self.prompt_encoder(input_points, input_labels, input_boxes, input_masks)

    def predict_all(
        self,
        image_embeddings: torch.Tensor,
        high_res_features: list[torch.Tensor] | None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        input_masks: torch.Tensor | None = None,
        needed=None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every output token's low-resolution mask logits for B images x P prompts.

        image_embeddings (B or 1, C, h, w) and high_res_features from `get_image_embeddings`;
        input_points (B, P, N, 2) (x, y) in the S-pixel input frame with input_labels (B, P, N)
        (1 foreground, 0 background, -1 not a point, -10 padding; all 1 when omitted); input_boxes
        (B, P, 4) x0, y0, x1, y1 in the same frame; input_masks (B, 1 or P, 4h, 4w) logits.
        Returns mask logits (B, P, K, 4h, 4w) (K = 4 SAM tokens, + 1 HQ when `hq_enabled`), IoU
        predictions (B, P, 4) and object-score logits (B, P, 1). `select_masks` picks the outputs.
        needed: a function of the IoU predictions (B, P, 4) -> bool (B, P); the masks of the prompts it rejects are
        NaN, not computed (`Sam2MaskDecoder.forward`).
        """
        sparse, dense = self.get_prompt_embeddings(input_points, input_labels, input_boxes, input_masks)
        b = sparse.shape[0]
        high_res = list(high_res_features) if high_res_features else None
        if image_embeddings.shape[0] != b:
            if image_embeddings.shape[0] != 1:
                raise ValueError(f"prompts are given for {b} images but there are {image_embeddings.shape[0]} image embeddings")
            image_embeddings = image_embeddings.expand(b, -1, -1, -1)
            high_res = [f.expand(b, -1, -1, -1) for f in high_res] if high_res else None
        if self.config.mask_decoder_config.use_high_res_features and not high_res:
            raise ValueError("this model needs high_res_features with image_embeddings: pass both, as returned by "
                             "model.get_image_embeddings(pixel_values)")
        return self.mask_decoder(image_embeddings, self.get_image_wide_positional_embeddings(), sparse, dense,
                                 high_res, self.hq_enabled, needed=needed)

    @property
    def stability(self) -> tuple[float, float] | None:
        """SAM 2's dynamic multimask setting for `select_masks`: (delta, threshold), None when off (and in
        training mode, as in SAM 2)."""
        cfg = self.config.mask_decoder_config
        if not cfg.dynamic_multimask_via_stability or self.training:
            return None
        return cfg.dynamic_multimask_stability_delta, cfg.dynamic_multimask_stability_thresh

    def select_masks(self, masks: torch.Tensor, iou: torch.Tensor, multimask_output: bool, hq_token_only: bool = False,
                     selection: str = "token_order") -> tuple[torch.Tensor, torch.Tensor]:
        """`samhq.modeling.mask_selection.select_masks` with this model's dynamic multimask setting."""
        return select_masks(masks, iou, multimask_output, hq_token_only, selection, stability=self.stability)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        input_masks: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        high_res_features: list[torch.Tensor] | None = None,
        multimask_output: bool = True,
        hq_token_only: bool = False,
        mask_selection: str = "token_order",
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SamHQ2ImageSegmentationOutput:
        """Low-resolution masks for B images x P prompts (transformers' `Sam2Model` outputs, + HQ).

        Pass pixel_values (B, 3, S, S), or image_embeddings with high_res_features from
        `get_image_embeddings`; prompts as in `predict_all`. multimask_output / hq_token_only /
        mask_selection ("token_order", "sorted", "best") as in `select_masks`. labels: ground-truth
        masks in the S x S input frame (B, [P,] S', S') at any resolution S' (the image's masks resized
        as the image is, without keeping the aspect ratio); the loss is BCE + dice of the best returned
        mask (`samhq.modeling.losses.segmentation_loss`, as `SamHQModel`), with autograd through
        the image encoder too when pixel_values are given and grad is enabled. Extra processor keys
        (`original_sizes`, `reshaped_input_sizes`) are accepted and ignored. Raises ValueError for
        malformed inputs.
        """
        ignored = {"original_sizes", "reshaped_input_sizes", "return_dict", "output_attentions", "output_hidden_states"}
        unknown = set(kwargs) - ignored
        if unknown:
            raise TypeError(f"SamHQ2Model.forward got unexpected arguments: {sorted(unknown)}")
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("pass exactly one of pixel_values and image_embeddings")
        mask_size = 4 * self.config.prompt_encoder_config.image_embedding_size
        check_prompts(input_points, input_labels, input_boxes, input_masks, mask_size)
        if labels is not None and labels.shape[-1] != labels.shape[-2]:
            raise ValueError(f"labels of shape {tuple(labels.shape)} are not in the model's square input frame: resize the "
                             "masks to a square as the image is (SAM 2 does not keep the aspect ratio)")
        if pixel_values is not None:
            _check_pixels(pixel_values, self.config.image_size)
            image_embeddings, high_res_features = self.embeddings_from_features(self.encode(pixel_values))
        masks, iou, object_scores = self.predict_all(image_embeddings, high_res_features, input_points, input_labels,
                                                     input_boxes, input_masks)
        pred_masks, scores = self.select_masks(masks, iou, multimask_output, hq_token_only, mask_selection)
        loss = segmentation_loss(pred_masks, labels) if labels is not None else None
        return SamHQ2ImageSegmentationOutput(loss=loss, iou_scores=scores, pred_masks=pred_masks,
                                             object_score_logits=object_scores)

    def hq_parameter_names(self) -> list[str]:
        """Names of the parameters HQ-SAM 2 adds to SAM 2 (what its HQ-only recipe trains; `is_hq_parameter`)."""
        return [n for n, _ in self.named_parameters() if is_hq_parameter(n)]

    # -- checkpoints -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source, device=None, dtype=None, config: SamHQ2Config | None = None,
                        low_memory: bool = False) -> "SamHQ2Model":
        """`load_sam2_model(source, device, dtype, config, low_memory)`."""
        return load_sam2_model(source, device=device, dtype=dtype, config=config, low_memory=low_memory)

    def _state_to_save(self) -> dict[str, torch.Tensor]:
        state = {k: v for k, v in self.state_dict().items() if not ckpt.is_our_video_key(k)}
        if not self.hq_enabled:  # plain SAM 2 stays plain SAM 2 when reloaded
            state = {k: v for k, v in state.items() if not ckpt.is_hq_parameter(k)}
        return state

    def _video_state(self, layout: str) -> dict[str, torch.Tensor]:
        if self.has_video:
            return ckpt.video_from_ours({k: v for k, v in self.state_dict().items() if ckpt.is_our_video_key(k)}, layout)
        if self.video_state and self.video_layout != layout:
            warnings.warn(f"the {len(self.video_state)} video-module tensors came in the {self.video_layout} layout and are "
                          f"not written to the {layout} one (renaming them is the video model's job)", stacklevel=3)
            return {}
        return self.video_state

    def save_pretrained(self, directory, overwrite: bool = True):
        """Write transformers' `Sam2Model` layout (config.json + model.safetensors); see `checkpoints_sam2.write_transformers`.

        Video tensors loaded from a transformers-layout checkpoint are written back; official-layout ones are not.
        """
        return ckpt.write_transformers(self._state_to_save(), self.config, directory, overwrite=overwrite,
                                       video_state=self._video_state("transformers"))

    def save_official(self, path, overwrite: bool = False):
        """Write Meta's / sam-hq2's `.pt` format, with the video tensors of an official checkpoint the model was loaded from."""
        return ckpt.write_official(self._state_to_save(), path, self._video_state("official"), overwrite=overwrite)


def load_sam2_model(source, device=None, dtype=None, config: SamHQ2Config | None = None,
                    low_memory: bool = False) -> SamHQ2Model:
    """Build and load a SAM 2 / SAM 2.1 / HQ-SAM 2 image model.

    source: an official `.pt` (Meta's `sam2.1_hiera_*.pt` / `sam2_hiera_*.pt`, SysCV's
    `sam2.1_hq_hiera_large.pt`), a `.safetensors` file, a transformers-layout directory, or a
    hub id (downloaded through huggingface_hub). The variant is detected from the tensors unless
    `config` is given or a config.json says it; checkpoints without HQ tensors give
    `hq_enabled=False`. A checkpoint with the video modules' tensors (Meta's and SysCV's releases, the
    hub's Sam2VideoModel files) gives a model with those modules (`has_video`, `config.video_config`);
    an incomplete set of them is kept aside in `model.video_state` (under the names of
    `model.video_layout`) with a warning. dtype (a torch dtype or a name `samhq.dtypes.resolve_dtype` takes,
    e.g. "auto", "bfloat16") applies to the image encoder; the prompt encoder and decoder stay fp32.
    low_memory: the image encoder's weights stay in the memory-mapped file, their pages handed back after each
    use (`samhq.modeling.low_memory`; CPU, float32, Linux; ValueError otherwise). Raises CheckpointError for
    unreadable or mismatched files.
    """
    dtype = resolve_dtype(dtype, device)
    if low_memory:
        low_memory_weights.check_supported(device, dtype)
    read = ckpt.read_checkpoint(source)
    config = config or read.config or ckpt.infer_config(read.state, str(read.path))
    state, kept_aside = dict(read.state), read.video_state
    if config.video_config is not None and not read.video_state:  # e.g. a Sam2VideoModel config.json over image weights
        config = SamHQ2Config.from_dict({**config.to_dict(), "video_config": None})
    if read.video_state:
        video = ckpt.video_to_ours(read.video_state, read.layout)
        if config.video_config is None:
            try:
                video_config = ckpt.infer_video_config(video, str(read.path))
                config = SamHQ2Config.from_dict({**config.to_dict(), "video_config": video_config})
            except CheckpointError as e:
                warnings.warn(f"{e}; the model is image-only and keeps them aside", stacklevel=2)
        if config.video_config is not None:
            state.update(video)
            kept_aside = {}
    with torch.device("meta"):
        model = SamHQ2Model(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    has_hq = ckpt.check_state(state, expected, str(read.path), config.variant or "custom")
    mapped = low_memory_weights.map_state(state, read.path, "vision_encoder." if low_memory else None)
    # no integer or NaN weights (as SAM-HQ v1's loader); a mapped tensor's pages go back once read
    check_tensors(state, str(read.path), after_each=(lambda t: mapped.release([t])) if mapped else None)
    model.to_empty(device="cpu")
    if not has_hq:
        state.update({k: torch.zeros(s) for k, s in expected.items() if ckpt.is_hq_parameter(k)})
    load_weights(model, state, mapped, low_memory)
    model.hq_enabled = has_hq
    model.video_state, model.video_layout = kept_aside, read.layout
    model = model.eval().to(device=device or "cpu", dtype=torch.float32)
    if dtype is not None and dtype != torch.float32:
        model.vision_encoder.to(dtype)
    return model


def _check_pixels(pixel_values: torch.Tensor, image_size: int) -> None:
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (image_size, image_size):
        raise ValueError(
            f"pixel_values must have shape (B, 3, {image_size}, {image_size}), got {tuple(pixel_values.shape)}; SAM 2 resizes "
            "images to that square (aspect ratio not kept) and normalises them with ImageNet mean/std"
        )
