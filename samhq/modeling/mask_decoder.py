"""SAM-HQ mask decoder: SAM's decoder plus the HQ output token and global-local feature fusion.

Token order inside the decoder: [IoU, mask_0 (single), mask_1..3 (multimask), HQ].
"""
import torch
from torch import nn
from torch.nn import functional as F

from ..config import SamHQMaskDecoderConfig
from .common import FeedForward, LayerNorm2d, gelu
from .two_way_transformer import TwoWayTransformer

# Prompts per pass through the decoder's transformer (see MaskDecoder.forward).
DECODE_CHUNK = 8
# Pixels per band of rows in the HQ branch's full-resolution convolution (see MaskDecoder._masks).
HQ_BAND_PIXELS = 16384


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
        glob = self.encoder_conv2(gelu(self.encoder_norm(self.encoder_conv1(image_embeddings))))
        local = early_features.permute(0, 3, 1, 2).to(image_embeddings.dtype)
        local = self.compress_vit_conv2(gelu(self.compress_vit_norm(self.compress_vit_conv1(local))))
        return glob + local

    def image_context(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor) -> dict:
        """The decoder's per-image work for prompts without a mask input (dense (B, 1, C, h, w) shared by all)."""
        return self.transformer.image_context(image_embeddings[:, None] + dense, image_pe.to(image_embeddings.dtype))

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        hq_features: torch.Tensor | None,
        context: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks from every output token.

        image_embeddings (B, C, h, w), image_pe (1, C, h, w), sparse (B, P, T, C), dense (B, 1 or P, C, h, w),
        hq_features (B, C/8, 4h, 4w) or None for plain SAM. context: `image_context(image_embeddings,
        image_pe, dense)`, kept from an earlier call with the same image and no mask input.
        Returns mask logits (B, P, K, 4h, 4w), K = 5 with the HQ mask last (4 without), and IoU predictions (B, P, 4).
        """
        b, p = sparse.shape[:2]
        c, h, w = image_embeddings.shape[1:]
        # Many prompts make large tensors (C x hw and C/4 x 16hw per prompt); decoded a few at a time
        # they stay in cache. A traced (ONNX) graph keeps one pass so the prompt count stays dynamic.
        if p > DECODE_CHUNK and not torch.jit.is_tracing():
            parts = [self(image_embeddings, image_pe, sparse[:, i:i + DECODE_CHUNK],
                          dense[:, i:i + DECODE_CHUNK] if dense.shape[1] > 1 else dense, hq_features, context)
                     for i in range(0, p, DECODE_CHUNK)]
            return torch.cat([m for m, _ in parts], dim=1), torch.cat([q for _, q in parts], dim=1)
        tokens = [self.iou_token.weight, self.mask_tokens.weight]
        if hq_features is not None:
            tokens.append(self.hq_token.weight)
        out_tokens = torch.cat(tokens).to(sparse.dtype)
        tokens = torch.cat([out_tokens.expand(b, p, -1, -1), sparse], dim=2)
        if context is None:
            src = image_embeddings[:, None] + dense  # (B, 1 or P, C, h, w): shared by the prompts without a mask input
            hs, keys = self.transformer(src, image_pe.to(src.dtype), tokens)
        else:
            hs, keys = self.transformer(None, None, tokens, context)
        hs, keys = hs.flatten(0, 1), keys.expand(b, p, -1, -1).reshape(b * p, h, w, c)

        n = self.num_mask_tokens
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        hyper_hq = self.hq_mask_mlp(hs[:, 1 + n]) if hq_features is not None else None
        if torch.jit.is_tracing():
            masks = self._masks(keys, hyper, hyper_hq)  # (BP, K, 16hw)
        else:  # one prompt at a time: its C/4 x 16hw fusion tensors stay in cache
            masks = torch.cat([self._masks(keys[i:i + 1], hyper[i:i + 1], None if hyper_hq is None else hyper_hq[i:i + 1])
                               for i in range(b * p)])
        if hq_features is not None:
            glob = hyper_hq.view(b, p, -1) @ hq_features.flatten(2).to(hyper_hq.dtype)  # (B, P, 16hw)
            masks = torch.cat([masks[:, :n], masks[:, n:] + glob.view(b * p, 1, -1)], dim=1)
        iou = self.iou_prediction_head(hs[:, 0])
        return masks.view(b, p, -1, 4 * h, 4 * w), iou.view(b, p, -1)

    def _masks(self, keys: torch.Tensor, hyper: torch.Tensor, hyper_hq: torch.Tensor | None) -> torch.Tensor:
        """Mask logits of N prompts, (N, 4 or 5, 16hw), the HQ one without the image-only hq_features term.

        keys (N, h, w, C) image tokens after the transformer, hyper (N, 4, C/8), hyper_hq (N, C/8) or None.
        Everything runs channels-last (N, H, W, C). mask_conv2 is linear, so the HQ hypernetwork vector
        is folded into its weights: one output channel per prompt instead of C/8, computed as a matmul
        per kernel tap plus shifted adds. The HQ branch runs a band of rows at a time (`_hq_rows`), so
        its largest tensors stay small enough to be reused from call to call rather than freshly mapped.
        """
        up = self._upscale(keys)  # (N, H, W, C/8)
        nb, hh, ww, _ = up.shape
        masks = hyper @ up.view(nb, hh * ww, -1).transpose(1, 2)  # (N, 4, HW)
        if hyper_hq is None:
            return masks
        w2 = self.mask_conv2.weight  # (C/8, C/4, 3, 3)
        taps = (hyper_hq @ w2.flatten(1)).view(nb, w2.shape[1], 9).transpose(1, 2)  # (N, 9, C/4)
        step = hh if torch.jit.is_tracing() else max(1, HQ_BAND_PIXELS // ww)
        hq = torch.cat([self._hq_rows(up, taps, r0, min(r0 + step, hh)) for r0 in range(0, hh, step)], dim=1)
        hq = hq.reshape(nb, 1, hh * ww) + (hyper_hq @ self.mask_conv2.bias)[:, None, None]
        return torch.cat([masks, hq], dim=1)

    def _upscale(self, keys: torch.Tensor) -> torch.Tensor:
        """Image tokens (N, h, w, C) -> the upscaled embedding (N, 4h, 4w, C/8), channels-last.

        Both transposed convolutions (kernel 2, stride 2) are one matmul per pixel, and LayerNorm and
        GELU act per pixel, so the chain runs on unshuffled sub-pixels; they are put in place once, at the end.
        """
        n, h, w, _ = keys.shape
        x = F.linear(keys, *_deconv_matrix(self.upscale_conv1))  # (N, h, w, 2*2*C/4): sub-pixels (a, b)
        x = gelu(self.upscale_layer_norm.last_dim(x.unflatten(-1, (4, -1))))
        x = gelu(F.linear(x, *_deconv_matrix(self.upscale_conv2)))  # (N, h, w, 4, 2*2*C/8): then (c, d)
        x = x.view(n, h, w, 2, 2, 2, 2, -1)  # (N, i, j, a, b, c, d, C/8) -> row 4i+2a+c, column 4j+2b+d
        return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(n, 4 * h, 4 * w, -1)

    def _hq_rows(self, up: torch.Tensor, taps: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of the HQ mask logits (N, r1-r0, W) from up (N, H, W, C/8) and the folded taps (N, 9, C/4)."""
        hh, ww = up.shape[1:3]
        lo, hi = max(r0 - 1, 0), min(r1 + 1, hh)  # rows of mask_conv1's output these need
        ulo, uhi = max(lo - 1, 0), min(hi + 1, hh)  # rows of up those need
        g = self.mask_conv1(up[:, ulo:uhi].permute(0, 3, 1, 2))  # channels-last memory in and out
        g = gelu(self.mask_norm.last_dim(g[:, :, lo - ulo:hi - ulo].permute(0, 2, 3, 1)))  # (N, hi-lo, W, C/4)
        nb, rows = g.shape[:2]
        r = (taps @ g.reshape(nb, rows * ww, -1).transpose(1, 2)).view(nb, 9, rows, ww)
        r = F.pad(r, (1, 1, int(r0 == 0), int(r1 == hh)))  # zeros beyond the image: rows r0-1 .. r1
        m = r1 - r0
        out = r[:, 0, :m, :ww].clone()
        for k in range(1, 9):
            ky, kx = divmod(k, 3)
            out += r[:, k, ky:ky + m, kx:kx + ww]
        return out


def _deconv_matrix(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel-2, stride-2 transposed convolution as a per-pixel linear map: weight (2*2*Cout, Cin), bias."""
    return conv.weight.permute(2, 3, 1, 0).flatten(0, 2), conv.bias.repeat(4)


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
