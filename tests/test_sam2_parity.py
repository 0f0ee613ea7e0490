"""Parity with Meta's `sam2` package (PyPI sam2==1.1.0): the same random, perturbed weights, saved in the
official format and loaded with `load_sam2_model`, give the same image embeddings, high-resolution
features, every token's low-res mask logits, IoU predictions and object scores, and the same
selected masks as `SAM2ImagePredictor._predict` (points, boxes, box + point, mask input, several
prompts at once, multimask on and off, dynamic multimask fallback).

Every Hiera size is compared at its real structure (stages, heads, windows, global-attention blocks,
position-embedding size) with a narrow width and a 256-pixel input; one test runs the full-size
Hiera-L at 1024 px (marked slow). Max relative error (max |diff| / max |ref|) <= 1e-4 in fp32.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samhq.config_sam2 import SAM2_VARIANTS, SamHQ2Config
from samhq.modeling.mask_selection import select_masks
from samhq.modeling.sam2 import load_sam2_model

from official_ref import perturb_
from sam2_ref import (
    SMALL_IMAGE_SIZE,
    TOL,
    build_sam2_image_model,
    load_sam2,
    our_config,
    our_pixels,
    prompts,
    random_image,
    rel_err,
    save_official,
    small_hiera,
)

sam2 = load_sam2()
pytestmark = [pytest.mark.skipif(sam2 is None, reason="sam2 (and hydra-core) are not installed"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]
NO_GRAD = True


class Setup:
    """A perturbed sam2 model, our model loaded from its official checkpoint, and one image set in both."""

    def __init__(self, ref, ours, image, size):
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.ref, self.ours, self.size = ref, ours, size
        self.predictor = SAM2ImagePredictor(ref)
        self.predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
        self.predictor.set_image(image)
        self.orig_hw = image.shape[:2]
        self.emb, self.high_res = ours.get_image_embeddings(our_pixels(image, size))
        self.raw = None
        decoder = ref.sam_mask_decoder
        original = decoder.predict_masks

        def record(*args, **kwargs):  # every token's outputs, before sam2's selection
            self.raw = original(*args, **kwargs)
            return self.raw

        decoder.predict_masks = record

    def reference(self, prompt, multimask):
        points, labels = prompt.get("points", (None, None))
        masks, iou, low_res = self.predictor._predict(points, labels, prompt.get("boxes"), prompt.get("masks"), multimask,
                                                      return_logits=True)
        all_masks, all_iou, _, obj = self.raw
        return masks, iou, low_res, all_masks, all_iou, obj

    def ours_all(self, prompt):
        kw = {}
        if "points" in prompt:
            kw["input_points"], kw["input_labels"] = prompt["points"][0][None], prompt["points"][1][None]
        if "boxes" in prompt:
            kw["input_boxes"] = prompt["boxes"][None]
        if "masks" in prompt:
            kw["input_masks"] = prompt["masks"].transpose(0, 1)  # (P, 1, 4h, 4w) -> (1, P, 4h, 4w)
        return self.ours.predict_all(self.emb, self.high_res, **kw)


def _setup(ref, path, image, size, config=None):
    perturb_(ref, seed=1)
    ours = load_sam2_model(save_official(ref, path, config))
    return Setup(ref, ours, image, size)


@pytest.fixture(scope="module", params=list(SAM2_VARIANTS))
def small(request, tmp_path_factory):
    hiera = small_hiera(request.param)
    torch.manual_seed(0)
    ref = build_sam2_image_model(hiera, image_size=SMALL_IMAGE_SIZE)
    return _setup(ref, tmp_path_factory.mktemp(request.param), random_image(180, 300, 7), SMALL_IMAGE_SIZE,
                  our_config(hiera))


def test_image_embeddings_and_high_res_features(small):
    feats = small.predictor._features
    size = small.size
    assert small.emb.shape == (1, 256, size // 16, size // 16)
    assert [tuple(f.shape) for f in small.high_res] == [(1, 32, size // 4, size // 4), (1, 64, size // 8, size // 8)]
    assert rel_err(small.emb, feats["image_embed"]) < TOL
    for ours, ref in zip(small.high_res, feats["high_res_feats"]):
        assert rel_err(ours, ref) < TOL


@pytest.mark.parametrize("name", list(prompts(256)))
@pytest.mark.parametrize("multimask", [True, False])
def test_decoding_matches_sam2_image_predictor(small, name, multimask):
    prompt = prompts(small.size)[name]
    masks, iou, low_res, all_masks, all_iou, obj = small.reference(prompt, multimask)
    ours_masks, ours_iou, ours_obj = small.ours_all(prompt)
    p = all_masks.shape[0]
    assert ours_masks.shape == (1, p, 4, small.size // 4, small.size // 4)
    assert rel_err(ours_masks[0], all_masks) < TOL
    assert rel_err(ours_iou[0], all_iou, floor=1.0) < TOL
    assert rel_err(ours_obj[0], obj, floor=1.0) < TOL
    # The predictor's selection, and its full-resolution logits: the selected low-res logits
    # bilinearly resized to the original image size.
    sel, scores = small.ours.select_masks(ours_masks, ours_iou, multimask)
    assert sel.shape[:3] == (1, p, 3 if multimask else 1)
    assert rel_err(sel[0].clamp(-32, 32), low_res) < TOL
    assert rel_err(scores[0], iou, floor=1.0) < TOL
    full = F.interpolate(sel[0], small.orig_hw, mode="bilinear", align_corners=False)
    assert rel_err(full, masks) < TOL


@pytest.mark.parametrize("multimask", [True, False])
def test_forward_matches_predictor(small, multimask):
    """`SamHQ2Model.forward` from pixels equals the predictor on a box and on two points."""
    image = random_image(200, 120, 11)
    small.predictor.set_image(image)
    box = torch.tensor([[20.0, 30.0, 200.0, 180.0]])
    pts, labels = torch.tensor([[[40.0, 50.0], [100.0, 220.0]]]), torch.tensor([[1, 0]])
    cases = [(dict(input_boxes=box[None]), (None, None, box)),
             (dict(input_points=pts[None], input_labels=labels[None]), (pts, labels, None))]
    for kw, ref_args in cases:
        _, iou, low_res = small.predictor._predict(*ref_args, None, multimask, return_logits=True)
        out = small.ours(pixel_values=our_pixels(image, small.size), multimask_output=multimask, **kw)
        assert rel_err(out.pred_masks[0].clamp(-32, 32), low_res) < TOL
        assert rel_err(out.iou_scores[0], iou, floor=1.0) < TOL
        assert out.object_score_logits.shape == (1, 1, 1)
    small.predictor.set_image(random_image(180, 300, 7))  # restore the module fixture's image


def test_dynamic_multimask_fallback_matches_sam2(small):
    """With a stability threshold no mask reaches, single-mask output is always the best multimask mask."""
    dec = small.ref.sam_mask_decoder
    prompt = prompts(small.size)["three_prompts"]
    old = dec.dynamic_multimask_stability_thresh
    dec.dynamic_multimask_stability_thresh = 1.5
    try:
        _, iou, low_res, _, all_iou, _ = small.reference(prompt, False)
    finally:
        dec.dynamic_multimask_stability_thresh = old
    masks, ours_iou, _ = small.ours_all(prompt)
    sel, scores = select_masks(masks, ours_iou, False, False, "token_order", stability=(0.05, 1.5))
    assert torch.equal(scores[0, :, 0], ours_iou[0, :, 1:].max(dim=1).values)
    assert rel_err(sel[0].clamp(-32, 32), low_res) < TOL
    assert rel_err(scores[0], iou, floor=1.0) < TOL


def test_stability_selection_matches_sam2_on_mixed_logits(small):
    """`select_masks` with SAM 2's stability setting against sam2's `_dynamic_multimask_via_stability`
    where some masks are stable and some not."""
    dec = small.ref.sam_mask_decoder
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 4, 32, 32, generator=g) * torch.logspace(-2, 1, 16).view(16, 1, 1, 1)
    logits[:3, 0] = 5.0  # certainly stable
    logits[3, 0] = -5.0  # empty: stability 1 by definition
    iou = torch.rand(16, 4, generator=g)
    iou[5, 1:] = 0.5  # a tie: the first index wins
    ref_masks, ref_iou = dec._dynamic_multimask_via_stability(logits, iou)
    sel, scores = select_masks(logits[None], iou[None], False, False, "token_order", stability=(0.05, 0.98))
    assert torch.equal(sel[0], ref_masks) and torch.equal(scores[0], ref_iou)
    stable = torch.all(ref_masks[:, 0] == logits[:, 0], dim=(1, 2))
    assert 0 < stable.sum() < 16  # both branches are taken


def test_selection_orders():
    masks = torch.randn(1, 2, 4, 8, 8)
    iou = torch.tensor([[[0.9, 0.2, 0.7, 0.5], [0.1, 0.6, 0.6, 0.8]]])
    off, s_off = select_masks(masks, iou, True, False, "token_order")
    assert torch.equal(off, masks[:, :, 1:]) and torch.equal(s_off, iou[:, :, 1:])
    srt, s_srt = select_masks(masks, iou, True, False, "sorted")
    assert torch.equal(s_srt, torch.tensor([[[0.7, 0.5, 0.2], [0.8, 0.6, 0.6]]]))
    assert torch.equal(srt[0, 0], masks[0, 0, [2, 3, 1]]) and torch.equal(srt[0, 1], masks[0, 1, [3, 1, 2]])
    best, s_best = select_masks(masks, iou, True, False, "best")
    assert torch.equal(best[0, :, 0], torch.stack([masks[0, 0, 2], masks[0, 1, 3]]))
    assert s_best.shape == (1, 2, 1)
    with pytest.raises(ValueError, match="mask_selection must be one of"):
        select_masks(masks, iou, True, False, "nope")
    with pytest.raises(ValueError, match="hq_token_only"):
        select_masks(masks, iou, True, True, "token_order")


@pytest.mark.slow
def test_full_size_hiera_l(tmp_path):
    """Meta's own Hiera-L configuration (hydra compose of configs/sam2.1/sam2.1_hiera_l.yaml) at 1024 px, video modules
    included in the checkpoint: ours loads it with the variant detected and matches on a box + point and on points."""
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose(config_name="configs/sam2.1/sam2.1_hiera_l.yaml", overrides=[
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    ])
    OmegaConf.resolve(cfg)
    torch.manual_seed(0)
    ref = instantiate(cfg.model, _recursive_=True).eval()
    s = _setup(ref, tmp_path, random_image(300, 400, 5), 1024)
    assert s.ours.config.variant == "hiera_l" and not s.ours.hq_enabled
    assert s.ours.has_video and not s.ours.video_state  # the video modules are built and loaded (issue 19)
    assert rel_err(s.emb, s.predictor._features["image_embed"]) < TOL
    for ours, ref_f in zip(s.high_res, s.predictor._features["high_res_feats"]):
        assert rel_err(ours, ref_f) < TOL
    for name in ("box_and_point", "points"):
        for multimask in (True, False):
            prompt = prompts(1024)[name]
            _, iou, low_res, all_masks, all_iou, obj = s.reference(prompt, multimask)
            masks, ours_iou, ours_obj = s.ours_all(prompt)
            assert rel_err(masks[0], all_masks) < TOL
            assert rel_err(ours_iou[0], all_iou, floor=1.0) < TOL
            assert rel_err(ours_obj[0], obj, floor=1.0) < TOL
            sel, scores = s.ours.select_masks(masks, ours_iou, multimask)
            assert rel_err(sel[0].clamp(-32, 32), low_res) < TOL
            assert rel_err(scores[0], iou, floor=1.0) < TOL


def test_config_presets_match_meta_yaml():
    """Our presets equal Meta's configs/sam2.1 YAML trunks (with Hiera's signature defaults for omitted fields)."""
    import inspect
    from pathlib import Path

    import yaml
    from sam2.modeling.backbones.hieradet import Hiera

    defaults = {k: v.default for k, v in inspect.signature(Hiera).parameters.items()}
    root = Path(sam2.__file__).parent / "configs"
    files = {"hiera_t": "t", "hiera_s": "s", "hiera_b+": "b+", "hiera_l": "l"}
    for version in ("sam2.1/sam2.1", "sam2/sam2"):
        for name, suffix in files.items():
            model = yaml.safe_load((root / f"{version}_hiera_{suffix}.yaml").read_text())["model"]
            enc = model["image_encoder"]
            trunk = {**{k: defaults[k] for k in SAM2_VARIANTS[name]}, **enc["trunk"]}
            ours = SamHQ2Config.from_variant(name)
            v, d = ours.vision_config, ours.mask_decoder_config
            for key in SAM2_VARIANTS[name]:
                assert list(np.atleast_1d(trunk[key])) == list(np.atleast_1d(getattr(v, key))), (version, name, key)
            assert enc["scalp"] == v.scalp and enc["neck"]["d_model"] == v.d_model
            assert enc["neck"]["backbone_channel_list"] == v.backbone_channel_list
            assert enc["neck"]["fpn_top_down_levels"] == v.fpn_top_down_levels
            assert enc["neck"]["fpn_interp_model"] == v.fpn_interp_model
            assert model["image_size"] == v.image_size
            assert model["use_high_res_features_in_sam"] == d.use_high_res_features
            assert model["iou_prediction_use_sigmoid"] == d.iou_prediction_use_sigmoid
            assert model["pred_obj_scores"] == d.pred_obj_scores and model["pred_obj_scores_mlp"] == d.pred_obj_scores_mlp
            assert model["use_multimask_token_for_obj_ptr"] == d.use_multimask_token_for_obj_ptr


@pytest.mark.parametrize("multimask", [True, False])
def test_predictor_front_end_matches_sam2_image_predictor(small, multimask):
    """samhq's one front end over a SAM 2 model: original-image prompts in, full-size masks out, as
    Meta's `SAM2ImagePredictor.predict` (square resize, coordinate scaling, token-order multimask and the
    dynamic single-mask fallback, direct bilinear upscaling)."""
    from samhq.predictor import SamHQPredictor

    image = random_image(180, 300, 7)
    ours = SamHQPredictor(small.ours)
    ours.set_image(image)
    assert rel_err(ours.features, small.predictor._features["image_embed"]) < TOL
    cases = [dict(point_coords=np.array([[40.0, 60.0], [200, 90]]), point_labels=np.array([1, 0])),
             dict(box=np.array([30.0, 20.0, 250.0, 160.0])),
             dict(point_coords=np.array([[120.0, 80.0]]), point_labels=np.array([1]), box=np.array([60.0, 30.0, 220.0, 150.0]))]
    for kw in cases:
        ref_masks, ref_iou, ref_low = small.predictor.predict(**kw, multimask_output=multimask, return_logits=True)
        masks, iou, low = ours.predict(**kw, multimask_output=multimask, return_logits=True)
        assert masks.shape == ref_masks.shape == ((3 if multimask else 1), 180, 300)
        assert rel_err(torch.as_tensor(low), torch.as_tensor(ref_low)) < TOL
        assert rel_err(torch.as_tensor(iou), torch.as_tensor(ref_iou), floor=1.0) < TOL
        assert rel_err(torch.as_tensor(masks), torch.as_tensor(ref_masks)) < TOL
