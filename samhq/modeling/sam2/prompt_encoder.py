"""SAM 2's prompt encoder: SAM's modules (`samhq.modeling.prompt_encoder`) with SAM 2's token layout.

What differs from SAM (v1) is only how prompts become tokens, as Meta's `SAM2ImagePredictor`
builds them: a box is two points labelled 2 and 3 placed *before* the click points, and one
"not a point" token always follows (SAM appends it only when there is no box). Mask-only prompts
have no sparse tokens. Labels: 1 foreground, 0 background, 2/3 box corners, -1 "not a point",
-10 padding (a zero token, for ragged point sets; transformers' convention).
"""
from __future__ import annotations

import torch

from ..prompt_encoder import PromptEncoder

BOX_CORNER_LABELS = (2, 3)


class Sam2PromptEncoder(PromptEncoder):
    """SAM's prompt encoder (whose `embed_points` reads labels 2 and 3 as box corners) with SAM 2's token order."""

    def forward(
        self,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts for B images x P prompts each, in the 1024-pixel input frame.

        points (B, P, N, 2) with labels (B, P, N); boxes (B, P, 4) as x0, y0, x1, y1; masks
        (B, 1 or P, 4h, 4w) logits. Returns sparse (B, P, T, C) = [box corners, points, not-a-point]
        (T = 0 for mask-only prompts) and dense (B, 1 or P, C, h, w).
        """
        if boxes is not None:
            corners = boxes.reshape(*boxes.shape[:-1], 2, 2)
            corner_labels = torch.tensor(BOX_CORNER_LABELS, device=boxes.device).expand(*boxes.shape[:-1], 2)
            if points is None:
                points, labels = corners, corner_labels
            else:
                points = torch.cat([corners.to(points.dtype), points], dim=-2)
                labels = torch.cat([corner_labels.to(labels.dtype), labels], dim=-1)
        if points is not None:
            sparse = self.embed_points(points, labels, pad=True)
        else:
            b, p = masks.shape[:2] if masks is not None else (1, 1)
            sparse = self.no_mask_embed.weight.new_zeros(b, p, 0, self.config.hidden_size)
        return sparse, self.embed_dense(masks, sparse.shape[0])

    def embed_dense(self, masks: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Mask logits (B, 1 or P, 4h, 4w) -> (B, 1 or P, C, h, w); `no_mask_embed` everywhere without masks."""
        if masks is None:
            g = self.config.image_embedding_size
            return self.no_mask_embed.weight.view(1, 1, -1, 1, 1).expand(batch, 1, -1, g, g)
        b, p = masks.shape[:2]
        dense = self.mask_embed(masks.reshape(b * p, 1, *masks.shape[-2:]).to(self.no_mask_embed.weight.dtype))
        return dense.view(b, p, *dense.shape[1:])
