"""Parity with the official code (`segment-anything-hq==0.3`): the same random, perturbed weights
loaded from an official-format checkpoint give the same embeddings, intermediate features, mask
logits and IoU predictions. Max relative error (max |diff| / max |ref|) <= 1e-4 in fp32."""
import pytest
import torch

from samhq import SamHQModel

from official_ref import load_official, perturb_

sah = load_official()
pytestmark = pytest.mark.skipif(sah is None, reason="segment-anything-hq is not installed")
NO_GRAD = True  # conftest runs this module's tests without autograd

TOL = 1e-4


def rel_err(a, b, floor=1e-12):
    """max |a - b| / max |b|; `floor` bounds the denominator below (IoU scores live on a unit scale)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(floor)).item()


def _setup(variant, tmp_path_factory):
    torch.manual_seed(0)
    official = perturb_(sah.sam_model_registry[variant](), seed=1)
    official.eval()  # also refreshes TinyViT's cached attention bias from the perturbed parameters
    path = tmp_path_factory.mktemp(variant) / f"sam_hq_{variant}.pth"
    torch.save(official.state_dict(), path)
    ours = SamHQModel.from_pretrained(path)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    off_emb, off_inter = official.image_encoder(x)
    emb, inter = ours.get_image_embeddings(x)
    return official, ours, (off_emb, off_inter), (emb, inter)


@pytest.fixture(scope="module", params=["vit_tiny", pytest.param("vit_b", marks=pytest.mark.slow)])
def models(request, tmp_path_factory):
    return request.param, *_setup(request.param, tmp_path_factory)


PTS = torch.tensor([[[120.0, 240.0], [610.0, 580.0], [930.0, 40.0]]])
LABELS = torch.tensor([[1, 0, 1]])
NEG = torch.tensor([[0, 0, 1]])
BOX = torch.tensor([[60.0, 80.0, 700.0, 820.0]])
MASK = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(4)) * 4
PROMPTS = {
    "points": dict(points=(PTS, LABELS)),
    "negative_points": dict(points=(PTS, NEG)),
    "box": dict(boxes=BOX),
    "box_and_point": dict(points=(PTS[:, :1], LABELS[:, :1]), boxes=BOX),
    "mask_and_point": dict(points=(PTS[:, :1], LABELS[:, :1]), masks=MASK),
}


def _ours_kwargs(p):
    kw = {}
    if "points" in p:
        kw["input_points"], kw["input_labels"] = p["points"][0][None], p["points"][1][None]
    if "boxes" in p:
        kw["input_boxes"] = p["boxes"][None]
    if "masks" in p:
        kw["input_masks"] = p["masks"]
    return kw


def test_embeddings_and_intermediate_features(models):
    variant, _, _, (off_emb, off_inter), (emb, inter) = models
    assert emb.shape == (1, 256, 64, 64)
    assert rel_err(emb, off_emb) < TOL
    assert len(inter) == len(off_inter) == (4 if variant == "vit_b" else 1)
    for a, b in zip(inter, off_inter):
        assert a.shape == b.shape
        assert rel_err(a, b) < TOL


@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("hq_only", [False, True])
def test_official_decoding(models, prompt, multimask, hq_only):
    _, official, ours, (off_emb, off_inter), (emb, inter) = models
    p = PROMPTS[prompt]
    sparse, dense = official.prompt_encoder(points=p.get("points"), boxes=p.get("boxes"), masks=p.get("masks"))
    ref_masks, ref_iou = official.mask_decoder(
        image_embeddings=off_emb, image_pe=official.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense, multimask_output=multimask, hq_token_only=hq_only, interm_embeddings=off_inter,
    )
    out = ours(image_embeddings=emb, intermediate_embeddings=inter, multimask_output=multimask,
               hq_token_only=hq_only, mask_selection="best", **_ours_kwargs(p))
    assert out.pred_masks.shape == (1, *ref_masks.shape)
    assert rel_err(out.pred_masks[0], ref_masks) < TOL
    assert rel_err(out.iou_scores[0], ref_iou, floor=1.0) < TOL


@pytest.mark.parametrize("prompt", ["points", "box"])
def test_seed_selection_over_official_masks(models, prompt):
    """Seed semantics on the official model's raw token masks: 3 SAM masks sorted by IoU, each + HQ."""
    _, official, ours, (off_emb, off_inter), (emb, inter) = models
    p = PROMPTS[prompt]
    dec = official.mask_decoder
    sparse, dense = official.prompt_encoder(points=p.get("points"), boxes=p.get("boxes"), masks=None)
    hq_feat = dec.embedding_encoder(off_emb) + dec.compress_vit_feat(off_inter[0].permute(0, 3, 1, 2))
    raw, iou = dec.predict_masks(off_emb, official.prompt_encoder.get_dense_pe(), sparse, dense, hq_feat)
    order = iou[0, 1:].argsort(descending=True)
    expected = raw[0, 1:4][order] + raw[0, 4:5]
    out = ours(image_embeddings=emb, intermediate_embeddings=inter, **_ours_kwargs(p))
    assert out.pred_masks.shape == (1, 1, 3, 256, 256)
    assert rel_err(out.pred_masks[0, 0], expected) < TOL
    assert rel_err(out.iou_scores[0, 0], iou[0, 1:][order], floor=1.0) < TOL
    hq = ours(image_embeddings=emb, intermediate_embeddings=inter, hq_token_only=True, **_ours_kwargs(p))
    assert hq.pred_masks.shape == (1, 1, 1, 256, 256)
    assert rel_err(hq.pred_masks[0, 0, 0], raw[0, 4]) < TOL


def test_full_forward_from_pixels_matches_official_batched_call(models):
    """`Sam.forward` of the official model (pixels in, low-res logits out) against ours."""
    variant, official, ours, _, _ = models
    if variant == "vit_b":
        pytest.skip("the encoder is already compared above; one full ViT-B pass is enough")
    image = torch.randint(0, 256, (3, 1024, 768), generator=torch.Generator().manual_seed(9)).float()
    ref = official([{"image": image, "original_size": (1024, 768), "boxes": BOX}], multimask_output=True)[0]
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    pixels = torch.nn.functional.pad((image - mean) / std, (0, 256, 0, 0))[None]
    out = ours(pixel_values=pixels, input_boxes=BOX[None], mask_selection="best")
    assert rel_err(out.pred_masks[0], ref["low_res_logits"]) < TOL
    assert rel_err(out.iou_scores[0], ref["iou_predictions"], floor=1.0) < TOL


def test_official_vit_tiny_ignores_loaded_attention_biases_until_eval_is_called_again():
    """Documents a reference bug: `build_sam_vit_t` calls eval() before loading, so TinyViT's cached
    attention bias stays at its initial zeros. We use the loaded biases (as training did)."""
    torch.manual_seed(0)
    trained = perturb_(sah.sam_model_registry["vit_tiny"](), seed=1)
    fresh = sah.sam_model_registry["vit_tiny"]()  # eval() already called, as by the official builder
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    stale, _ = fresh.image_encoder(x)
    fresh.eval()
    refreshed, _ = fresh.image_encoder(x)
    assert rel_err(stale, refreshed) > 1e-3
