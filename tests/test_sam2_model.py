"""SamHQ2Model without the references: full-size shapes for every Hiera size (meta device), SAM 2's prompt
token layout by hand, HQ on/off structure, and input errors."""
import math

import pytest
import torch

from samhq.config_sam2 import SAM2_VARIANTS, SamHQ2Config
from samhq.modeling.sam2 import SamHQ2Model

from official_ref import perturb_
from sam2_ref import our_config, small_hiera

NO_GRAD = True


@pytest.mark.parametrize("variant", list(SAM2_VARIANTS))
def test_full_size_shapes_on_meta_device(variant):
    with torch.device("meta"):
        model = SamHQ2Model(SamHQ2Config.from_variant(variant)).eval()
        emb, high_res = model.get_image_embeddings(torch.empty(2, 3, 1024, 1024))
        assert emb.shape == (2, 256, 64, 64)
        assert [tuple(f.shape) for f in high_res] == [(2, 32, 256, 256), (2, 64, 128, 128)]
        masks, iou, obj = model.predict_all(emb, high_res, input_points=torch.empty(2, 3, 4, 2),
                                            input_labels=torch.ones(2, 3, 4, dtype=torch.int), input_boxes=torch.empty(2, 3, 4))
        assert masks.shape == (2, 3, 5, 256, 256) and iou.shape == (2, 3, 4) and obj.shape == (2, 3, 1)
        model.hq_enabled = False
        masks, _, _ = model.predict_all(emb[:1], [f[:1] for f in high_res], input_masks=torch.empty(1, 2, 256, 256))
        assert masks.shape == (1, 2, 4, 256, 256)
    stages = [o.shape[1:] for o in _stage_shapes(variant)]
    dims = SamHQ2Config.from_variant(variant).vision_config.stage_dims
    assert stages == [(d, 256 // 2 ** i, 256 // 2 ** i) for i, d in enumerate(dims)]


def _stage_shapes(variant):
    with torch.device("meta"):
        model = SamHQ2Model(SamHQ2Config.from_variant(variant))
        return model.vision_encoder.backbone(torch.empty(1, 3, 1024, 1024))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb_(SamHQ2Model(our_config(small_hiera("hiera_t"))), seed=1).eval()


def test_prompt_tokens_follow_sam2_layout(model):
    """Box corners (labels 2, 3) first, then the points, then one not-a-point token; -10 pads to zero; by hand."""
    enc, pe = model.prompt_encoder, model.shared_image_embedding.positional_embedding
    size = model.config.image_size

    def fourier(xy):  # SAM's random Fourier features of a pixel position, (x + 0.5, y + 0.5) / size
        p = (2 * ((torch.tensor(xy) + 0.5) / size) - 1) @ pe * 2 * math.pi
        return torch.cat([p.sin(), p.cos()])

    box = torch.tensor([[[10.0, 20.0, 100.0, 120.0]]])
    points, labels = torch.tensor([[[[50.0, 60.0], [7.0, 9.0], [0.0, 0.0]]]]), torch.tensor([[[0, 1, -10]]])
    sparse, dense = model.get_prompt_embeddings(points, labels, box)
    w = [e.weight[0] for e in enc.point_embed]
    expected = torch.stack([fourier([10.0, 20.0]) + w[2], fourier([100.0, 120.0]) + w[3], fourier([50.0, 60.0]) + w[0],
                            fourier([7.0, 9.0]) + w[1], torch.zeros(256), enc.not_a_point_embed.weight[0]])
    assert sparse.shape == (1, 1, 6, 256)
    assert torch.allclose(sparse[0, 0], expected, atol=1e-5)
    assert dense.shape == (1, 1, 256, 16, 16) and torch.equal(dense[0, 0, :, 3, 5], enc.no_mask_embed.weight[0])
    box_only, _ = model.get_prompt_embeddings(input_boxes=box)
    assert torch.allclose(box_only[0, 0], expected[[0, 1, 5]], atol=1e-5)
    mask_only, dense = model.get_prompt_embeddings(input_masks=torch.zeros(1, 2, 64, 64))
    assert mask_only.shape == (1, 2, 0, 256) and dense.shape == (1, 2, 256, 16, 16)


def test_positional_embedding_is_shared(model):
    assert model.shared_image_embedding is model.prompt_encoder.shared_embedding
    assert model.no_mem_embed is model.no_memory_embedding


def test_hq_token_changes_only_with_hq(model):
    """Turning HQ off removes the HQ token from the transformer: the SAM tokens' masks change, K drops to 4."""
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    emb, high_res = model.get_image_embeddings(x)
    pts = torch.tensor([[[[30.0, 40.0]]]])
    with_hq, iou_hq, _ = model.predict_all(emb, high_res, input_points=pts)
    model.hq_enabled = False
    try:
        plain, iou, _ = model.predict_all(emb, high_res, input_points=pts)
        out = model(image_embeddings=emb, high_res_features=high_res, input_points=pts, multimask_output=True)
    finally:
        model.hq_enabled = True
    assert with_hq.shape[2] == 5 and plain.shape[2] == 4
    assert not torch.allclose(with_hq[:, :, :4], plain)
    assert torch.equal(out.pred_masks, plain[:, :, 1:]) and torch.equal(out.iou_scores, iou[:, :, 1:])
    sam_hq = model(image_embeddings=emb, high_res_features=high_res, input_points=pts, multimask_output=True)
    assert torch.allclose(sam_hq.pred_masks, with_hq[:, :, 1:4] + with_hq[:, :, 4:])
    hq_only = model(image_embeddings=emb, high_res_features=high_res, input_points=pts, hq_token_only=True)
    assert torch.equal(hq_only.pred_masks, with_hq[:, :, 4:]) and hq_only.iou_scores.shape == (1, 1, 3)


def test_input_errors(model):
    emb, high_res = model.get_image_embeddings(torch.zeros(1, 3, 256, 256))
    with pytest.raises(ValueError, match=r"\(B, 3, 256, 256\)"):
        model(pixel_values=torch.zeros(1, 3, 200, 256))
    with pytest.raises(ValueError, match="exactly one"):
        model(pixel_values=torch.zeros(1, 3, 256, 256), image_embeddings=emb)
    with pytest.raises(ValueError, match="input_points"):
        model(image_embeddings=emb, high_res_features=high_res, input_points=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="high_res_features"):
        model.predict_all(emb, None, input_points=torch.zeros(1, 1, 1, 2))
    with pytest.raises(ValueError, match="2 images"):
        model.predict_all(emb.expand(3, -1, -1, -1), high_res, input_points=torch.zeros(2, 1, 1, 2))
    with pytest.raises(TypeError, match="unexpected"):
        model(image_embeddings=emb, high_res_features=high_res, input_points=torch.zeros(1, 1, 1, 2), bogus=1)
    model.hq_enabled = False
    try:
        with pytest.raises(ValueError, match="hq_token_only"):
            model(image_embeddings=emb, high_res_features=high_res, input_points=torch.zeros(1, 1, 1, 2), hq_token_only=True)
    finally:
        model.hq_enabled = True
