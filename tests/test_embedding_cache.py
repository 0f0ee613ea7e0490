"""The one cache of image embeddings (samhq.predictor.EmbeddingCache) and its three users: the server, the
Label Studio backend and the tiled predictor. Bounds by count and by bytes, least recently used first."""
import numpy as np
import pytest
import torch

from samhq.predictor import EmbeddingCache, ImageEmbedding, SamHQPredictor, embedding_bytes

NO_GRAD = True


def emb(n_floats: int) -> ImageEmbedding:
    return ImageEmbedding({"features": torch.zeros(1, n_floats)}, (4, 4), (4, 4), 16, "x")


def test_count_bound_drops_the_least_recently_used():
    c = EmbeddingCache(max_items=2)
    c.put("a", emb(1))
    c.put("b", emb(1))
    assert c.get("a") is not None  # a used: b is now the oldest
    c.put("c", emb(1))
    assert "b" not in c and "a" in c and "c" in c and len(c) == 2
    c.put("a", emb(1))  # putting again is a use too
    c.put("d", emb(1))
    assert sorted(c.items) == ["a", "d"]
    assert c.get("zzz", "default") == "default"


def test_byte_bound_counts_every_tensor_and_keeps_the_newest():
    one = embedding_bytes(emb(100))
    assert one == 400  # float32
    two_tensors = ImageEmbedding({"features": torch.zeros(1, 100), "early_features": torch.zeros(50, dtype=torch.float16)},
                                 (4, 4), (4, 4), 16, "x")
    assert embedding_bytes(two_tensors) == 400 + 100
    c = EmbeddingCache(max_bytes=2 * one + 10)
    for k in "abc":
        c.put(k, emb(100))
    assert list(c.items) == ["b", "c"] and c.nbytes == 2 * one
    c.put("huge", emb(10_000))  # alone over the bound: kept, everything older dropped
    assert list(c.items) == ["huge"] and c.nbytes == embedding_bytes(emb(10_000))
    assert c.pop("huge") is not None and c.nbytes == 0 and len(c) == 0


def test_objects_with_nbytes_and_both_bounds():
    class Pixels:
        def __init__(self, n):
            self.nbytes = n

    c = EmbeddingCache(max_items=3, max_bytes=100)
    c.put(1, Pixels(40))
    c.put(2, Pixels(40))
    c.put(3, Pixels(40))  # 120 bytes: 1 goes
    assert list(c.items) == [2, 3] and c.nbytes == 80
    c.put(4, Pixels(1))
    c.put(5, Pixels(1))  # 4 items: 2 goes by count
    assert list(c.items) == [3, 4, 5] and c.nbytes == 42
    with pytest.raises(ValueError, match="max_items"):
        EmbeddingCache(max_items=0)
    with pytest.raises(ValueError, match="max_bytes"):
        EmbeddingCache(max_bytes=-1)


def test_the_label_studio_predictor_embeds_each_image_once_and_matches_the_plain_predictor():
    from samhq.label_studio import CachedEmbeddingPredictor
    from samhq.modeling.model import SamHQModel

    model = SamHQModel.from_pretrained("samhq-tiny-shapes").eval()
    cached, plain = CachedEmbeddingPredictor(model, max_images=2), SamHQPredictor(model)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 50, 3), dtype=np.uint8) for _ in range(3)]
    for image in images[:2] + images[:2]:
        cached.set_image(image)
    assert cached.embedded == 2 and len(cached.embeddings) == 2
    cached.set_image(images[2])  # the least recently used (images[0]) is dropped
    cached.set_image(images[1])
    assert cached.embedded == 3
    cached.set_image(images[0])
    assert cached.embedded == 4
    plain.set_image(images[0])
    a, sa, _ = cached.predict(point_coords=np.array([[10, 10]]), point_labels=np.array([1]))
    b, sb, _ = plain.predict(point_coords=np.array([[10, 10]]), point_labels=np.array([1]))
    assert np.array_equal(a, b) and np.allclose(sa, sb)


def test_tiled_predictors_share_one_cache_by_key():
    from samhq.modeling.model import SamHQModel
    from samhq.tiles import TiledPredictor

    model = SamHQModel.from_pretrained("samhq-tiny-shapes").eval()
    shared = EmbeddingCache(max_bytes=2**30)
    tp = TiledPredictor(model, cache=shared)
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 255, (300, 400, 3), dtype=np.uint8) for _ in range(2))
    tp.set_image(a, key="a")
    m1, _, _ = tp.predict(box=np.array([10, 10, 80, 90]))
    n = tp.encoder_calls
    tp.set_image(b, key="b")
    tp.predict(box=np.array([10, 10, 80, 90]))
    tp.set_image(a, key="a")  # a's windows are still in the shared cache: nothing is embedded again
    before = tp.encoder_calls
    m2, _, _ = tp.predict(box=np.array([10, 10, 80, 90]))
    assert tp.encoder_calls == before and n >= 1
    assert np.array_equal(m1, m2)
    assert {k[0] for k in shared.items} == {"a", "b"}
