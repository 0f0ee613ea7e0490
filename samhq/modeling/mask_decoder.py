"""SAM-HQ mask decoder: SAM's decoder plus the HQ output token and global-local feature fusion.

Token order inside the decoder: [IoU, mask_0 (single), mask_1..3 (multimask), HQ].
"""
import torch
from torch import nn
from torch.nn import functional as F

from ..config import SamHQMaskDecoderConfig
from .common import FeedForward, LayerNorm2d
from .two_way_transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
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

    def hq_features(self, image_embeddings: torch.Tensor, early_features: torch.Tensor) -> torch.Tensor:
        """Global-local fusion, once per image.

        image_embeddings (B, C, h, w), early_features (B, h, w, Cv) -> (B, C/8, 4h, 4w).
        """
        glob = self.encoder_conv2(F.gelu(self.encoder_norm(self.encoder_conv1(image_embeddings))))
        local = early_features.permute(0, 3, 1, 2).to(image_embeddings.dtype)
        local = self.compress_vit_conv2(F.gelu(self.compress_vit_norm(self.compress_vit_conv1(local))))
        return glob + local

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        hq_features: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks from every output token.

        image_embeddings (B, C, h, w), image_pe (1, C, h, w), sparse (B, P, T, C), dense (B, 1 or P, C, h, w),
        hq_features (B, C/8, 4h, 4w) or None for plain SAM.
        Returns mask logits (B, P, K, 4h, 4w), K = 5 with the HQ mask last (4 without), and IoU predictions (B, P, 4).
        """
        b, p = sparse.shape[:2]
        c, h, w = image_embeddings.shape[1:]
        tokens = [self.iou_token.weight, self.mask_tokens.weight]
        if hq_features is not None:
            tokens.append(self.hq_token.weight)
        out_tokens = torch.cat(tokens).to(sparse.dtype)
        tokens = torch.cat([out_tokens.expand(b, p, -1, -1), sparse], dim=2).flatten(0, 1)
        src = (image_embeddings[:, None] + dense).expand(b, p, c, h, w).reshape(b * p, c, h, w)
        pos = image_pe.to(src.dtype).expand(b * p, -1, -1, -1)
        hs, keys = self.transformer(src, pos, tokens)

        src = keys.transpose(1, 2).reshape(b * p, c, h, w)
        up = F.gelu(self.upscale_layer_norm(self.upscale_conv1(src)))
        up = F.gelu(self.upscale_conv2(up))  # (BP, C/8, 4h, 4w)
        n = self.num_mask_tokens
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = hyper @ up.flatten(2)  # (BP, 4, 16hw)
        if hq_features is not None:
            up_hq = self.mask_conv2(F.gelu(self.mask_norm(self.mask_conv1(up))))
            up_hq = (up_hq.view(b, p, *up_hq.shape[1:]) + hq_features[:, None].to(up_hq.dtype)).flatten(0, 1)
            hq = self.hq_mask_mlp(hs[:, 1 + n])[:, None] @ up_hq.flatten(2)
            masks = torch.cat([masks, hq], dim=1)
        iou = self.iou_prediction_head(hs[:, 0])
        return masks.view(b, p, -1, *up.shape[2:]), iou.view(b, p, -1)


def select_masks(
    masks: torch.Tensor, iou: torch.Tensor, multimask_output: bool, hq_token_only: bool, mode: str = "seed"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the returned masks from all tokens' masks, as one of the references does.

    masks (B, P, K, H, W) from `MaskDecoder.forward`, iou (B, P, 4).
    mode "seed" (transformers): multimask -> the 3 multimask masks sorted by predicted IoU.
    mode "official" (segment_anything_hq): multimask -> only the best of the 3.
    Either way the HQ mask is added to each SAM mask, or returned alone with `hq_token_only`.
    Without an HQ mask (plain SAM weights) both modes return SAM's masks unsorted, as SAM does.
    Returns masks (B, P, M, H, W) and scores (B, P, M).
    """
    if mode not in ("seed", "official"):
        raise ValueError(f"mode must be 'seed' or 'official', got {mode!r}")
    has_hq = masks.shape[2] == iou.shape[2] + 1
    if not has_hq:  # plain SAM: all multimask masks in token order, as segment_anything returns them
        if hq_token_only:
            raise ValueError("hq_token_only=True needs the HQ token, but this model was loaded without HQ weights")
        pick = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, :, pick], iou[:, :, pick]
    if multimask_output:
        scores = iou[:, :, 1:]
        if mode == "seed":
            scores, order = scores.sort(dim=2, descending=True)
        else:
            scores, order = scores.max(dim=2, keepdim=True)
        index = (order + 1)[..., None, None].expand(-1, -1, -1, *masks.shape[-2:])
        sam = masks.gather(2, index)
    else:
        scores, sam = iou[:, :, :1], masks[:, :, :1]
    hq = masks[:, :, -1:]
    if hq_token_only:
        return hq, scores  # as both references: the SAM tokens' scores are kept
    return sam + hq, scores
