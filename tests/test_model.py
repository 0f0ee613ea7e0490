"""Model-level behaviour: shapes, batching invariants, transformers' call conventions, bad inputs."""
import pytest
import torch

from samhq import SamHQVisionModel, select_masks
from samhq.modeling.common import rel_pos_table
from samhq.modeling.image_encoder import window_partition, window_unpartition

NO_GRAD = True  # conftest runs this module's tests without autograd


@pytest.fixture(scope="module")
def setup():
    from conftest import random_model

    model = random_model()
    pixels = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    emb, inter = model.get_image_embeddings(pixels)
    return model, pixels, emb, inter


def test_output_shapes_follow_the_seed(setup):
    model, _, emb, inter = setup
    points = torch.rand(2, 3, 4, 2) * 1024
    out = model(image_embeddings=emb, intermediate_embeddings=inter, input_points=points)
    assert out.iou_scores.shape == (2, 3, 3) and out.pred_masks.shape == (2, 3, 3, 256, 256)
    assert (out.iou_scores[..., :-1] >= out.iou_scores[..., 1:]).all()  # sorted by predicted IoU
    single = model(image_embeddings=emb, intermediate_embeddings=inter, input_points=points, multimask_output=False)
    assert single.pred_masks.shape == (2, 3, 1, 256, 256)
    hq = model(image_embeddings=emb, intermediate_embeddings=inter, input_points=points, hq_token_only=True)
    assert hq.pred_masks.shape == (2, 3, 1, 256, 256) and hq.iou_scores.shape == (2, 3, 3)
    assert out["pred_masks"] is out.pred_masks and out[0] is out.iou_scores and list(out) == ["iou_scores", "pred_masks"]


def test_batch_equals_one_by_one(setup):
    """Two images x two prompts at once equal each image and prompt on its own."""
    model, _, emb, inter = setup
    boxes = torch.tensor([[[10.0, 20, 500, 600], [300, 300, 900, 1000]], [[0.0, 0, 1023, 1023], [50, 60, 70, 80]]])
    both = model(image_embeddings=emb, intermediate_embeddings=inter, input_boxes=boxes)
    for b in range(2):
        for p in range(2):
            one = model(image_embeddings=emb[b : b + 1], intermediate_embeddings=[t[b : b + 1] for t in inter],
                        input_boxes=boxes[b : b + 1, p : p + 1])
            torch.testing.assert_close(both.pred_masks[b, p], one.pred_masks[0, 0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(both.iou_scores[b, p], one.iou_scores[0, 0], rtol=1e-4, atol=1e-5)


def test_pixels_and_embeddings_paths_agree(setup):
    model, pixels, emb, inter = setup
    pts = torch.tensor([[[[100.0, 100.0]]], [[[800.0, 300.0]]]])
    a = model(pixel_values=pixels, input_points=pts)
    b = model(image_embeddings=emb, intermediate_embeddings=inter, input_points=pts)
    torch.testing.assert_close(a.pred_masks, b.pred_masks)


def test_padding_points_embed_to_zero_tokens(setup):
    """A point labelled -10 (the processor's padding) becomes an all-zero token, as in the seed;
    transformers parity with a padded point is checked in test_transformers_compat."""
    model = setup[0]
    points = torch.tensor([[[100.0, 200.0], [400.0, 500.0], [0.0, 0.0]]])
    emb = model.prompt_encoder.embed_points(points, torch.tensor([[1, 0, -10]]), pad=False)
    assert torch.count_nonzero(emb[0, 2]) == 0 and torch.count_nonzero(emb[0, :2]) > 0


def test_per_prompt_mask_inputs(setup):
    model, _, emb, inter = setup
    pts = torch.rand(1, 2, 1, 2) * 1024
    masks = torch.randn(1, 2, 256, 256)
    both = model(image_embeddings=emb[:1], intermediate_embeddings=[t[:1] for t in inter], input_points=pts, input_masks=masks)
    for p in range(2):
        one = model(image_embeddings=emb[:1], intermediate_embeddings=[t[:1] for t in inter], input_points=pts[:, p : p + 1],
                    input_masks=masks[:, p : p + 1])
        torch.testing.assert_close(both.pred_masks[0, p], one.pred_masks[0, 0], rtol=1e-4, atol=1e-4)


def test_processor_keys_are_accepted_and_unknown_keys_refused(setup):
    model, _, emb, inter = setup
    pts = torch.rand(2, 1, 1, 2) * 1024
    model(image_embeddings=emb, intermediate_embeddings=inter, input_points=pts,
          original_sizes=torch.tensor([[10, 10]]), reshaped_input_sizes=torch.tensor([[10, 10]]))
    with pytest.raises(TypeError, match="unexpected arguments: \\['input_pointz'\\]"):
        model(image_embeddings=emb, intermediate_embeddings=inter, input_pointz=pts)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_points=torch.rand(1, 2, 2)), r"input_points must be \(batch, point_batch, points, 2\)"),
        (dict(input_points=torch.rand(2, 1, 2, 2), input_labels=torch.ones(2, 1, 3)), "input_labels shape"),
        (dict(input_points=torch.full((2, 1, 1, 2), float("nan"))), "NaN or infinite"),
        (dict(input_boxes=torch.rand(2, 4)), r"input_boxes must be \(batch, boxes, 4\)"),
        (dict(input_boxes=torch.tensor([[[0.0, 0, float("inf"), 5]]] * 2)), "NaN or infinite"),
        (dict(input_points=torch.rand(2, 2, 1, 2), input_boxes=torch.rand(2, 3, 4)), "must agree"),
        (dict(input_masks=torch.rand(2, 1, 64, 64)), r"input_masks must be \(batch, 1 or prompts, 256, 256\)"),
    ],
)
def test_bad_prompts_give_clear_errors(setup, kwargs, message):
    model, _, emb, inter = setup
    with pytest.raises(ValueError, match=message):
        model(image_embeddings=emb, intermediate_embeddings=inter, **kwargs)


def test_bad_images_and_missing_features(setup):
    model, _, emb, _ = setup
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(B, 3, 1024, 1024\)"):
        model(pixel_values=torch.rand(1, 3, 512, 512))
    with pytest.raises(ValueError, match="exactly one of pixel_values and image_embeddings"):
        model()
    with pytest.raises(ValueError, match="intermediate_embeddings"):
        model(image_embeddings=emb)
    with pytest.raises(TypeError, match="SamHQProcessor"):
        SamHQVisionModel(model.config)(pixel_values=[[0.0]])


def test_select_masks_by_hand():
    masks = torch.arange(5.0).view(1, 1, 5, 1, 1).expand(1, 1, 5, 2, 2)  # token i has value i
    iou = torch.tensor([[[0.9, 0.1, 0.7, 0.3]]])
    m, s = select_masks(masks, iou, True, False, "sorted")
    assert m[0, 0, :, 0, 0].tolist() == [2 + 4, 3 + 4, 1 + 4] and s[0, 0].tolist() == pytest.approx([0.7, 0.3, 0.1])
    m, s = select_masks(masks, iou, True, False, "best")
    assert m[0, 0, :, 0, 0].tolist() == [6] and s[0, 0].tolist() == pytest.approx([0.7])
    m, s = select_masks(masks, iou, False, True, "best")
    assert m[0, 0, :, 0, 0].tolist() == [4] and s[0, 0].tolist() == pytest.approx([0.9])
    with pytest.raises(ValueError, match="mask_selection must be one of sorted, best"):
        select_masks(masks, iou, True, False, "first")
    for old, new in (("seed", "sorted"), ("official", "best")):  # samhq 0.1's names still work, with a warning
        with pytest.warns(DeprecationWarning, match=f"use '{new}'"):
            m, _ = select_masks(masks, iou, True, False, old)
        assert torch.equal(m, select_masks(masks, iou, True, False, new)[0])
    m, s = select_masks(masks, iou, torch.tensor([1.0]), torch.tensor([0.0]), "best")  # an exported graph's switches
    assert m[0, 0, :, 0, 0].tolist() == [6] and s[0, 0].tolist() == pytest.approx([0.7])
    m, s = select_masks(masks, iou, torch.tensor(False), torch.tensor(True), "best")
    assert m[0, 0, :, 0, 0].tolist() == [4] and s[0, 0].tolist() == pytest.approx([0.9])
    m, s = select_masks(masks, iou, True, False, "best", sam_token_only=True)
    assert m[0, 0, :, 0, 0].tolist() == [2] and s[0, 0].tolist() == pytest.approx([0.7])


def test_best_score_bounds_the_selected_scores():
    """best_score (from the IoUs alone) = the largest score select_masks returns; an upper bound under SAM 2's
    dynamic selection, which looks at the masks."""
    from samhq.modeling.mask_selection import best_score

    g = torch.Generator().manual_seed(0)
    masks, iou = torch.randn(2, 6, 5, 8, 8, generator=g), torch.rand(2, 6, 4, generator=g)
    for multimask in (True, False):
        for selection in ("sorted", "best", "token_order"):
            scores = select_masks(masks, iou, multimask, False, selection)[1]
            assert torch.equal(best_score(iou, multimask), scores.amax(-1))
        scores = select_masks(masks, iou, multimask, False, "token_order", stability=(0.05, 0.98))[1]
        bound = best_score(iou, multimask, (0.05, 0.98))
        assert (bound >= scores.amax(-1)).all()
    assert best_score(torch.tensor([0.9, 0.1, 0.7, 0.3]), True).item() == pytest.approx(0.7)
    assert best_score(torch.tensor([0.9, 0.1, 0.7, 0.3]), False).item() == pytest.approx(0.9)
    assert best_score(torch.tensor([0.2, 0.1, 0.7, 0.3]), False, (0.05, 0.98)).item() == pytest.approx(0.7)


def test_window_partition_round_trip_and_rel_pos_table():
    x = torch.randn(2, 30, 17, 5)
    win, padded = window_partition(x, 14)
    assert win.shape == (2 * 3 * 2, 14, 14, 5) and padded == (42, 28)
    assert torch.equal(window_unpartition(win, 14, padded, (30, 17)), x)
    table = torch.arange(7.0)[:, None]  # (2*4-1, 1)
    r = rel_pos_table(4, table)
    assert r[0, 0].item() == 3 and r[3, 0].item() == 6 and r[0, 3].item() == 0  # q - k + 3


@pytest.mark.parametrize("with_masks", [False, True])
def test_many_prompts_decoded_in_chunks_equal_one_pass(setup, monkeypatch, with_masks):
    """More prompts than DECODE_CHUNK (decoded a few at a time on the fast path) give the one-pass results."""
    from samhq.modeling import fast_paths

    model, _, emb, inter = setup
    g = torch.Generator().manual_seed(5)
    p = fast_paths.DECODE_CHUNK * 2 + 3
    kwargs = dict(image_embeddings=emb, intermediate_embeddings=inter, input_points=torch.rand(2, p, 2, 2, generator=g) * 1024)
    if with_masks:
        kwargs["input_masks"] = torch.randn(2, p, 256, 256, generator=g)
    chunked = model(**kwargs)
    monkeypatch.setattr(fast_paths, "DECODE_CHUNK", 10_000)
    whole = model(**kwargs)
    torch.testing.assert_close(chunked.pred_masks, whole.pred_masks, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked.iou_scores, whole.iou_scores, rtol=1e-4, atol=1e-5)
