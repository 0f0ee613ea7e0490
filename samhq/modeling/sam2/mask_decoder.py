"""SAM 2's mask decoder with HQ-SAM 2's additions, and SAM 2's output selection.

SAM 2 (Ravi et al. 2024) keeps SAM's two-way transformer decoder and adds: an object-score token
and head (is the object present at all?), and high-resolution features from the image encoder's
stride-4 and stride-8 levels, added inside the 4x upscaling of the image embedding. HQ-SAM 2
(SysCV/sam-hq, `sam-hq2/sam2/modeling/sam/mask_hq_decoder.py`) adds SAM-HQ's HQ output token with
its own hypernetwork MLP and, instead of SAM-HQ v1's global-local fusion, a mask-feature
convolution (3x3 conv, LayerNorm2d, GELU, 3x3 conv) of the upscaled embedding; the HQ mask is the
HQ hypernetwork's output dotted with that feature map.

Token order inside the transformer: [object score (when pred_obj_scores), IoU, mask_0 (single),
mask_1..3 (multimask), HQ (when enabled), prompt tokens...]. (sam-hq2's code leaves the HQ token
out when pred_obj_scores is False, which no released config uses; here it always follows the mask
tokens.)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...config_sam2 import SamHQ2MaskDecoderConfig
from ..common import FeedForward, LayerNorm2d, add_image_features, kept_rows, nan_rows
from ..two_way_transformer import TwoWayTransformer


class Sam2MaskDecoder(nn.Module):
    def __init__(self, config: SamHQ2MaskDecoderConfig):
        super().__init__()
        c = config.hidden_size
        self.config = config
        self.num_mask_tokens = config.num_multimask_outputs + 1
        if config.pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, c)
        self.iou_token = nn.Embedding(1, c)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, c)
        self.transformer = TwoWayTransformer(config)
        self.upscale_conv1 = nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2)
        self.upscale_layer_norm = LayerNorm2d(c // 4)
        self.upscale_conv2 = nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2)
        if config.use_high_res_features:
            self.conv_s0 = nn.Conv2d(c, c // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(c, c // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(FeedForward(c, c, c // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = FeedForward(c, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth)
        if config.pred_obj_scores:
            self.pred_obj_score_head = FeedForward(c, c, 1, 3) if config.pred_obj_scores_mlp else nn.Linear(c, 1)
        # HQ-SAM 2 additions (official names: hf_token, hf_mlp, embedding_maskfeature.{0,1,3}).
        self.hq_token = nn.Embedding(1, c)
        self.hq_mask_mlp = FeedForward(c, c, c // 8, 3)
        self.mask_conv1 = nn.Conv2d(c // 8, c // 4, kernel_size=3, padding=1)
        self.mask_norm = LayerNorm2d(c // 4)
        self.mask_conv2 = nn.Conv2d(c // 4, c // 8, kernel_size=3, padding=1)

    def high_res_features(self, fpn_features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The neck's stride-4 and stride-8 levels (B, C, 4h, 4w), (B, C, 2h, 2w) -> (B, C/8, 4h, 4w), (B, C/4, 2h, 2w).

        Computed once per image (Meta's `SAM2Base.forward_image`).
        """
        return [self.conv_s0(fpn_features[0]), self.conv_s1(fpn_features[1])]

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        high_res_features: list[torch.Tensor] | None,
        hq: bool,
        return_tokens: bool = False,
        needed=None,
    ) -> tuple[torch.Tensor, ...]:
        """Every output token's mask logits for B images x P prompts.

        image_embeddings (B, C, h, w); image_pe (1, C, h, w); sparse (B, P, T, C); dense
        (B, 1 or P, C, h, w); high_res_features [(B, C/8, 4h, 4w), (B, C/4, 2h, 2w)] from
        `high_res_features` (None when the config does not use them); hq: add the HQ token.
        Returns mask logits (B, P, K, 4h, 4w) (K = 4 SAM masks, then the HQ mask when hq), IoU
        predictions (B, P, 4) (after a sigmoid when `iou_prediction_use_sigmoid`) and object-score
        logits (B, P, 1) (the constant 10 without an object-score head); with `return_tokens` also the SAM
        mask tokens after the transformer (B, P, 4, C), from which SAM 2's video model takes its object pointer.
        needed: None, or a function of the IoU predictions (B, P, 4) -> bool (B, P), the prompts whose masks are
        wanted; the others' masks are not computed and come back NaN (as SAM-HQ's `MaskDecoder.forward`).
        """
        cfg = self.config
        b, p = sparse.shape[:2]
        c, h, w = image_embeddings.shape[1:]

        # Output tokens, then the prompt tokens.
        tokens = ([self.obj_score_token.weight] if cfg.pred_obj_scores else []) + [self.iou_token.weight, self.mask_tokens.weight]
        if hq:
            tokens.append(self.hq_token.weight)
        out_tokens = torch.cat(tokens).to(sparse.dtype)
        tokens = torch.cat([out_tokens.expand(b, p, -1, -1), sparse], dim=2)

        # Two-way transformer over the image (plus the dense prompt) and the tokens.
        src = (image_embeddings[:, None] + dense).expand(b, p, c, h, w).reshape(b * p, c, h, w)
        hs, keys = self.transformer(src, image_pe.to(src.dtype), tokens.flatten(0, 1))  # (BP, T', C), (BP, hw, C)
        s = int(cfg.pred_obj_scores)
        iou = self.iou_prediction_head(hs[:, s]).view(b, p, -1)
        if cfg.iou_prediction_use_sigmoid:
            iou = iou.sigmoid()
        rows = kept_rows(needed, iou)
        out = hs if rows is None else hs[rows]  # the prompts whose masks are computed

        # Upscale the image tokens 4x, adding the high-resolution features on the way.
        src = keys.transpose(1, 2).reshape(b * p, c, h, w)
        x = self.upscale_conv1(src if rows is None else src[rows])  # (N, C/4, 2h, 2w)
        if high_res_features is not None:
            feat_s0, feat_s1 = high_res_features
            x = add_image_features(x, feat_s1, p, rows)
        x = self.upscale_conv2(F.gelu(self.upscale_layer_norm(x)))  # (N, C/8, 4h, 4w)
        if high_res_features is not None:
            x = add_image_features(x, feat_s0, p, rows)
        upscaled = F.gelu(x)

        # Each mask token's hypernetwork output dotted with the upscaled embedding.
        hyper = torch.stack([mlp(out[:, s + 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = hyper @ upscaled.flatten(2)  # (N, 4, 16hw)
        if hq:
            # HQ-SAM 2: the HQ token's hypernetwork output dotted with the mask features of the upscaled embedding.
            features = self.mask_conv2(F.gelu(self.mask_norm(self.mask_conv1(upscaled))))
            hq_hyper = self.hq_mask_mlp(out[:, s + 1 + self.num_mask_tokens])[:, None]  # (N, 1, C/8)
            masks = torch.cat([masks, hq_hyper @ features.flatten(2)], dim=1)
        masks = nan_rows(masks, rows, b * p)

        if cfg.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 0]).view(b, p, -1)
        else:
            object_score_logits = iou.new_full((b, p, 1), 10.0)
        if return_tokens:
            mask_tokens_out = hs[:, s + 1:s + 1 + self.num_mask_tokens].unflatten(0, (b, p))
            return masks.view(b, p, -1, 4 * h, 4 * w), iou, object_score_logits, mask_tokens_out
        return masks.view(b, p, -1, 4 * h, 4 * w), iou, object_score_logits
