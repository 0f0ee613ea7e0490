"""Video tracking parity with Meta's `sam2.sam2_video_predictor.SAM2VideoPredictor` (PyPI sam2==1.1.0), and the
HQ-SAM 2 video path against SysCV's computation.

Meta's predictor is built by hydra from its own `sam2.1_hiera_t.yaml` with the overrides Meta's
`build_sam2_video_predictor` applies (dynamic multimask, binarised prompted masks), at a small Hiera
(8 channels per head) and a 128-pixel input; every weight is perturbed and the object-score head's bias
shifted so that objects are predicted present on some frames and absent on others (the occlusion logic:
-1024 masks, the no-object pointer and spatial embedding). Its state dict is saved as an official
checkpoint and loaded with `load_sam2_model` (the video config inferred from the tensors). Both
predictors get the same frames: Meta's session is opened on JPEG copies and its frame tensor replaced by
`ResizeSquare`'s (Meta's video loader resizes with PIL; samhq uses SAM 2's one transform). Hole filling
is off on both sides (`fill_hole_area=0`; Meta's needs its CUDA extension).

Compared on every frame: the masks (pixel agreement >= 99.99% at the video's resolution), the logits,
the object-score logits and the stored object pointers, for forward propagation, a correction click on
a tracked frame, reverse propagation, mask prompts (one empty), clearing a frame's prompts and removing
an object. The synthetic video (`samhq.data.synthetic_video.moving_shapes`) has two moving shapes and an
occluding bar.

HQ-SAM 2: Meta's predictor with its decoder replaced by a re-statement of sam-hq2's
`MaskDecoderHQ.forward` (SAM masks + HQ mask, output token for the pointer) must equal ours on an HQ
checkpoint; with $SAMHQ2_OFFICIAL pointing at a sam-hq2 checkout, SysCV's own `SAM2HQVideoPredictor`
runs too (skipped otherwise).
"""
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from samhq.data.synthetic_video import moving_shapes
from samhq.modeling.sam2 import load_sam2_model
from samhq.processing import ResizeSquare
from samhq.video import SamHQ2VideoPredictor

from official_ref import perturb_
from sam2_ref import load_sam2, official_hq_tensors, our_config, save_official, small_hiera

sam2 = load_sam2()
pytestmark = [pytest.mark.skipif(sam2 is None, reason="sam2 (and hydra-core) are not installed"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]
NO_GRAD = True
SIZE = 128
NUM_FRAMES = 10
SCORE_SHIFT = 1.8  # object-score bias: present on some frames, absent on others (checked below)
AGREEMENT = 0.9999


def meta_video_predictor(target="sam2.sam2_video_predictor.SAM2VideoPredictor", seed=1):
    """Meta's video predictor from its sam2.1 Hiera-T YAML, small, perturbed. Returns (model, hiera kwargs)."""
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    hiera = small_hiera("hiera_t")
    e, g = hiera["embed_dim"], SIZE // 16
    cfg = compose(config_name="configs/sam2.1/sam2.1_hiera_t.yaml", overrides=[
        f"++model._target_={target}", f"++model.image_size={SIZE}", f"++model.image_encoder.trunk.embed_dim={e}",
        f"++model.image_encoder.neck.backbone_channel_list=[{8 * e},{4 * e},{2 * e},{e}]",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{g},{g}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{g},{g}]",
        # build_sam2_video_predictor's overrides, with hole filling off
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
        "++model.binarize_mask_from_pts_for_mem_enc=true", "++model.fill_hole_area=0",
    ])
    OmegaConf.resolve(cfg)
    torch.manual_seed(0)
    model = perturb_(instantiate(cfg.model, _recursive_=True), seed=seed)
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += SCORE_SHIFT
    return model.eval(), hiera


class Pair:
    """Meta's predictor and ours on the same weights and the same frames; every call runs on both and is compared."""

    def __init__(self, ref, ours, frames, folder):
        self.ref, self.ours, self.frames, self.folder = ref, ours, frames, folder
        self.scores = []

    def start(self):
        with torch.inference_mode():
            self.ref_state = self.ref.init_state(str(self.folder))
            transform = ResizeSquare(SIZE)
            self.ref_state["images"] = torch.cat([transform.preprocess(f) for f in self.frames])
            self.ref_state["cached_features"] = {}
        self.state = self.ours.init_state(self.frames)
        return self

    def call(self, name, *args, **kwargs):
        a = getattr(self.ref, name)(self.ref_state, *args, **kwargs)
        b = getattr(self.ours, name)(self.state, *args, **kwargs)
        return a, b

    def prompt(self, name, *args, **kwargs):
        a, b = self.call(name, *args, **kwargs)
        self.compare(a, b)
        return b

    def propagate(self, **kwargs):
        ref = list(self.ref.propagate_in_video(self.ref_state, **kwargs))
        ours = list(self.ours.propagate_in_video(self.state, **kwargs))
        assert [r[0] for r in ref] == [o[0] for o in ours] and ours
        for a, b in zip(ref, ours):
            self.compare(a, b)
        return ours

    def ref_output(self, obj_idx, t):
        """The latest output of an object on frame t: a new prompt's (not yet propagated) first."""
        temp, d = self.ref_state["temp_output_dict_per_obj"][obj_idx], self.ref_state["output_dict_per_obj"][obj_idx]
        for outputs in (temp["cond_frame_outputs"], temp["non_cond_frame_outputs"], d["cond_frame_outputs"],
                        d["non_cond_frame_outputs"]):
            if t in outputs:
                return outputs[t]
        return None

    def compare(self, a, b):
        (t, ids, ref_masks), (t2, ids2, masks) = a, b
        assert t == t2 and list(ids) == list(ids2)
        assert masks.shape == ref_masks.shape == (len(ids), 1, *self.frames[0].shape[:2])
        agreement = ((masks > 0) == (ref_masks > 0)).float().mean().item()
        assert agreement >= AGREEMENT, f"frame {t}: {agreement:.6f} of pixels agree"
        visible = ref_masks > -1000
        assert torch.equal(visible, masks > -1000)
        if visible.any():
            assert (masks[visible] - ref_masks[visible]).abs().max() <= 1e-3 * ref_masks[visible].abs().max().clamp_min(1)
        ours_scores = self.ours.object_scores(self.state, t)
        for i in range(len(ids)):
            out = self.ref_output(i, t)
            if out is None:
                continue
            ref_score = out["object_score_logits"].reshape(()).item()
            assert abs(ours_scores[i].item() - ref_score) <= 1e-3 * max(1.0, abs(ref_score)), f"frame {t} object {ids[i]}"
            self.scores.append(ref_score)
            ptr, ref_ptr = self.ours.frame_output(self.state, i, t)["obj_ptr"], out["obj_ptr"]
            assert (ptr - ref_ptr).abs().max() <= 1e-3 * ref_ptr.abs().max()


def write_jpegs(frames, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i}.jpg")
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models on a shared two-core machine run several times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    frames, labels = moving_shapes(NUM_FRAMES)
    return frames, labels, write_jpegs(frames, tmp_path_factory.mktemp("jpg"))


@pytest.fixture(scope="module")
def pair(video, tmp_path_factory):
    frames, _, folder = video
    ref, hiera = meta_video_predictor()
    ours = load_sam2_model(save_official(ref, tmp_path_factory.mktemp("ckpt"), our_config(hiera, SIZE)))
    assert ours.has_video and not ours.hq_enabled
    return Pair(ref, SamHQ2VideoPredictor(ours, fill_hole_area=0), frames, folder)


def test_video_config_inferred_from_the_checkpoint_is_metas_yaml(pair):
    """The tensors say SAM 2.1 with Meta's memory sizes; the rest are the release's settings, Meta's YAML values."""
    from samhq.config_sam2 import SamHQ2VideoConfig

    ref, cfg = pair.ref, pair.ours.model.config.video_config
    assert cfg == SamHQ2VideoConfig()
    assert (cfg.num_maskmem, cfg.max_obj_ptrs_in_encoder) == (ref.num_maskmem, ref.max_obj_ptrs_in_encoder)
    assert cfg.mem_dim == ref.mem_dim
    for name in ("sigmoid_scale_for_mem_enc", "sigmoid_bias_for_mem_enc", "binarize_mask_from_pts_for_mem_enc",
                 "use_mask_input_as_output_without_sam", "directly_add_no_mem_embed", "multimask_output_in_sam",
                 "multimask_min_pt_num", "multimask_max_pt_num", "multimask_output_for_tracking", "use_obj_ptrs_in_encoder",
                 "add_tpos_enc_to_obj_ptrs", "proj_tpos_enc_in_obj_ptrs", "use_signed_tpos_enc_to_obj_ptrs",
                 "only_obj_ptrs_in_the_past_for_eval", "fixed_no_obj_ptr", "soft_no_obj_ptr", "use_mlp_for_obj_ptr_proj",
                 "memory_temporal_stride_for_eval", "non_overlap_masks_for_mem_enc", "max_cond_frames_in_attn"):
        assert getattr(cfg, name) == getattr(ref, name), name
    assert (ref.no_obj_embed_spatial is not None) == cfg.no_obj_embed_spatial


def test_forward_propagation_two_objects(pair):
    p = pair.start()
    p.prompt("add_new_points_or_box", 0, 1, points=[[30, 30], [60, 20]], labels=[1, 0])
    p.prompt("add_new_points_or_box", 0, 2, box=[85, 55, 125, 85])
    p.propagate()
    assert (np.array(p.scores) > 0).any()
    scores = np.array(p.scores)
    # The occlusion logic ran both ways, every score ten times further from 0 than the implementations differ (~1e-5).
    assert (scores > 0).any() and (scores < 0).any() and np.abs(scores).min() > 1e-4


def test_correction_click_then_forward_and_reverse(pair):
    p = pair.start()
    p.prompt("add_new_points_or_box", 0, 1, points=[[30, 30]], labels=[1])
    p.prompt("add_new_points_or_box", 0, 2, box=[85, 55, 125, 85])
    p.propagate()
    assert (np.array(p.scores) > 0).any()
    p.prompt("add_new_points_or_box", 6, 1, points=[[90, 25]], labels=[0], clear_old_points=False)  # correction
    p.prompt("add_new_points_or_box", 6, 2, points=[[40, 70]], labels=[1])
    p.propagate(start_frame_idx=6)
    p.propagate(start_frame_idx=6, reverse=True)


def test_mask_prompts_reverse_and_forward_from_a_middle_frame(pair, video):
    _, labels, _ = video
    p = pair.start()
    p.prompt("add_new_mask", 7, 1, labels[7] == 1)
    p.prompt("add_new_mask", 7, 2, np.zeros_like(labels[7]))  # an empty mask: the object is absent there
    p.prompt("add_new_points_or_box", 7, 3, points=[[100, 70]], labels=[1])
    p.propagate(start_frame_idx=7, reverse=True)
    p.propagate(start_frame_idx=7, max_frame_num_to_track=2)
    a, b = p.call("clear_all_prompts_in_frame", 7, 3)
    p.compare(a, b)
    ids, updated = p.ours.remove_object(p.state, 2)
    ref_ids, ref_updated = p.ref.remove_object(p.ref_state, 2)
    assert ids == ref_ids == [1, 3] and [t for t, _ in updated] == [t for t, _ in ref_updated] == [7]
    for (_, m), (_, rm) in zip(updated, ref_updated):
        assert ((m > 0) == (rm > 0)).float().mean() >= AGREEMENT
    p.prompt("add_new_points_or_box", 7, 3, points=[[60, 60]], labels=[1])  # frame 7 is a first prompt again
    p.propagate(start_frame_idx=7, max_frame_num_to_track=2)


# ---------------------------------------------------------------------------------------------
# HQ-SAM 2


class HQDecoderRestated(nn.Module):
    """sam-hq2's `MaskDecoderHQ` (mask_hq_decoder.py: `predict_masks` + `forward`) restated on Meta's decoder
    modules plus the HQ modules: masks = HQ mask + the selected SAM masks; the pointer token is the SAM token."""

    def __init__(self, dec, hq):
        super().__init__()
        self.dec, self.hq = dec, hq
        self.conv_s0, self.conv_s1 = dec.conv_s0, dec.conv_s1

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output,
                repeat_image, high_res_features=None):
        dec, hq = self.dec, self.hq
        n = sparse_prompt_embeddings.shape[0]
        out_tokens = torch.cat([dec.obj_score_token.weight, dec.iou_token.weight, dec.mask_tokens.weight, hq.hf_token.weight])
        tokens = torch.cat([out_tokens[None].expand(n, -1, -1), sparse_prompt_embeddings], dim=1)
        src = (image_embeddings.repeat_interleave(n, 0) if repeat_image else image_embeddings) + dense_prompt_embeddings
        hs, keys = dec.transformer(src, image_pe.repeat_interleave(n, 0), tokens)
        b, c, h, w = src.shape
        conv1, norm, act1, conv2, act2 = dec.output_upscaling
        feat_s0, feat_s1 = high_res_features
        up = act1(norm(conv1(keys.transpose(1, 2).reshape(b, c, h, w)) + feat_s1))
        up = act2(conv2(up) + feat_s0)
        mask_tokens = hs[:, 2:7]  # the four SAM mask tokens, then the HQ token
        hyper = torch.stack([dec.output_hypernetworks_mlps[i](mask_tokens[:, i]) for i in range(4)]
                            + [hq.hf_mlp(mask_tokens[:, 4])], dim=1)
        masks = torch.cat([hyper[:, :4] @ up.flatten(2), hyper[:, 4:] @ hq.embedding_maskfeature(up).flatten(2)], dim=1)
        masks = masks.view(b, 5, *up.shape[-2:])
        iou, obj = dec.iou_prediction_head(hs[:, 1]), dec.pred_obj_score_head(hs[:, 0])
        if multimask_output:
            sam, iou = masks[:, 1:4], iou[:, 1:]
        elif dec.dynamic_multimask_via_stability and not self.training:
            sam, iou = dec._dynamic_multimask_via_stability(masks[:, :4], iou)
        else:
            sam, iou = masks[:, :1], iou[:, :1]
        ptr_tokens = mask_tokens[:, 1:4] if multimask_output and dec.use_multimask_token_for_obj_ptr else mask_tokens[:, :1]
        return masks[:, 4:5] + sam, iou, ptr_tokens, obj


@pytest.fixture(scope="module")
def hq_pair(video, tmp_path_factory):
    from test_sam2_hq import hq_modules

    frames, _, folder = video
    ref, hiera = meta_video_predictor(seed=3)
    tensors = official_hq_tensors()
    ref.sam_mask_decoder = HQDecoderRestated(ref.sam_mask_decoder, hq_modules(tensors))
    state = {k.replace("sam_mask_decoder.dec.", "sam_mask_decoder."): v for k, v in ref.state_dict().items()
             if not k.startswith("sam_mask_decoder.hq.")}
    path = tmp_path_factory.mktemp("hq")
    torch.save({"model": {**state, **tensors}}, path / "model.pt")
    our_config(hiera, SIZE).to_json_file(path / "config.json")
    ours = load_sam2_model(path)
    assert ours.hq_enabled and ours.has_video
    return Pair(ref, SamHQ2VideoPredictor(ours, fill_hole_area=0), frames, folder)


def test_hq_video_matches_sam_hq2_computation(hq_pair):
    p = hq_pair.start()
    p.prompt("add_new_points_or_box", 0, 1, points=[[30, 30]], labels=[1])
    p.prompt("add_new_points_or_box", 0, 2, box=[85, 55, 125, 85])
    p.propagate()
    assert (np.array(p.scores) > 0).any()
    p.prompt("add_new_points_or_box", 5, 1, points=[[70, 28]], labels=[1], clear_old_points=False)
    p.propagate(start_frame_idx=5, reverse=True)
    assert (np.array(p.scores) > 0).any()  # HQ masks were visible


def load_official_hq_video():
    """SysCV's SAM2HQVideoPredictor class from $SAMHQ2_OFFICIAL (the sam-hq2 directory), over the installed sam2."""
    root = os.environ.get("SAMHQ2_OFFICIAL")
    if not root:
        return None
    files = [("sam2.modeling.sam.mask_hq_decoder", "modeling/sam/mask_hq_decoder.py"),
             ("sam2.modeling.sam2_hq_base", "modeling/sam2_hq_base.py"),
             ("sam2.sam2_hq_video_predictor", "sam2_hq_video_predictor.py")]
    if not all((Path(root) / "sam2" / rel).is_file() for _, rel in files):
        return None
    for name, rel in files:
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, Path(root) / "sam2" / rel)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    return sys.modules["sam2.sam2_hq_video_predictor"].SAM2HQVideoPredictor


def test_official_hq_sam2_video_predictor(video, tmp_path):
    """SysCV's own HQ video predictor (its batched, pre-1.1 predictor: equal to ours when every object is prompted
    on the same frame before tracking) on an HQ checkpoint."""
    if load_official_hq_video() is None:
        pytest.skip("set SAMHQ2_OFFICIAL to a checkout's sam-hq2 directory to run SysCV's HQ-SAM 2 video predictor")
    frames, _, folder = video
    ref, hiera = meta_video_predictor(target="sam2.sam2_hq_video_predictor.SAM2HQVideoPredictor", seed=3)
    tensors = official_hq_tensors()
    ref.load_state_dict({**ref.state_dict(), **tensors})
    save_official(ref, tmp_path, our_config(hiera, SIZE))
    ours = load_sam2_model(tmp_path)
    assert ours.hq_enabled
    p = Pair(ref, SamHQ2VideoPredictor(ours, fill_hole_area=0), frames, folder).start()
    p.prompt("add_new_points_or_box", 0, 1, points=[[30, 30]], labels=[1])
    p.prompt("add_new_points_or_box", 0, 2, box=[85, 55, 125, 85])
    p.propagate()
    assert (np.array(p.scores) > 0).any()
