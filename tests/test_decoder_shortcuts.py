"""The decoder's exact shortcuts give the plain computation's numbers (fp32 rounding only).

- `Attention.to_image` / `from_image` with few tokens never project the image tokens; compared with
  `Attention.forward` (q, k, v projections of every token, then attention).
- The per-image decoder context (`SamHQModel.decoder_context`), reused by the predictor for every
  prompt without a mask input, against decoding without it.
"""
import numpy as np
import pytest
import torch

from conftest import random_model

from samhq.modeling.two_way_transformer import Attention
from samhq.predictor import SamHQPredictor

NO_GRAD = True


def close(got, want, rel=1e-5):
    """Equal up to fp32 rounding: max |difference| within `rel` of the largest |value|."""
    assert got.shape == want.shape
    assert (got - want).abs().max() <= rel * want.abs().max()


def attention(seed=0, dim=64, heads=4, rate=2):
    torch.manual_seed(seed)
    a = Attention(dim, heads, rate)
    for p in a.parameters():
        p.data.normal_(0, 0.3)
    return a


@pytest.mark.parametrize("t", [1, 5, 7])
def test_to_image_without_projecting_the_image(t):
    a = attention()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, t, 64, generator=g)
    k, v = torch.randn(2, 3, 100, 64, generator=g), torch.randn(2, 3, 100, 64, generator=g)
    assert t < a.head_dim  # the shortcut applies
    close(a.to_image(q, k, v), a(q, k, v))


@pytest.mark.parametrize("t", [1, 5, 7])
def test_from_image_without_projecting_the_image(t):
    a = attention(2)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 100, 64, generator=g)
    k, v = torch.randn(2, 3, t, 64, generator=g), torch.randn(2, 3, t, 64, generator=g)
    close(a.from_image(q, k, v), a(q, k, v))


def test_many_tokens_use_the_plain_path():
    a = attention(4)
    g = torch.Generator().manual_seed(5)
    q, kv = torch.randn(1, 2, 100, 64, generator=g), torch.randn(1, 2, a.head_dim, 64, generator=g)
    torch.testing.assert_close(a.from_image(q, kv, kv), a(q, kv, kv), rtol=0, atol=0)


def test_shared_image_projections():
    """One image's projections shared by P prompts, as the decoder context gives them."""
    a = attention(6)
    g = torch.Generator().manual_seed(7)
    image = torch.randn(2, 1, 100, 64, generator=g)
    tokens = torch.randn(2, 3, 5, 64, generator=g)
    heads = lambda x: a._heads(x)[:, 0].contiguous()  # noqa: E731  (B, 1, HW, inner) -> (B, heads, HW, d)
    full = image.expand(2, 3, 100, 64)
    close(a.to_image(tokens, None, None, (heads(a.k_proj(image)), heads(a.v_proj(image)))), a(tokens, full, full))
    close(a.from_image(None, tokens, tokens, heads(a.q_proj(image))), a(full, tokens, tokens))


@pytest.fixture(scope="module")
def model():
    return random_model(seed=11)


def test_decoder_context_gives_the_same_masks(model):
    g = torch.Generator().manual_seed(0)
    emb, inter = model.get_image_embeddings(torch.randn(1, 3, 1024, 1024, generator=g))
    hq = model.compute_hq_features(emb, inter)
    ctx = model.decoder_context(emb)
    points = torch.rand(1, 4, 2, 2, generator=g) * 1024
    labels = torch.tensor([[[1, 0], [1, 1], [0, 1], [1, -1]]])
    boxes = torch.tensor([[[10.0, 20, 500, 600], [300, 300, 900, 700], [0, 0, 1023, 1023], [600, 50, 700, 900]]])
    for prompts in (dict(input_points=points, input_labels=labels), dict(input_boxes=boxes),
                    dict(input_points=points, input_labels=labels, input_boxes=boxes)):
        plain, plain_iou = model.predict_all(emb, hq, **prompts)
        fast, fast_iou = model.predict_all(emb, hq, **prompts, context=ctx)
        close(fast, plain)
        close(fast_iou, plain_iou)
    # a mask input changes the decoder's image tokens: the context is not used then
    masks = torch.randn(1, 4, 256, 256, generator=g)
    a, _ = model.predict_all(emb, hq, input_boxes=boxes, input_masks=masks)
    b, _ = model.predict_all(emb, hq, input_boxes=boxes, input_masks=masks, context=ctx)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_predictor_context_follows_the_image(model):
    rng = np.random.default_rng(0)
    p = SamHQPredictor(model)
    p.set_image((rng.random((300, 400, 3)) * 255).astype(np.uint8))
    first = p.decoder_context()
    assert p.decoder_context() is first
    other = SamHQPredictor(model)
    other.set_image((rng.random((300, 400, 3)) * 255).astype(np.uint8))
    p.features, p.hq_features = other.features, other.hq_features  # assigned directly, as some segment_anything code does
    assert p.decoder_context() is not first
    box = np.array([50, 40, 250, 200])
    torch.testing.assert_close(torch.as_tensor(p.predict(box=box, return_logits=True)[0]),
                               torch.as_tensor(other.predict(box=box, return_logits=True)[0]))
