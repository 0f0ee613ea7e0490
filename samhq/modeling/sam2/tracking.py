"""One tracking step of SAM 2 / HQ-SAM 2 on one frame (Meta's `SAM2Base.track_step`, SysCV's `SAM2HQBase`).

For a frame and the objects' earlier outputs (the memory bank):
1. `memory_conditioned_features`: the frame's image embedding attends to the spatial memories of the
   conditioning (prompted) frames and of the latest `num_maskmem - 1` tracked frames, and to the
   object pointers of up to `max_obj_ptrs_in_encoder` frames (memory attention). A frame prompted
   before any tracking ("initial conditioning frame") uses no memory: `no_memory_embedding` is added.
2. `forward_sam_heads`: the prompt encoder and (HQ) mask decoder on the conditioned embedding; masks
   of objects predicted absent (object-score logit <= 0) become -1024 (`NO_OBJ_SCORE`); the object
   pointer is the projected output token, replaced by the learned `no_object_pointer` when absent.
   HQ-SAM 2 adds its HQ mask to the selected SAM mask (never the HQ mask alone), as `SAM2HQBase` does.
3. `encode_memory`: the frame's features fused with its predicted mask (sigmoid, or binarised on
   prompted frames, then scaled to logits-like range) by the memory encoder; `occlusion_spatial_embedding_parameter`
   is added where the object is absent.

Frames given a mask prompt use the mask itself as the output (`use_mask_as_output`). All functions take
the `SamHQ2Model` (with its video modules) as `model`; tensors are batch-first over B objects, with
h = w = S/16 and the low-resolution masks at 4h x 4w.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..mask_selection import select_masks
from .memory import sine_encoding_1d

# The mask logit of an object predicted absent (Meta's NO_OBJ_SCORE).
NO_OBJ_SCORE = -1024.0


def frame_features(model, pixel_values: torch.Tensor) -> dict:
    """A frame's image features for tracking: pixel_values (1, 3, S, S) as `get_image_embeddings` takes them.

    Returns "features" (1, C, h, w) (the neck's top level, without `no_memory_embedding`), "position"
    (1, C, h, w) (its sine position encoding) and "high_res" [(1, C/8, 4h, 4w), (1, C/4, 2h, 2w)] (after
    `conv_s0` / `conv_s1`; [] when the decoder does not use them).
    """
    features, positions = model.vision_encoder(pixel_values.to(model.encoder_dtype))
    features = [f.to(model.dtype) for f in features]
    high_res = model.mask_decoder.high_res_features(features) if model.config.mask_decoder_config.use_high_res_features else []
    return {"features": features[-1], "position": positions[-1].to(model.dtype), "high_res": high_res}


def use_multimask(model, is_init_cond_frame: bool, num_points: int) -> bool:
    """Whether the SAM heads give three masks (and keep the best): 0..1 clicks (a box counts as two points)."""
    cfg = model.config.video_config
    return bool(cfg.multimask_output_in_sam and (is_init_cond_frame or cfg.multimask_output_for_tracking)
                and cfg.multimask_min_pt_num <= num_points <= cfg.multimask_max_pt_num)


def _object_pointer(model, token: torch.Tensor, appearing: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """The output token (B, C) -> object pointer (B, C), the learned no-object pointer where the object is absent."""
    cfg = model.config.video_config
    ptr = model.object_pointer_proj(token)
    if model.config.mask_decoder_config.pred_obj_scores and hasattr(model, "no_object_pointer"):
        weight = score.sigmoid() if cfg.soft_no_obj_ptr else appearing.to(ptr.dtype)
        if cfg.fixed_no_obj_ptr:
            ptr = weight * ptr
        ptr = ptr + (1 - weight) * model.no_object_pointer
    return ptr


def forward_sam_heads(model, features: torch.Tensor, high_res: list[torch.Tensor], points: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, mask_inputs: torch.Tensor | None = None,
                      multimask: bool = False) -> dict:
    """Prompt encoder + (HQ) mask decoder on (memory-conditioned) features (B, C, h, w).

    points (B, N, 2) in the S-pixel input frame with labels (B, N) (1, 0, 2/3 box corners; None: one
    "not a point"); mask_inputs (B, 1, H', W') logits, resized to 4h x 4w with antialiasing when needed.
    With `multimask` the best of the three multimask masks by predicted IoU, else the single mask (with
    SAM 2's stability fallback); the HQ mask added when the model has it. Returns "low_res_masks"
    (B, 1, 4h, 4w), "high_res_masks" (B, 1, S, S), "iou" (B, 1), "obj_ptr" (B, C), "object_score_logits" (B, 1).
    """
    b = features.shape[0]
    size = model.mask_size
    if points is None:
        points = features.new_zeros(b, 1, 2)
        labels = -torch.ones(b, 1, dtype=torch.int32, device=features.device)
    if mask_inputs is not None and tuple(mask_inputs.shape[-2:]) != (size, size):
        mask_inputs = F.interpolate(mask_inputs.float(), (size, size), mode="bilinear", align_corners=False, antialias=True)
    sparse, dense = model.prompt_encoder(points[:, None], labels[:, None], None, mask_inputs)
    masks, iou, scores, tokens = model.mask_decoder(features, model.get_image_wide_positional_embeddings(), sparse, dense,
                                                    high_res or None, model.hq_enabled, return_tokens=True)
    selected, selected_iou = select_masks(masks, iou, multimask, False, "best", stability=model.stability)
    appearing = scores[:, 0] > 0  # (B, 1)
    if model.config.mask_decoder_config.pred_obj_scores:
        selected = torch.where(appearing[:, :, None, None, None], selected, NO_OBJ_SCORE)
    low_res = selected[:, 0].float()  # (B, 1, 4h, 4w)
    high = F.interpolate(low_res, (model.config.image_size,) * 2, mode="bilinear", align_corners=False)
    # The object pointer comes from the chosen multimask token, or always from the single-mask token.
    if multimask and model.config.mask_decoder_config.use_multimask_token_for_obj_ptr:
        token = tokens[:, 0].gather(1, (iou[:, 0, 1:].argmax(-1) + 1)[:, None, None].expand(-1, 1, tokens.shape[-1]))[:, 0]
    else:
        token = tokens[:, 0, 0]
    return {"low_res_masks": low_res, "high_res_masks": high, "iou": selected_iou[:, 0],
            "obj_ptr": _object_pointer(model, token, appearing, scores[:, 0]), "object_score_logits": scores[:, 0]}


def use_mask_as_output(model, features: torch.Tensor, high_res: list[torch.Tensor], mask_inputs: torch.Tensor) -> dict:
    """A mask prompt (B, 1, S, S) in {0, 1} taken as the output (logits +10 / -10); the object pointer from the
    decoder given the downsampled mask; present iff any pixel is set. Same keys as `forward_sam_heads`."""
    high = mask_inputs.float() * 20.0 - 10.0
    low = F.interpolate(high, (high.shape[-2] // 4, high.shape[-1] // 4), mode="bilinear", align_corners=False, antialias=True)
    cfg = model.config.video_config
    if cfg.use_obj_ptrs_in_encoder:
        ptr = forward_sam_heads(model, features, high_res, mask_inputs=model.mask_downsample(mask_inputs.float()))["obj_ptr"]
    else:
        ptr = features.new_zeros(features.shape[0], features.shape[1])
    appearing = (mask_inputs.flatten(1).float() > 0).any(dim=1, keepdim=True)
    score = appearing.float() * 20.0 - 10.0
    if model.config.mask_decoder_config.pred_obj_scores and hasattr(model, "no_object_pointer"):
        weight = appearing.float()
        if cfg.fixed_no_obj_ptr:
            ptr = weight * ptr
        ptr = ptr + (1 - weight) * model.no_object_pointer
    return {"low_res_masks": low, "high_res_masks": high, "iou": mask_inputs.new_ones(mask_inputs.shape[0], 1).float(),
            "obj_ptr": ptr, "object_score_logits": score}


def select_closest_cond_frames(frame_idx: int, cond_outputs: dict, max_cond_frames: int) -> tuple[dict, dict]:
    """The conditioning frames attended to: all, or at most `max_cond_frames` (>= 2) of them: the closest before
    `frame_idx`, the closest at or after it, then the temporally closest others. Returns (selected, unselected)."""
    if max_cond_frames == -1 or len(cond_outputs) <= max_cond_frames:
        return cond_outputs, {}
    selected = {}
    before = max((t for t in cond_outputs if t < frame_idx), default=None)
    if before is not None:
        selected[before] = cond_outputs[before]
    after = min((t for t in cond_outputs if t >= frame_idx), default=None)
    if after is not None:
        selected[after] = cond_outputs[after]
    rest = sorted((t for t in cond_outputs if t not in selected), key=lambda t: abs(t - frame_idx))
    for t in rest[:max_cond_frames - len(selected)]:
        selected[t] = cond_outputs[t]
    return selected, {t: v for t, v in cond_outputs.items() if t not in selected}


def memory_frame_indices(frame_idx: int, num_maskmem: int, stride: int, reverse: bool) -> list[tuple[int, int]]:
    """(t_pos, frame) of the non-conditioning memories, t_pos = 1 (oldest) .. num_maskmem - 1 (the previous frame).

    The previous frame always, then every `stride`-th frame before it (after it when tracking in reverse)."""
    out = []
    for t_pos in range(1, num_maskmem):
        t_rel = num_maskmem - t_pos  # frames back from the current one
        if t_rel == 1:
            prev = frame_idx + 1 if reverse else frame_idx - 1
        elif not reverse:
            prev = ((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride
        else:
            prev = -(-(frame_idx + 2) // stride) * stride + (t_rel - 2) * stride
        out.append((t_pos, prev))
    return out


def memory_conditioned_features(model, frame_idx: int, is_init_cond_frame: bool, features: torch.Tensor,
                                position: torch.Tensor, outputs: dict, num_frames: int, reverse: bool = False) -> torch.Tensor:
    """The frame's features (B, C, h, w) conditioned on the memory bank `outputs` ({"cond_frame_outputs": {t: out},
    "non_cond_frame_outputs": {t: out}}, each out with "maskmem_features" (B, mem_dim, h, w), "maskmem_pos_enc"
    [(B, mem_dim, h, w)] and "obj_ptr" (B, C)). position: (B or 1, C, h, w). Returns (B, C, h, w)."""
    cfg = model.config.video_config
    b, c, h, w = features.shape
    device = features.device
    if cfg.num_maskmem == 0:
        return features
    memory, memory_pos = [], []
    num_obj_ptr_tokens = 0
    if not is_init_cond_frame:
        selected, unselected = select_closest_cond_frames(frame_idx, outputs["cond_frame_outputs"], cfg.max_cond_frames_in_attn)
        non_cond = outputs["non_cond_frame_outputs"]
        # Spatial memories: the conditioning frames (temporal position 0), then the recent frames.
        frames = [(0, out) for out in selected.values()]
        for t_pos, t in memory_frame_indices(frame_idx, cfg.num_maskmem, cfg.memory_temporal_stride_for_eval, reverse):
            frames.append((t_pos, non_cond.get(t, unselected.get(t))))
        for t_pos, out in frames:
            if out is None:
                continue
            memory.append(out["maskmem_features"].to(device=device, dtype=features.dtype).flatten(2).transpose(1, 2))
            pos = out["maskmem_pos_enc"][-1].to(device=device, dtype=features.dtype).flatten(2).transpose(1, 2)
            memory_pos.append(pos.expand(b, -1, -1) + model.memory_temporal_positional_encoding[cfg.num_maskmem - t_pos - 1])
        # Object pointers of the conditioning frames (only past ones, when so configured) and recent frames.
        if cfg.use_obj_ptrs_in_encoder:
            max_ptrs = min(num_frames, cfg.max_obj_ptrs_in_encoder)
            sign = -1 if reverse else 1
            cond_ptrs = selected
            if cfg.only_obj_ptrs_in_the_past_for_eval:
                cond_ptrs = {t: out for t, out in selected.items() if (t >= frame_idx if reverse else t <= frame_idx)}
            pointers = [((frame_idx - t) * sign if cfg.use_signed_tpos_enc_to_obj_ptrs else abs(frame_idx - t), out["obj_ptr"])
                        for t, out in cond_ptrs.items()]
            for t_diff in range(1, max_ptrs):
                t = frame_idx + t_diff if reverse else frame_idx - t_diff
                if t < 0 or t >= num_frames:
                    break
                out = non_cond.get(t, unselected.get(t))
                if out is not None:
                    pointers.append((t_diff, out["obj_ptr"]))
            if pointers:
                ptrs = torch.stack([p.to(device) for _, p in pointers], dim=1)  # (B, P, C)
                m = cfg.mem_dim
                if cfg.add_tpos_enc_to_obj_ptrs:
                    t_max = max_ptrs - 1
                    dist = torch.tensor([d for d, _ in pointers], device=device) / t_max
                    ptr_pos = sine_encoding_1d(dist, c if cfg.proj_tpos_enc_in_obj_ptrs else m).to(features.dtype)
                    if cfg.proj_tpos_enc_in_obj_ptrs:
                        ptr_pos = model.temporal_positional_encoding_projection_layer(ptr_pos)
                    ptr_pos = ptr_pos[None].expand(b, -1, m)
                else:
                    ptr_pos = ptrs.new_zeros(b, len(pointers), m)
                if m < c:  # a pointer becomes C / mem_dim tokens of mem_dim channels
                    ptrs = ptrs.reshape(b, -1, c // m, m).flatten(1, 2)
                    ptr_pos = ptr_pos.repeat_interleave(c // m, dim=1)
                memory.append(ptrs)
                memory_pos.append(ptr_pos)
                num_obj_ptr_tokens = ptrs.shape[1]
    else:
        if cfg.directly_add_no_mem_embed:
            return features + model.no_memory_embedding.view(1, -1, 1, 1)
        # One "no memory" token, so that the attention has something to attend to.
        memory = [model.no_memory_embedding.expand(b, 1, cfg.mem_dim)]
        memory_pos = [model.no_memory_positional_encoding.expand(b, 1, cfg.mem_dim)]
    x = model.memory_attention(features.flatten(2).transpose(1, 2), position.flatten(2).transpose(1, 2).expand(b, -1, -1),
                               torch.cat(memory, dim=1), torch.cat(memory_pos, dim=1), num_obj_ptr_tokens)
    return x.transpose(1, 2).reshape(b, c, h, w)


def non_overlapping(masks: torch.Tensor) -> torch.Tensor:
    """Keep, at each pixel, only the highest-scoring object of masks (N, 1, H, W); the others' logits are
    clamped to at most -10."""
    if masks.shape[0] == 1:
        return masks
    keep = masks.argmax(dim=0, keepdim=True) == torch.arange(masks.shape[0], device=masks.device)[:, None, None, None]
    return torch.where(keep, masks, masks.clamp(max=-10.0))


def encode_memory(model, features: torch.Tensor, high_res_masks: torch.Tensor, object_score_logits: torch.Tensor,
                  is_mask_from_pts: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A frame's spatial memory: features (B, C, h, w) (not memory-conditioned), the predicted mask logits
    (B, 1, S, S), object scores (B, 1). Returns memory features (B, mem_dim, h, w) and their position encoding."""
    cfg = model.config.video_config
    if cfg.non_overlap_masks_for_mem_enc and not model.training:
        high_res_masks = non_overlapping(high_res_masks)
    if cfg.binarize_mask_from_pts_for_mem_enc and is_mask_from_pts and not model.training:
        mask = (high_res_masks > 0).float()
    else:
        mask = torch.sigmoid(high_res_masks)
    mask = mask * cfg.sigmoid_scale_for_mem_enc + cfg.sigmoid_bias_for_mem_enc
    memory, position = model.memory_encoder(features, mask.to(features.dtype))
    if cfg.no_obj_embed_spatial:
        absent = 1 - (object_score_logits > 0).to(memory.dtype)  # (B, 1)
        memory = memory + absent[..., None, None] * model.occlusion_spatial_embedding_parameter[..., None, None]
    return memory, position


def track_step(model, frame_idx: int, is_init_cond_frame: bool, frame: dict, outputs: dict, num_frames: int,
               point_inputs: dict | None = None, mask_inputs: torch.Tensor | None = None, reverse: bool = False,
               run_mem_encoder: bool = True, prev_sam_mask_logits: torch.Tensor | None = None) -> dict:
    """Segment B objects on one frame from its features `frame` (`frame_features`, expanded to B) and the memory bank.

    point_inputs {"point_coords": (B, N, 2) S-frame pixels, "point_labels": (B, N)}; mask_inputs (B, 1, S, S);
    prev_sam_mask_logits (B, 1, 4h, 4w): an earlier prediction fed with new clicks. Returns "pred_masks"
    (B, 1, 4h, 4w), "pred_masks_high_res" (B, 1, S, S), "obj_ptr" (B, C), "object_score_logits" (B, 1),
    "maskmem_features" and "maskmem_pos_enc" (None without `run_mem_encoder`).
    """
    cfg = model.config.video_config
    features, high_res = frame["features"], frame["high_res"]
    if mask_inputs is not None and cfg.use_mask_input_as_output_without_sam:
        sam = use_mask_as_output(model, features, high_res, mask_inputs)
    else:
        conditioned = memory_conditioned_features(model, frame_idx, is_init_cond_frame, features, frame["position"], outputs,
                                                  num_frames, reverse)
        if prev_sam_mask_logits is not None:
            mask_inputs = prev_sam_mask_logits
        num_points = 0 if point_inputs is None else point_inputs["point_labels"].shape[1]
        sam = forward_sam_heads(model, conditioned, high_res,
                                None if point_inputs is None else point_inputs["point_coords"],
                                None if point_inputs is None else point_inputs["point_labels"], mask_inputs,
                                use_multimask(model, is_init_cond_frame, num_points))
    out = {"pred_masks": sam["low_res_masks"], "pred_masks_high_res": sam["high_res_masks"], "obj_ptr": sam["obj_ptr"],
           "object_score_logits": sam["object_score_logits"], "maskmem_features": None, "maskmem_pos_enc": None}
    if run_mem_encoder and cfg.num_maskmem > 0:
        memory, position = encode_memory(model, features, sam["high_res_masks"], sam["object_score_logits"],
                                         is_mask_from_pts=point_inputs is not None)
        out["maskmem_features"], out["maskmem_pos_enc"] = memory, [position]
    return out


__all__ = ["NO_OBJ_SCORE", "frame_features", "forward_sam_heads", "use_mask_as_output", "memory_conditioned_features",
           "encode_memory", "track_step", "select_closest_cond_frames", "memory_frame_indices", "use_multimask",
           "non_overlapping"]
