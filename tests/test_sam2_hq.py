"""HQ-SAM 2's decoder additions against the official computation.

SysCV's `sam-hq2` is not installable in CI (its package is also named `sam2`, needs CUDA-era
dependencies), so the HQ decoder is checked against `official_hq_decoder` below: a plain
re-statement of `sam-hq2/sam2/modeling/sam/mask_hq_decoder.py` (`MaskDecoderHQ.predict_masks` and
`forward`) running on Meta's own decoder modules (PyPI sam2) plus the HQ tensors. When
$SAMHQ2_OFFICIAL names a checkout's `sam-hq2` directory, `test_official_hq_sam2` also runs the
official `SAM2HQBase` and its image predictor. With the HQ parts off, the model equals Meta's sam2.
"""
import numpy as np
import pytest
import torch

from samhq.modeling.sam2 import load_sam2_model

from official_ref import perturb_
from sam2_ref import (
    SMALL_IMAGE_SIZE,
    TOL,
    build_sam2_image_model,
    load_official_hq,
    load_sam2,
    official_hq_tensors,
    our_config,
    our_pixels,
    prompts,
    rel_err,
    save_official,
    small_hiera,
)

sam2 = load_sam2()
pytestmark = [pytest.mark.skipif(sam2 is None, reason="sam2 (and hydra-core) are not installed"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]
NO_GRAD = True


def hq_modules(tensors: dict):
    """The official HQ modules (hf_token, hf_mlp, embedding_maskfeature) built from sam2's classes, holding `tensors`."""
    from sam2.modeling.sam2_utils import MLP, LayerNorm2d
    from torch import nn

    dim = tensors["sam_mask_decoder.hf_token.weight"].shape[1]
    mods = nn.ModuleDict(dict(
        hf_token=nn.Embedding(1, dim),
        hf_mlp=MLP(dim, dim, dim // 8, 3),
        embedding_maskfeature=nn.Sequential(nn.Conv2d(dim // 8, dim // 4, 3, 1, 1), LayerNorm2d(dim // 4), nn.GELU(),
                                            nn.Conv2d(dim // 4, dim // 8, 3, 1, 1)),
    ))
    mods.load_state_dict({k[len("sam_mask_decoder."):]: v for k, v in tensors.items()})
    return mods.eval()


def official_hq_decoder(dec, hq, image_embeddings, image_pe, sparse, dense, high_res, repeat_image):
    """MaskDecoderHQ.predict_masks restated: every token's masks (N, 5, H, W), IoU (N, 4), object scores (N, 1).

    dec: Meta's MaskDecoder (its transformer, upscaling, hypernetworks and heads are HQ-SAM 2's too).
    """
    n = sparse.shape[0]
    out_tokens = torch.cat([dec.obj_score_token.weight, dec.iou_token.weight, dec.mask_tokens.weight, hq.hf_token.weight])
    tokens = torch.cat([out_tokens[None].expand(n, -1, -1), sparse], dim=1)
    src = (image_embeddings.repeat_interleave(n, 0) if repeat_image else image_embeddings) + dense
    hs, keys = dec.transformer(src, image_pe.repeat_interleave(n, 0), tokens)
    b, c, h, w = src.shape
    conv1, norm, act1, conv2, act2 = dec.output_upscaling
    feat_s0, feat_s1 = high_res
    up = act1(norm(conv1(keys.transpose(1, 2).reshape(b, c, h, w)) + feat_s1))
    up = act2(conv2(up) + feat_s0)
    mask_features = hq.embedding_maskfeature(up)
    mask_tokens = hs[:, 2:7]
    hyper = torch.stack([dec.output_hypernetworks_mlps[i](mask_tokens[:, i]) for i in range(4)]
                        + [hq.hf_mlp(mask_tokens[:, 4])], dim=1)
    sam_masks = hyper[:, :4] @ up.flatten(2)
    hq_masks = hyper[:, 4:] @ mask_features.flatten(2)
    masks = torch.cat([sam_masks, hq_masks], dim=1).view(b, 5, *up.shape[-2:])
    return masks, dec.iou_prediction_head(hs[:, 1]), dec.pred_obj_score_head(hs[:, 0])


def official_hq_select(dec, masks, iou, multimask, hq_token_only):
    """MaskDecoderHQ.forward's selection restated (uses Meta's stability fallback on the 4 SAM tokens)."""
    if multimask:
        sam, scores = masks[:, 1:4], iou[:, 1:]
    else:
        sam, scores = dec._dynamic_multimask_via_stability(masks[:, :4], iou)
    hq = masks[:, 4:5]
    return (hq if hq_token_only else hq + sam), scores


def sam2_prompt(ref, prompt):
    """Sparse and dense embeddings as SAM2ImagePredictor._predict makes them (box corners first, labels 2 and 3)."""
    points = prompt.get("points")
    if "boxes" in prompt:
        boxes = prompt["boxes"]
        corners, labels = boxes.reshape(-1, 2, 2), torch.tensor([[2, 3]]).repeat(boxes.shape[0], 1)
        points = (corners, labels) if points is None else (torch.cat([corners, points[0]], 1), torch.cat([labels, points[1]], 1))
    return ref.sam_prompt_encoder(points=points, boxes=None, masks=prompt.get("masks"))


class HQSetup:
    def __init__(self, tmp):
        hiera = small_hiera("hiera_t")
        torch.manual_seed(0)
        self.ref = perturb_(build_sam2_image_model(hiera, image_size=SMALL_IMAGE_SIZE), seed=2)
        tensors = official_hq_tensors()
        self.hq = hq_modules(tensors)
        self.ours = load_sam2_model(save_official(self.ref, tmp, our_config(hiera), extra=tensors))
        image = np.random.default_rng(3).integers(0, 256, (200, 160, 3), dtype=np.uint8)
        pixels = our_pixels(image, SMALL_IMAGE_SIZE)
        self.emb, self.high_res = self.ours.get_image_embeddings(pixels)
        backbone = self.ref.forward_image(pixels)
        _, feats, _, sizes = self.ref._prepare_backbone_features(backbone)
        feats[-1] = feats[-1] + self.ref.no_mem_embed
        feats = [f.permute(1, 2, 0).view(1, -1, *s) for f, s in zip(feats, sizes)]
        self.ref_emb, self.ref_high_res = feats[-1], feats[:-1]

    def reference(self, prompt):
        sparse, dense = sam2_prompt(self.ref, prompt)
        return official_hq_decoder(self.ref.sam_mask_decoder, self.hq, self.ref_emb, self.ref.sam_prompt_encoder.get_dense_pe(),
                                   sparse, dense, self.ref_high_res, repeat_image=sparse.shape[0] > 1)

    def ours_all(self, prompt):
        kw = {}
        if "points" in prompt:
            kw["input_points"], kw["input_labels"] = prompt["points"][0][None], prompt["points"][1][None]
        if "boxes" in prompt:
            kw["input_boxes"] = prompt["boxes"][None]
        if "masks" in prompt:
            kw["input_masks"] = prompt["masks"].transpose(0, 1)
        return self.ours.predict_all(self.emb, self.high_res, **kw)


@pytest.fixture(scope="module")
def hq(tmp_path_factory):
    return HQSetup(tmp_path_factory.mktemp("hq"))


def test_hq_checkpoint_loads_with_hq(hq):
    assert hq.ours.hq_enabled
    assert torch.equal(hq.ours.mask_decoder.hq_token.weight, hq.hq.hf_token.weight)


@pytest.mark.parametrize("name", ["points", "box", "box_and_point", "mask_and_point", "three_prompts"])
def test_hq_tokens_match_official_computation(hq, name):
    prompt = prompts(SMALL_IMAGE_SIZE)[name]
    ref_masks, ref_iou, ref_obj = hq.reference(prompt)
    masks, iou, obj = hq.ours_all(prompt)
    assert masks.shape == (1, ref_masks.shape[0], 5, SMALL_IMAGE_SIZE // 4, SMALL_IMAGE_SIZE // 4)
    assert rel_err(masks[0], ref_masks) < TOL
    assert rel_err(masks[0, :, 4], ref_masks[:, 4]) < TOL  # the HQ mask on its own scale
    assert rel_err(iou[0], ref_iou, floor=1.0) < TOL
    assert rel_err(obj[0], ref_obj, floor=1.0) < TOL


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("hq_token_only", [False, True])
@pytest.mark.parametrize("thresh", [0.98, 1.5])
def test_hq_selection_matches_official(hq, multimask, hq_token_only, thresh):
    prompt = prompts(SMALL_IMAGE_SIZE)["three_prompts"]
    dec = hq.ref.sam_mask_decoder
    ref_masks, ref_iou, _ = hq.reference(prompt)
    old = dec.dynamic_multimask_stability_thresh
    dec.dynamic_multimask_stability_thresh = thresh
    try:
        expected, expected_scores = official_hq_select(dec, ref_masks, ref_iou, multimask, hq_token_only)
    finally:
        dec.dynamic_multimask_stability_thresh = old
    hq.ours.config.mask_decoder_config.dynamic_multimask_stability_thresh = thresh
    try:
        out = hq.ours(image_embeddings=hq.emb, high_res_features=hq.high_res, input_points=prompt["points"][0][None],
                      input_labels=prompt["points"][1][None], multimask_output=multimask, hq_token_only=hq_token_only)
    finally:
        hq.ours.config.mask_decoder_config.dynamic_multimask_stability_thresh = 0.98
    assert out.pred_masks.shape[1:3] == expected.shape[:2]
    assert out.iou_scores.shape[1:] == expected_scores.shape
    assert rel_err(out.pred_masks[0], expected) < TOL
    assert rel_err(out.iou_scores[0], expected_scores, floor=1.0) < TOL


@pytest.mark.parametrize("name", ["points", "box_and_point", "mask_only", "three_boxes"])
def test_hq_off_equals_sam2(hq, name):
    """The HQ-SAM 2 model with its HQ parts off is SAM 2.1 with the same weights: sam2's own predictor agrees."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    prompt = prompts(SMALL_IMAGE_SIZE)[name]
    predictor = SAM2ImagePredictor(hq.ref)
    predictor._features = {"image_embed": hq.ref_emb, "high_res_feats": hq.ref_high_res}
    predictor._orig_hw, predictor._is_image_set = [(SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE)], True
    points = prompt.get("points", (None, None))
    hq.ours.hq_enabled = False
    try:
        masks, iou, _ = hq.ours_all(prompt)
        out = hq.ours(image_embeddings=hq.emb, high_res_features=hq.high_res, multimask_output=True,
                      input_points=None if points[0] is None else points[0][None],
                      input_labels=None if points[1] is None else points[1][None],
                      input_boxes=prompt["boxes"][None] if "boxes" in prompt else None,
                      input_masks=prompt["masks"].transpose(0, 1) if "masks" in prompt else None)
    finally:
        hq.ours.hq_enabled = True
    assert masks.shape[2] == 4
    _, ref_iou, ref_low_res = predictor._predict(points[0], points[1], prompt.get("boxes"), prompt.get("masks"), True,
                                                 return_logits=True)
    assert rel_err(out.pred_masks[0].clamp(-32, 32), ref_low_res) < TOL
    assert rel_err(out.iou_scores[0], ref_iou, floor=1.0) < TOL


official = load_official_hq()


@pytest.mark.skipif(official is None, reason="set SAMHQ2_OFFICIAL to SysCV/sam-hq's sam-hq2 directory to run this test")
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("hq_token_only", [False, True])
def test_official_hq_sam2(tmp_path, multimask, hq_token_only):
    """SysCV's own SAM2HQBase and HQ image predictor on perturbed weights, against ours loaded from its checkpoint."""
    _, sam2_hq_base, hq_predictor_class = official
    hiera = small_hiera("hiera_l")
    torch.manual_seed(0)
    ref = perturb_(build_sam2_image_model(hiera, image_size=SMALL_IMAGE_SIZE, base_class=sam2_hq_base), seed=4)
    ours = load_sam2_model(save_official(ref, tmp_path, our_config(hiera)))
    assert ours.hq_enabled
    image = np.random.default_rng(8).integers(0, 256, (150, 220, 3), dtype=np.uint8)
    predictor = hq_predictor_class(ref)
    predictor._bb_feat_sizes = [(SMALL_IMAGE_SIZE // s, SMALL_IMAGE_SIZE // s) for s in (4, 8, 16)]
    predictor.set_image(image)
    emb, high_res = ours.get_image_embeddings(our_pixels(image, SMALL_IMAGE_SIZE))
    assert rel_err(emb, predictor._features["image_embed"]) < TOL
    for name in ("points", "box_and_point", "three_boxes"):
        prompt = prompts(SMALL_IMAGE_SIZE)[name]
        points = prompt.get("points", (None, None))
        _, iou, low_res = predictor._predict(points[0], points[1], prompt.get("boxes"), None, multimask, hq_token_only,
                                             return_logits=True)
        out = ours(image_embeddings=emb, high_res_features=high_res, multimask_output=multimask, hq_token_only=hq_token_only,
                   input_points=None if points[0] is None else points[0][None],
                   input_labels=None if points[1] is None else points[1][None],
                   input_boxes=prompt["boxes"][None] if "boxes" in prompt else None)
        assert rel_err(out.pred_masks[0].clamp(-32, 32), low_res) < TOL
        assert rel_err(out.iou_scores[0], iou, floor=1.0) < TOL
