"""Which of the decoder's masks a caller gets: the one output-selection rule of samhq.

The mask decoder predicts a mask from every output token: the single-mask token, three multimask
tokens and, for SAM-HQ and HQ-SAM 2, the HQ token. The references return different subsets:

- "sorted" (transformers' `SamHQModel`): with `multimask_output` the three multimask masks, sorted by
  predicted IoU (best first), each plus the HQ mask;
- "best" (the official `segment_anything_hq` `SamPredictor` and automatic generator, SAM 2's
  tracking heads): with `multimask_output` only the best of the three by predicted IoU, plus the HQ mask;
- "token_order" (Meta's `segment_anything` and `sam2` predictors, transformers' `SamModel`/`Sam2Model`,
  the official HQ-SAM 2 predictor): with `multimask_output` the three in token order.
Without `multimask_output` all give the single-mask token's mask plus the HQ mask; SAM 2 (the
`stability` setting) swaps in the best multimask mask when that single mask is unstable (its
stability score at +-delta below the threshold; Meta's `_dynamic_multimask_via_stability`). With
`hq_token_only` the HQ mask replaces the sum, and the SAM tokens' scores are kept (as both HQ
references do).
"""
from __future__ import annotations

import warnings

import torch

from ..masks import stability_score

SELECTIONS = ("sorted", "best", "token_order")
# The spellings of samhq 0.1, accepted with a deprecation warning.
_OLD_NAMES = {"seed": "sorted", "official": "best"}


def canonical_selection(selection: str) -> str:
    """"sorted", "best" or "token_order"; the old names "seed" and "official" are accepted with a DeprecationWarning."""
    if selection in _OLD_NAMES:
        new = _OLD_NAMES[selection]
        warnings.warn(f"mask_selection={selection!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3)
        return new
    if selection not in SELECTIONS:
        raise ValueError(f"mask_selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    return selection


def _gather(masks, iou, index):
    """Tokens `index` (B, P, M) of masks (B, P, K, H, W) and iou (B, P, 4)."""
    # -1 keeps the leading sizes those of `index` (dynamic in an exported graph)
    return masks.gather(2, index[..., None, None].expand(-1, -1, -1, *masks.shape[-2:])), iou.gather(2, index)


def _sam_masks(masks, iou, multimask_output: bool, selection: str, stability):
    if multimask_output:
        if selection == "token_order":
            return masks[:, :, 1:iou.shape[2]], iou[:, :, 1:]
        if selection == "sorted":
            return _gather(masks, iou, iou[:, :, 1:].argsort(dim=2, descending=True, stable=True) + 1)
        return _gather(masks, iou, iou[:, :, 1:].argmax(dim=2, keepdim=True) + 1)
    single, scores = masks[:, :, :1], iou[:, :, :1]
    if stability is None:
        return single, scores
    delta, threshold = stability
    best, best_scores = _gather(masks, iou, iou[:, :, 1:].argmax(dim=2, keepdim=True) + 1)
    stable = stability_score(single, 0.0, delta, empty=1.0) >= threshold  # (B, P, 1)
    return torch.where(stable[..., None, None], single, best), torch.where(stable, scores, best_scores)


def best_score(iou_scores: torch.Tensor, multimask_output: bool, stability: tuple[float, float] | None = None) -> torch.Tensor:
    """The highest score `select_masks` can return for each prompt, known from the IoU predictions alone.

    iou_scores (..., 4) -> (...). With `multimask_output` the best multimask score (what every selection returns
    at most); without, the single-mask token's score, or, with SAM 2's dynamic selection (`stability`), which
    needs the masks to choose, the larger of it and the best multimask score (an upper bound).
    """
    multi = iou_scores[..., 1:].amax(-1)
    if multimask_output:
        return multi
    single = iou_scores[..., 0]
    return single if stability is None else torch.maximum(single, multi)


def select_masks(
    masks: torch.Tensor,
    iou_scores: torch.Tensor,
    multimask_output: bool | torch.Tensor,
    hq_token_only: bool | torch.Tensor,
    selection: str = "sorted",
    sam_token_only: bool = False,
    stability: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the returned masks from every token's masks (see the module docstring).

    masks (B, P, K, H, W) logits from the mask decoder (K = 5 with the HQ mask last, 4 without),
    iou_scores (B, P, 4). `stability` = (delta, threshold): SAM 2's dynamic multimask selection
    (e.g. (0.05, 0.98)), None for SAM. The two switches may be 0-d or one-element tensors (an exported
    graph's inputs); both choices are then computed and picked by the switch, which needs selection
    "best" (one mask either way). `sam_token_only` leaves the HQ mask out (SAM's own masks, for
    evaluation against the HQ token). Returns masks (B, P, M, H, W) and scores (B, P, M'): M = M' = 3
    for "sorted" and "token_order" with multimask_output, else 1, except that the HQ mask alone
    (hq_token_only) is M = 1 with the selected SAM masks' M' scores. With tensor switches and
    "sorted" / "token_order" both choices are computed with three slots and the returned ones are cut
    to that count (a dynamic size in an exported graph).
    Raises ValueError for hq_token_only without an HQ mask, and for unknown selections.
    """
    selection = canonical_selection(selection)
    has_hq = masks.shape[2] == iou_scores.shape[2] + 1
    hq_flag = isinstance(hq_token_only, torch.Tensor) or hq_token_only
    if hq_flag and not has_hq:
        raise ValueError("hq_token_only=True needs the HQ token, but this model was loaded without HQ weights")
    if sam_token_only and hq_flag:
        raise ValueError("sam_token_only and hq_token_only exclude each other")
    count = None  # the number of masks to keep, a tensor, when it depends on a tensor switch
    if isinstance(multimask_output, torch.Tensor):
        on = multimask_output.reshape(()) > 0.5
        multi, multi_scores = _sam_masks(masks, iou_scores, True, selection, stability)
        single, single_scores = _sam_masks(masks, iou_scores, False, selection, stability)
        if selection != "best":  # 3 masks or 1: pad the single one to 3 slots, keep `count`
            single, single_scores = single.expand_as(multi), single_scores.expand_as(multi_scores)
            count = torch.where(on, torch.tensor(multi.shape[2]), torch.tensor(1))
        sam, scores = torch.where(on, multi, single), torch.where(on, multi_scores, single_scores)
        if count is not None:
            sam, scores = sam[:, :, :count], scores[:, :, :count]
    else:
        sam, scores = _sam_masks(masks, iou_scores, multimask_output, selection, stability)
    if sam_token_only or not has_hq:
        return sam, scores
    hq = masks[:, :, -1:]
    if isinstance(hq_token_only, torch.Tensor):
        hq_on = hq_token_only.reshape(()) > 0.5
        out = torch.where(hq_on, hq.expand_as(sam), sam + hq)
        if selection != "best":  # the HQ mask alone is one mask
            out = out[:, :, :torch.where(hq_on, torch.tensor(1), count if count is not None else torch.tensor(sam.shape[2]))]
        return out, scores
    return (hq if hq_token_only else sam + hq), scores
