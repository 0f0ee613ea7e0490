"""Tiled segmentation of images larger than the model input (samhq.tiles), on the bundled demo model.

The demo model's input is 256 px, so tiles are 256 px with 64 px of overlap (the defaults) and a
640-px image has 3x3 level-0 windows at 0, 192 and 384 px, a 2x2 level and the whole image on top.
"""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch.nn import functional as F

from samhq import SamHQModel, SamHQPredictor
from samhq.checkpoints import BUNDLED
from samhq.masks import crop_to_rle, mask_to_rle
from samhq.tiles import (
    TiledMaskGenerator,
    TiledPredictor,
    TilePiece,
    Window,
    as_source,
    merge_tile_masks,
    pyramid_levels,
    resize_region,
    tile_windows,
)

NO_GRAD = True
NAME = "samhq-tiny-shapes"
needs_demo = pytest.mark.skipif(not (BUNDLED[NAME] / "model.safetensors").exists(),
                                reason="the demo model is not in this checkout")


def scene(height, width, shapes, seed=0):
    """A noisy grey image with solid shapes drawn on it: (image (H, W, 3) uint8, [mask (H, W) bool per shape])."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.normal(120, 10, (height, width, 3)).clip(0, 255).astype(np.uint8))
    draw, masks = ImageDraw.Draw(image), []
    for kind, box, colour in shapes:
        getattr(draw, kind)(box, fill=colour)
        m = Image.new("L", (width, height))
        getattr(ImageDraw.Draw(m), kind)(box, fill=255)
        masks.append(np.asarray(m) > 127)
    return np.asarray(image), masks


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def centre(mask):
    ys, xs = np.nonzero(mask)
    return np.array([[xs.mean(), ys.mean()]])


@pytest.fixture(scope="module")
def demo():
    return SamHQModel.from_pretrained(NAME).eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # many small tiles: one thread is as fast, and far faster on a busy machine
    yield
    torch.set_num_threads(old)


class CountingEncoder:
    """Wraps model.get_image_embeddings to count encoder runs (independently of the predictor's own counter)."""

    def __init__(self, model):
        self.model, self.calls, self.inner = model, 0, model.get_image_embeddings

    def __enter__(self):
        def counted(*a, **k):
            self.calls += 1
            return self.inner(*a, **k)

        self.model.get_image_embeddings = counted
        return self

    def __exit__(self, *exc):
        del self.model.get_image_embeddings


# ---------------------------------------------------------------------------------------------
# Geometry, no model


@pytest.mark.parametrize("h,w,tile,overlap",
                         [(640, 640, 256, 64), (300, 1000, 256, 0), (200, 150, 256, 64), (1000, 777, 128, 64)])
def test_windows_cover_the_image_and_cores_partition_it(h, w, tile, overlap):
    for level in range(pyramid_levels(h, w, tile)):
        wins = tile_windows(h, w, tile, overlap, level)
        cover, cores = np.zeros((h, w), int), np.zeros((h, w), int)
        size = tile << level
        for win in wins:
            x0, y0, x1, y1 = win.box
            assert x1 - x0 == min(size, w) and y1 - y0 == min(size, h)  # full-sized unless the image is smaller
            assert win.cut == (x0 > 0, y0 > 0, x1 < w, y1 < h)
            cover[y0:y1, x0:x1] += 1
            cx0, cy0, cx1, cy1 = win.core
            assert x0 <= cx0 < cx1 <= x1 and y0 <= cy0 < cy1 <= y1
            cores[cy0:cy1, cx0:cx1] += 1
        assert (cover >= 1).all() and (cores == 1).all()
    top = tile_windows(h, w, tile, overlap, pyramid_levels(h, w, tile) - 1)
    assert [t.box for t in top] == [(0, 0, w, h)]


def test_resize_region_equals_interpolating_then_cropping():
    rng = np.random.default_rng(0)
    for in_size, out_size in [((64, 48), (640, 480)), ((256, 171), (700, 467)), ((50, 50), (51, 77))]:
        x = torch.from_numpy(rng.normal(size=(2, *in_size)).astype(np.float32))
        full = F.interpolate(x[None], out_size, mode="bilinear", align_corners=False)[0]
        for rows, cols in [((0, out_size[0]), (0, out_size[1])), ((13, min(out_size[0], 60)), (5, 40))]:
            part = resize_region(x, out_size, rows, cols)
            torch.testing.assert_close(part, full[:, rows[0]:rows[1], cols[0]:cols[1]], atol=1e-4, rtol=1e-4)


def test_crop_to_rle_equals_the_full_mask_rle():
    rng = np.random.default_rng(1)
    for _ in range(500):
        h, w = rng.integers(1, 14, 2)
        ch, cw = rng.integers(1, h + 1), rng.integers(1, w + 1)
        y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = rng.random((ch, cw)) < rng.random()
        full = np.zeros((h, w), bool)
        full[y0:y0 + ch, x0:x0 + cw] = crop
        assert crop_to_rle(crop, x0, y0, h, w) == mask_to_rle(torch.from_numpy(full)[None])[0]


def _piece(win, box, touches, score=0.9):
    x0, y0, x1, y1 = box
    return TilePiece(np.ones((y1 - y0, x1 - x0), bool), box, win, score, 0.95, (x0, y0), touches)


def test_merge_joins_cut_pieces_and_drops_duplicates():
    a = Window(0, 0, (0, 0, 100, 100), (False, False, True, False), (0, 0, 90, 100))
    b = Window(0, 1, (80, 0, 180, 100), (True, False, False, False), (90, 0, 180, 100))
    pieces = [
        _piece(a, (50, 10, 100, 40), (False, False, True, False)),  # an object cut by a's right edge ...
        _piece(b, (80, 10, 140, 40), (True, False, False, False)),  # ... and by b's left edge: one object, 50..140
        _piece(a, (84, 60, 96, 70), (False, False, False, False), 0.8),  # a small object in the overlap, seen by both
        _piece(b, (84, 60, 96, 70), (False, False, False, False), 0.9),
        _piece(a, (10, 70, 30, 90), (False, False, False, False)),  # elsewhere
    ]
    objects = merge_tile_masks(pieces)
    boxes = sorted(o["box"] for o in objects)
    assert boxes == [(10, 70, 30, 90), (50, 10, 140, 40), (84, 60, 96, 70)]
    joined = next(o for o in objects if o["box"] == (50, 10, 140, 40))
    assert joined["mask"].all() and joined["pieces"] == 2 and joined["area"] == 90 * 30
    dup = next(o for o in objects if o["box"] == (84, 60, 96, 70))
    assert dup["window"] is b and dup["predicted_iou"] == 0.9  # the better of the two whole views


# ---------------------------------------------------------------------------------------------
# Prompts on the demo model

# objects that each lie in exactly one level-0 window, away from its cut edges
INSIDE = [("ellipse", (40, 40, 130, 110), (220, 60, 40)),  # window (0, 0) only
          ("rectangle", (280, 290, 360, 370), (40, 200, 60)),  # the centre window only
          ("ellipse", (470, 480, 600, 580), (230, 230, 40))]  # window (384, 384) only
CROSSING = [("ellipse", (200, 150, 330, 260), (60, 60, 220)),  # crosses x = 256 and y = 192
            ("rectangle", (100, 390, 500, 540), (200, 40, 200))]  # 400 px wide: no 256-px window can hold it


@needs_demo
def test_objects_inside_one_tile_get_the_tile_alone_mask(demo):
    image, masks = scene(640, 640, INSIDE)
    tp = TiledPredictor(demo)
    tp.set_image(image)
    plain = SamHQPredictor(demo)
    for gt in masks:
        box, pt = tight_box(gt), centre(gt)
        win = next(w for w in tp.windows[0]
                   if w.box[0] <= box[0] and w.box[1] <= box[1] and box[2] <= w.box[2] and box[3] <= w.box[3])
        x0, y0, x1, y1 = win.box
        plain.set_image(image[y0:y1, x0:x1])
        off = np.array([x0, y0])
        for prompt in (dict(box=box), dict(point_coords=pt, point_labels=[1])):
            masks_t, scores_t, low_t = tp.predict(**prompt)
            local = dict(box=box - np.tile(off, 2)) if "box" in prompt else dict(point_coords=pt - off, point_labels=[1])
            masks_p, scores_p, low_p = plain.predict(**local)
            assert tp.last_window == win
            expected = np.zeros((640, 640), bool)
            expected[y0:y1, x0:x1] = masks_p[0]
            assert np.array_equal(masks_t[0], expected)
            np.testing.assert_array_equal(scores_t, scores_p)
            np.testing.assert_array_equal(low_t, low_p)
            assert iou(masks_t[0], gt) > 0.8  # and the demo model finds the object


@needs_demo
def test_batched_prompts_equal_one_at_a_time(demo):
    image, masks = scene(640, 640, INSIDE + CROSSING)
    tp = TiledPredictor(demo)
    tp.set_image(image)
    boxes = np.stack([tight_box(m) for m in masks])
    batch, scores, low = tp.predict_torch(boxes=boxes)
    assert batch.shape == (len(masks), 1, 640, 640) and scores.shape == (len(masks), 1)
    for i, b in enumerate(boxes):
        one, s, _ = tp.predict(box=b)
        assert np.array_equal(batch[i, 0].numpy(), one[0]) and abs(scores[i, 0].item() - s[0]) < 1e-6
    masks_only, scores_only, none = tp.predict_torch(boxes=boxes, return_low_res=False)  # the predictor's keyword
    assert none is None and torch.equal(masks_only, batch) and torch.equal(scores_only, scores)


@needs_demo
@pytest.mark.parametrize("prompt, refine", [("box", "box"), ("point", "box"), ("box", "box+mask")])
def test_objects_crossing_borders_come_out_whole(demo, prompt, refine):
    image, masks = scene(640, 640, CROSSING)
    tp = TiledPredictor(demo, refine=refine)
    tp.set_image(image)
    # a point on the 400-px rectangle is not tried: a 256-px window around it sees only its flat inside
    for gt in masks if prompt == "box" else masks[:1]:
        if prompt == "box":
            region = tp.predict_regions(boxes=tight_box(gt)[None])[0]
        else:
            region = tp.predict_regions(point_coords=centre(gt)[None], point_labels=np.ones((1, 1)))[0]
        mask = region.to_full(640, 640)
        assert region.window.level > 0 and region.refined_tiles > 0  # decoded on the pyramid, refined on the tiles
        assert iou(mask, gt) >= 0.7, (prompt, tight_box(gt), iou(mask, gt))
    wide = tp.predict_regions(boxes=tight_box(masks[1])[None])[0]
    assert wide.box[2] - wide.box[0] > 256 + 64  # wider than any level-0 window: nothing clipped at a tile edge


@needs_demo
def test_top_level_without_refinement_is_the_plain_predictor(demo):
    image, masks = scene(640, 640, CROSSING)
    tp = TiledPredictor(demo, refine=None)
    tp.set_image(image)
    box = np.array([20, 20, 620, 620.0])  # only the top level's window holds it
    m_t, s_t, low_t = tp.predict(box=box)
    plain = SamHQPredictor(demo)
    plain.set_image(image)
    m_p, s_p, low_p = plain.predict(box=box)
    assert tp.last_window.level == len(tp.windows) - 1
    np.testing.assert_allclose(s_t, s_p, rtol=1e-6)
    np.testing.assert_allclose(low_t, low_p, rtol=1e-5, atol=1e-5)
    assert (m_t[0] != m_p[0]).sum() <= 5  # the same upscaling, computed on the mask's region only (float rounding)
    m_f, s_f, none = tp.predict(box=box, return_low_res=False)  # the plain predictor's keyword, the same answer
    assert none is None and (m_f == m_t).all() and (s_f == s_t).all()


@needs_demo
def test_mask_inputs_in_the_image_frame_and_from_a_previous_call(demo):
    image, masks = scene(640, 640, INSIDE)
    tp = TiledPredictor(demo)
    tp.set_image(image)
    gt = masks[1]
    m1, _, low = tp.predict(box=tight_box(gt))
    win = tp.last_window
    m2, _, _ = tp.predict(box=tight_box(gt), mask_input=low)  # low-res logits: reused on the same window
    assert tp.last_window == win and iou(m2[0], gt) > 0.8
    m3, _, _ = tp.predict(mask_input=gt)  # an image-frame mask alone
    assert tp.last_window == win and iou(m3[0], gt) > 0.5
    with pytest.raises(ValueError, match="x1 >= x0"):
        tp.predict(box=np.array([300, 300, 200, 400]))
    with pytest.raises(ValueError, match="mask_input must be"):
        tp.predict(mask_input=np.zeros((10, 10)))


# ---------------------------------------------------------------------------------------------
# Embeddings: memory, disk store


@needs_demo
def test_store_round_trip_gives_identical_masks_without_re_embedding(demo, tmp_path):
    pytest.importorskip("zarr")
    image, masks = scene(640, 640, INSIDE + CROSSING)
    boxes = np.stack([tight_box(m) for m in masks])
    store = tmp_path / "emb.zarr"
    with CountingEncoder(demo) as enc:
        first = TiledPredictor(demo)
        first.set_image(image, store=store)
        before = first.predict_torch(boxes=boxes)
        made = enc.calls
        assert made == first.encoder_calls > 0
    with CountingEncoder(demo) as enc:
        again = TiledPredictor(demo)
        again.set_image(image, store=store)
        after = again.predict_torch(boxes=boxes)
        assert enc.calls == 0
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    # another image of the same size: refused when a stored window is used
    other, _ = scene(640, 640, INSIDE, seed=5)
    third = TiledPredictor(demo)
    third.set_image(other, store=store)
    with pytest.raises(ValueError, match="other pixels"):
        third.predict(box=boxes[0])
    # another tiling or another model: refused when opened
    with pytest.raises(ValueError, match="overlap"):
        TiledPredictor(demo, overlap=32).set_image(image, store=store)
    from conftest import random_model

    with pytest.raises(ValueError, match="another model"):
        TiledPredictor(random_model(image_size=256)).set_image(image, store=store)
    TiledPredictor(demo, overlap=32).set_image(image, store=store, overwrite_store=True)  # unless asked


@needs_demo
def test_eager_embedding_and_the_memory_limit(demo):
    image, masks = scene(640, 640, INSIDE)
    with CountingEncoder(demo) as enc:
        tp = TiledPredictor(demo, embed="eager")
        tp.set_image(image)
        assert enc.calls == sum(len(level) for level in tp.windows) == 9 + 4 + 1
        tp.predict(box=tight_box(masks[0]))
        assert enc.calls == 14  # nothing more
    one = tp.cache.nbytes // 14
    small = TiledPredictor(demo, cache_bytes=int(1.5 * one))
    small.set_image(image)
    for _ in range(2):
        small.predict(box=tight_box(masks[0]))
        small.predict(box=tight_box(masks[2]))
    assert small.encoder_calls == 4 and small.cache.nbytes <= 1.5 * one  # one embedding kept: every switch re-embeds


# ---------------------------------------------------------------------------------------------
# Everything mode

# with 128 px of overlap a 384-px image has 2x2 windows at 0 and 128 px sharing [128, 256)
OVERLAP_SCENE = [("ellipse", (140, 20, 240, 100), (220, 60, 40)),  # in windows (0, 0) and (128, 0)
                 ("ellipse", (150, 150, 235, 235), (40, 200, 60)),  # in all four
                 ("ellipse", (40, 280, 340, 370), (60, 60, 220)),  # 300 px wide: cut in both windows that hold it
                 ("rectangle", (280, 20, 360, 100), (230, 230, 40))]  # in (128, 0) only


@needs_demo
def test_everything_mode_has_no_duplicates_across_overlaps(demo):
    from samhq.masks import rle_to_mask

    image, masks = scene(384, 384, OVERLAP_SCENE)
    gen = TiledMaskGenerator(demo, overlap=128, points_per_side=8, pred_iou_thresh=0.8, stability_score_thresh=0.9,
                             output_mode="uncompressed_rle")
    pieces = gen.tile_pieces(as_source(image))

    def matches(masks_, gt):
        return sum(iou(m, gt) > 0.5 for m in masks_)

    per_window = {}
    for p in pieces:
        m = np.zeros((384, 384), bool)
        m[p.box[1]:p.box[3], p.box[0]:p.box[2]] = p.mask
        per_window.setdefault(p.window.index, []).append(m)
    # the windows' own masks: the shared objects come out in several windows, the wide one only in pieces
    naive = [m for ms in per_window.values() for m in ms]
    assert matches(naive, masks[1]) >= 4 and matches(naive, masks[0]) >= 2
    assert max(iou(m, masks[2]) for m in naive) < 0.8

    records = gen.generate(image)
    out = [rle_to_mask(r["segmentation"]) for r in records]
    for i, gt in enumerate(masks):
        assert max(iou(m, gt) for m in out) >= 0.9, i  # found whole (the wide one joined from its pieces)
        # no more masks of it than a single window's generator gives (the generator's own near-duplicates stay)
        assert matches(out, gt) <= max(matches(ms, gt) for ms in per_window.values()), i
    assert matches(out, masks[1]) < matches(naive, masks[1])
    for r, m in zip(records, out):
        ys, xs = np.nonzero(m)
        assert r["area"] == m.sum()
        assert r["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]  # the generator's convention
