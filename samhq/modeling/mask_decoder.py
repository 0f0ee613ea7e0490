"""SAM-HQ mask decoder: SAM's decoder plus the HQ output token and global-local feature fusion
(Ke et al. 2023, section 3.2; official `MaskDecoderHQ`).

Token order inside the decoder: [IoU, mask_0 (single), mask_1..3 (multimask), HQ]. Which of the
resulting masks a caller gets is `mask_selection.select_masks`'s business.
"""
import torch
from torch import nn

from ..checkpoints import HQ_MODULES, is_hq_parameter  # noqa: F401 - the HQ parameter list, defined once
from ..config import SamHQMaskDecoderConfig
from . import fast_paths
from .common import FastPathModule, FeedForward, LayerNorm2d, add_image_features, gelu, kept_rows, nan_rows
from .two_way_transformer import TwoWayTransformer


class MaskDecoder(FastPathModule):
    def __init__(self, config: SamHQMaskDecoderConfig):
        super().__init__()
        c = config.hidden_size
        self.config = config
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, c)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, c)
        self.transformer = TwoWayTransformer(config)
        self.upscale_conv1 = nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2)
        self.upscale_layer_norm = LayerNorm2d(c // 4)
        self.upscale_conv2 = nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2)
        self.output_hypernetworks_mlps = nn.ModuleList(FeedForward(c, c, c // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = FeedForward(c, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth)
        # HQ-SAM additions.
        self.hq_token = nn.Embedding(1, c)
        self.hq_mask_mlp = FeedForward(c, c, c // 8, 3)
        self.compress_vit_conv1 = nn.ConvTranspose2d(config.vit_dim, c, kernel_size=2, stride=2)
        self.compress_vit_norm = LayerNorm2d(c)
        self.compress_vit_conv2 = nn.ConvTranspose2d(c, c // 8, kernel_size=2, stride=2)
        self.encoder_conv1 = nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2)
        self.encoder_norm = LayerNorm2d(c // 4)
        self.encoder_conv2 = nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2)
        self.mask_conv1 = nn.Conv2d(c // 8, c // 4, kernel_size=3, padding=1)
        self.mask_norm = LayerNorm2d(c // 4)
        self.mask_conv2 = nn.Conv2d(c // 4, c // 8, kernel_size=3, padding=1)

    def use_fast_path_on(self, image_embeddings: torch.Tensor) -> bool:
        """Whether `forward` takes `fast_paths.decode_masks` for embeddings on this device. Its prompt chunks and row
        bands are sized for a CPU's caches; on a GPU they would only add kernel launches, so there the plain form runs,
        one batched pass over every prompt (2.5x to 7x faster on an H200, benchmarks/results-cuda.md)."""
        return self.use_fast_path and image_embeddings.device.type == "cpu"

    def hq_features(self, image_embeddings: torch.Tensor, early_features: torch.Tensor) -> torch.Tensor:
        """Global-local fusion, once per image: the image embedding (global context) and the first
        global-attention layer's features (local detail) upscaled 4x and added.

        image_embeddings (B, C, h, w), early_features (B, h, w, Cv) -> (B, C/8, 4h, 4w).
        """
        fast = self.use_fast_path
        glob = self.encoder_conv2(gelu(self.encoder_norm(self.encoder_conv1(image_embeddings)), fast))
        local = early_features.permute(0, 3, 1, 2).to(image_embeddings.dtype)
        local = self.compress_vit_conv2(gelu(self.compress_vit_norm(self.compress_vit_conv1(local)), fast))
        return glob + local

    def output_tokens(self, with_hq: bool) -> torch.Tensor:
        """The learned output tokens (K, C): IoU, the 4 mask tokens and, for SAM-HQ, the HQ token."""
        tokens = [self.iou_token.weight, self.mask_tokens.weight] + ([self.hq_token.weight] if with_hq else [])
        return torch.cat(tokens)

    def upscale(self, x: torch.Tensor) -> torch.Tensor:
        """SAM's output upscaling: (N, C, h, w) -> (N, C/8, 4h, 4w) (2x2 deconv, LayerNorm2d, GELU, 2x2 deconv, GELU)."""
        x = gelu(self.upscale_layer_norm(self.upscale_conv1(x)))
        return gelu(self.upscale_conv2(x))

    def mask_feature(self, upscaled: torch.Tensor) -> torch.Tensor:
        """SAM-HQ's refinement of the upscaled SAM features: (N, C/8, 4h, 4w) -> same (3x3 conv, LayerNorm2d, GELU, 3x3 conv)."""
        return self.mask_conv2(self.mask_feature_hidden(upscaled))

    def mask_feature_hidden(self, upscaled: torch.Tensor) -> torch.Tensor:
        """`mask_feature` up to its last convolution: (N, C/8, 4h, 4w) -> (N, C/4, 4h, 4w)."""
        return gelu(self.mask_norm(self.mask_conv1(upscaled)))

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        hq_features: torch.Tensor | None,
        context: dict | None = None,
        needed=None,
        mask_extent: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks from every output token.

        image_embeddings (B, C, h, w), image_pe (1, C, h, w), sparse (B, P, T, C) prompt tokens, dense
        (B, 1 or P, C, h, w), hq_features (B, C/8, 4h, 4w) or None for plain SAM. context: the fast
        path's per-image work (`fast_paths.image_context`), used when given to the fast path.
        needed: None, or a function of the IoU predictions (B, P, 4) -> bool (B, P), the prompts whose masks are
        wanted; the others' masks are not computed and come back NaN (an automatic generator's IoU filter
        would drop them anyway: the transformer and IoU head are a fraction of a prompt's cost on a CPU).
        mask_extent: None, or (rows, columns): how many leading rows and columns of each 4h x 4w mask are wanted; the
        fast path leaves the rest NaN, not computed (what `processing.low_res_read` says the upscaling of a padded
        image never reads).
        Returns mask logits (B, P, K, 4h, 4w), K = 5 with the HQ mask last (4 without), and IoU predictions (B, P, 4).
        """
        if self.use_fast_path_on(image_embeddings):
            return fast_paths.decode_masks(self, image_embeddings, image_pe, sparse, dense, hq_features, context, needed,
                                           mask_extent)
        b, p = sparse.shape[:2]
        c, h, w = image_embeddings.shape[1:]
        # The output tokens, then the prompt's tokens, for each of the B x P prompts.
        tokens = torch.cat([self.output_tokens(hq_features is not None).to(sparse.dtype).expand(b, p, -1, -1), sparse], dim=2)
        tokens = tokens.flatten(0, 1)  # (BP, T', C)
        # Each prompt's copy of its image, plus its dense (mask) prompt embedding.
        src = (image_embeddings[:, None] + dense).expand(b, p, c, h, w).reshape(b * p, c, h, w)
        hs, src = self.transformer(src, image_pe.to(src.dtype), tokens)
        iou = self.iou_prediction_head(hs[:, 0]).view(b, p, -1)
        rows = kept_rows(needed, iou)
        if rows is not None:
            hs, src = hs[rows], src[rows]

        # SAM: each mask token's hypernetwork output is dotted with the upscaled image features.
        upscaled = self.upscale(src.transpose(1, 2).reshape(-1, c, h, w))  # (BP, C/8, 4h, 4w)
        n = self.num_mask_tokens
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = hyper @ upscaled.flatten(2)  # (BP, 4, 16hw)
        if hq_features is not None:
            # HQ: the HQ token's hypernetwork reads the refined SAM features plus the fused global-local features.
            hyper_hq = self.hq_mask_mlp(hs[:, 1 + n])  # (BP, C/8)
            if self.use_graph_forms and rows is None:
                hq = fast_paths.hq_mask_graph(self, upscaled, hyper_hq, hq_features, p)
            else:
                hq_feat = add_image_features(self.mask_feature(upscaled), hq_features.to(upscaled.dtype), p, rows)
                hq = hyper_hq[:, None] @ hq_feat.flatten(2)  # (BP, 1, 16hw)
            masks = torch.cat([masks, hq], dim=1)
        return nan_rows(masks, rows, b * p).view(b, p, -1, 4 * h, 4 * w), iou
