"""Which of the decoder's masks a caller gets: the one output-selection rule of samhq.

The mask decoder predicts a mask from every output token: the single-mask token, three multimask
tokens and, for SAM-HQ, the HQ token. The references return different subsets:

- "sorted" (transformers' `SamHQModel`): with `multimask_output` the three multimask masks, sorted by
  predicted IoU (best first), each plus the HQ mask;
- "best" (the official `segment_anything_hq` `SamPredictor` and automatic generator): with
  `multimask_output` only the best of the three by predicted IoU, plus the HQ mask.
Without `multimask_output` both give the single-mask token's mask plus the HQ mask. With
`hq_token_only` the HQ mask replaces the sum, and the SAM tokens' scores are kept (as both
references do). A plain SAM checkpoint (no HQ token) gives SAM's masks in token order, unsorted.
"""
from __future__ import annotations

import warnings

import torch

SELECTIONS = ("sorted", "best")
# The spellings of samhq 0.1, accepted with a deprecation warning.
_OLD_NAMES = {"seed": "sorted", "official": "best"}


def canonical_selection(selection: str) -> str:
    """"sorted" or "best"; the old names "seed" and "official" are accepted with a DeprecationWarning."""
    if selection in _OLD_NAMES:
        new = _OLD_NAMES[selection]
        warnings.warn(f"mask_selection={selection!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3)
        return new
    if selection not in SELECTIONS:
        raise ValueError(f"mask_selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    return selection


def _sam_masks(masks, iou, multimask_output: bool, selection: str):
    if not multimask_output:
        return masks[:, :, :1], iou[:, :, :1]
    scores = iou[:, :, 1:]
    if selection == "sorted":
        scores, order = scores.sort(dim=2, descending=True)
    else:
        scores, order = scores.max(dim=2, keepdim=True)
    index = (order + 1)[..., None, None].expand(-1, -1, -1, *masks.shape[-2:])
    return masks.gather(2, index), scores


def select_masks(
    masks: torch.Tensor,
    iou_scores: torch.Tensor,
    multimask_output: bool | torch.Tensor,
    hq_token_only: bool | torch.Tensor,
    selection: str = "sorted",
    sam_token_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the returned masks from every token's masks (see the module docstring).

    masks (B, P, K, H, W) logits from the mask decoder (K = 5 with the HQ mask last, 4 for plain
    SAM), iou_scores (B, P, 4). The two switches may be 0-d or one-element tensors (an exported graph's
    inputs); both choices are then computed and picked by the switch, which needs selection "best"
    (one mask either way). Returns masks (B, P, M, H, W) and scores (B, P, M): M = 3 for "sorted" with
    multimask_output, 1 otherwise (3 or 1 for plain SAM).
    `sam_token_only` leaves the HQ mask out (SAM's own masks, for evaluation against the HQ token).
    Raises ValueError for hq_token_only on a plain SAM model and for unknown selections.
    """
    selection = canonical_selection(selection)
    if sam_token_only and (isinstance(hq_token_only, torch.Tensor) or hq_token_only):
        raise ValueError("sam_token_only and hq_token_only exclude each other")
    if masks.shape[2] != iou_scores.shape[2] + 1:  # plain SAM: no HQ mask
        if isinstance(hq_token_only, torch.Tensor) or hq_token_only:
            raise ValueError("hq_token_only=True needs the HQ token, but this model was loaded without HQ weights")
        pick = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, :, pick], iou_scores[:, :, pick]
    if isinstance(multimask_output, torch.Tensor):
        if selection != "best":
            raise ValueError("a tensor multimask_output switch needs selection='best' (one mask either way)")
        on = multimask_output.reshape(()) > 0.5
        multi, multi_scores = _sam_masks(masks, iou_scores, True, selection)
        single, single_scores = _sam_masks(masks, iou_scores, False, selection)
        sam, scores = torch.where(on, multi, single), torch.where(on, multi_scores, single_scores)
    else:
        sam, scores = _sam_masks(masks, iou_scores, multimask_output, selection)
    if sam_token_only:
        return sam, scores
    hq = masks[:, :, -1:]
    if isinstance(hq_token_only, torch.Tensor):
        return torch.where(hq_token_only.reshape(()) > 0.5, hq, sam + hq), scores
    return (hq if hq_token_only else sam + hq), scores
