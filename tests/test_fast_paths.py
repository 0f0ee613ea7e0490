"""Every fast form in `samhq.modeling.fast_paths` gives the plain forward's numbers (fp32 rounding only).

Each switchable part is run twice on the same random, perturbed weights and inputs, once with the
fast path (eval mode, `set_fast_path(True)`) and once plain (`set_fast_path(False)`):
- the two-way transformer (attention between few prompt tokens and many image tokens without projecting the image
  tokens, its rows split between jobs), against `TwoWayTransformer.forward`;
- ViT attention with the blocked relative-position bias, TinyViT's folded batch norms, in-place GELU:
  the encoders' outputs;
- the decoder (prompt chunks, per-prompt upscaling on sub-pixels, the folded and banded HQ branch,
  the shared per-image context): every token's masks and IoU for points, boxes, both and mask inputs;
- the whole model's forward and the predictor's full-size masks;
- the "graph" setting (what the ONNX export traces) against the plain forms.
"""
import numpy as np
import pytest
import torch

from samhq import SamHQConfig, SamHQModel
from samhq.modeling import fast_paths
from samhq.predictor import SamHQPredictor

from conftest import gap_threshold, random_model, torch_threads

NO_GRAD = True


def close(got, want, rel=1e-5):
    """Equal up to fp32 rounding: max |difference| within `rel` of the largest |value|."""
    assert got.shape == want.shape
    assert (got - want).abs().max() <= rel * want.abs().max()


@pytest.mark.parametrize("b,p,t", [(1, 1, 7), (2, 3, 5), (1, 2, 16)])  # 16 tokens = the head width: the plain form
@pytest.mark.parametrize("jobs", [True, False])
def test_transformer(model, monkeypatch, two_threads, b, p, t, jobs):
    """The fast two-way transformer gives TwoWayTransformer.forward's tokens and image tokens: from one image per
    batch entry (its first layer's projections shared through `image_context`, or not) and from one image per prompt
    (a mask input); with jobs on, each phase's rows are split between two jobs whose partial softmax sums are merged."""
    import threading

    tr = model.mask_decoder.transformer
    g = torch.Generator().manual_seed(10 * b + p + t)
    h, w, c = 9, 12, 256
    image = torch.randn(b, 1, c, h, w, generator=g)
    per_prompt = image + torch.randn(b, p, c, h, w, generator=g)
    pe = torch.randn(1, c, h, w, generator=g)
    tokens = torch.randn(b, p, t, c, generator=g)
    monkeypatch.setattr(fast_paths, "PARALLEL_JOBS", jobs)
    spans, rows = [], fast_paths._image_rows
    monkeypatch.setattr(fast_paths, "_image_rows", lambda *a: spans.append((a[-2:], threading.current_thread().name))
                        or rows(*a))
    context = fast_paths.image_context(model.mask_decoder, image[:, 0], pe, torch.zeros(1, 1, c, 1, 1))
    for src, args in ((image, (image, pe)), (image, (None, None, context)), (per_prompt, (per_prompt, pe))):
        want_hs, want_keys = tr(src.expand(b, p, c, h, w).flatten(0, 1), pe, tokens.flatten(0, 1))
        hs, keys = fast_paths._transformer(tr, args[0], args[1], tokens, *args[2:])
        close(hs, want_hs.view(b, p, t, c))
        close(keys, want_keys.view(b, p, h * w, c))
    if t >= 16:
        assert not spans
        return
    half = h * w // 2
    assert sorted({s for s, _ in spans}) == ([(0, half), (half, h * w)] if jobs else [(0, h * w)])
    assert all(name.startswith("samhq-jobs") == jobs for _, name in spans)


def both(model, fn):
    """fn() with the fast path, then with the plain forms; the model is left fast."""
    model.eval().set_fast_path(True)
    fast = fn()
    model.set_fast_path(False)
    try:
        plain = fn()
    finally:
        model.set_fast_path(True)
    return fast, plain


@pytest.fixture(scope="module")
def model():
    return random_model(seed=11)


@pytest.mark.parametrize("vision", [dict(), dict(image_size=320, window_size=7, global_attn_indexes=[0, 2])])
def test_vit_encoder(vision):
    m = random_model(seed=12, **vision)
    s = m.config.vision_config.image_size
    x = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    (emb, inter), (emb0, inter0) = both(m, lambda: m.get_image_embeddings(x))
    close(emb, emb0)
    for a, b in zip(inter, inter0):
        close(a, b)


def test_vit_attention_blocks_cover_every_query_row(monkeypatch):
    """Blocks of query rows smaller than the grid (as at 1024 px) give the whole attention."""
    per_query = 2 * 64 * 64  # the test model: 2 heads, 64x64 tokens
    monkeypatch.setattr(fast_paths, "MAX_BIAS_ELEMENTS", 3 * 64 * per_query)  # at most 3 query rows per block
    monkeypatch.setattr(fast_paths, "MIN_BLOCK_QUERIES", 1)
    assert set(np.diff(fast_paths.bias_blocks(64, 64, per_query)).tolist()) == {2, 3}  # 22 blocks
    m = random_model(seed=13)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    (emb, _), (emb0, _) = both(m, lambda: m.get_image_embeddings(x))
    close(emb, emb0)


@pytest.mark.parametrize("h, w, per_query", [(64, 64, 12 * 4096), (64, 64, 16 * 4096), (64, 64, 2 * 4096),
                                             (14, 14, 25 * 12 * 196), (20, 30, 12 * 600), (128, 128, 16384)])
def test_vit_attention_blocks(h, w, per_query):
    """The query-row blocks cover every row once, differ by at most a row, hold at most MAX_BIAS_ELEMENTS of bias
    unless that would mean blocks under MIN_BLOCK_QUERIES queries, and are as few as those two rules allow."""
    bounds = fast_paths.bias_blocks(h, w, per_query)
    sizes = np.diff(bounds)
    assert bounds[0] == 0 and bounds[-1] == h and sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
    fits = sizes.max() * w * per_query <= fast_paths.MAX_BIAS_ELEMENTS
    assert fits or h * w / len(sizes) >= fast_paths.MIN_BLOCK_QUERIES
    if len(sizes) > 1:  # one block fewer would break a rule
        fewer = -(-h // (len(sizes) - 1))
        assert fewer * w * per_query > fast_paths.MAX_BIAS_ELEMENTS
        assert fits or h * w / (len(sizes) + 1) < fast_paths.MIN_BLOCK_QUERIES


def test_tiny_vit_encoder():
    from official_ref import perturb_

    cfg = SamHQConfig.from_variant("vit_tiny")
    cfg.vision_config.image_size = cfg.prompt_encoder_config.image_size = 256
    m = perturb_(SamHQModel(SamHQConfig(vision_config=cfg.vision_config, prompt_encoder_config=cfg.prompt_encoder_config,
                                        mask_decoder_config=cfg.mask_decoder_config)), seed=5)
    for mod in m.modules():  # batch norms with non-trivial statistics, so folding them is tested
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    (emb, inter), (emb0, inter0) = both(m, lambda: m.get_image_embeddings(x))
    close(emb, emb0)
    close(inter[0], inter0[0])


def _prompts(g, p):
    points = torch.rand(1, p, 2, 2, generator=g) * 1024
    labels = torch.randint(0, 2, (1, p, 2), generator=g)
    labels[0, -1, -1] = -1
    boxes = torch.sort(torch.rand(1, p, 2, 2, generator=g) * 1024, dim=2).values.reshape(1, p, 4)
    return [dict(input_points=points, input_labels=labels), dict(input_boxes=boxes),
            dict(input_points=points, input_labels=labels, input_boxes=boxes),
            dict(input_boxes=boxes, input_masks=torch.randn(1, p, 256, 256, generator=g)),
            dict(input_masks=torch.randn(1, 1, 256, 256, generator=g))]


@pytest.mark.parametrize("p", [3, 11])  # 11 > DECODE_CHUNK: prompts decoded in chunks
@pytest.mark.parametrize("hq", [True, False])
def test_decoder(model, p, hq):
    g = torch.Generator().manual_seed(p)
    emb, inter = model.get_image_embeddings(torch.randn(1, 3, 1024, 1024, generator=g))
    hq_features = model.compute_hq_features(emb, inter) if hq else None
    for prompts in _prompts(g, p):
        def run(prompts=prompts):
            return model.predict_all(emb, hq_features, **prompts, context=model.decoder_context(emb))
        (masks, iou), (masks0, iou0) = both(model, run)
        assert masks.shape[2] == (5 if hq else 4)
        close(masks, masks0)
        close(iou, iou0)


@pytest.mark.parametrize("b", [1, 2])
def test_decoder_skips_the_masks_not_needed(model, monkeypatch, b):
    """`needed` rejects prompts by their IoU: their masks come back NaN and are never computed; every IoU and the
    kept prompts' masks are the full decode's, fast and plain (11 prompts: several chunks; two images: each
    kept prompt reads its own image's HQ features)."""
    g = torch.Generator().manual_seed(30 + b)
    emb, inter = model.get_image_embeddings(torch.randn(b, 3, 1024, 1024, generator=g))
    hq_features = model.compute_hq_features(emb, inter)
    points = torch.rand(b, 11, 1, 2, generator=g) * 1024
    full, iou_full = model.predict_all(emb, hq_features, input_points=points)
    best = iou_full[..., 1:].amax(-1)
    t = gap_threshold(best)
    want = best > t
    assert 0 < want.sum() < want.numel()
    calls = []
    prompt_masks = fast_paths._prompt_bands
    monkeypatch.setattr(fast_paths, "_prompt_bands", lambda *a: calls.append(1) or prompt_masks(*a))

    def run():
        return model.predict_all(emb, hq_features, input_points=points, context=model.decoder_context(emb),
                                 needed=lambda iou: iou[..., 1:].amax(-1) > t)

    for masks, iou in both(model, run):
        close(iou, iou_full)
        assert masks.shape == full.shape and masks[~want].isnan().all()
        close(masks[want], full[want])
    assert sum(calls) == want.sum()  # the fast path decoded the kept prompts' masks only


def test_decoder_computes_only_the_mask_extent_asked_for(model):
    """mask_extent (rows, columns): each mask's leading rows and columns are the full decode's, the rest NaN (with
    `needed` too, over two chunks; cuts at the band and token edges, beside the image's last pixels, and either way
    round); the plain forms compute everything."""
    g = torch.Generator().manual_seed(41)
    emb, inter = model.get_image_embeddings(torch.randn(1, 3, 1024, 1024, generator=g))
    hq_features = model.compute_hq_features(emb, inter)
    points = torch.rand(1, 11, 1, 2, generator=g) * 1024
    full, iou_full = model.predict_all(emb, hq_features, input_points=points)
    side = full.shape[-2]
    best = iou_full[..., 1:].amax(-1)
    t = gap_threshold(best)
    want = best > t
    assert 0 < want.sum() < want.numel()
    extents = [(1, side), (2, 1), (63, 193), (64, 2), (65, 63), (193, side), (side - 2, side - 3), (side - 1, side),
               (side, side - 1), (side, side - 2), (side, 64), (side, side)]
    for rows, cols in extents:
        masks, iou = model.predict_all(emb, hq_features, input_points=points, context=model.decoder_context(emb),
                                       needed=lambda iou: iou[..., 1:].amax(-1) > t, mask_extent=(rows, cols))
        close(iou, iou_full)
        kept = masks[want]
        assert masks[~want].isnan().all() and kept[..., rows:, :].isnan().all() and kept[..., cols:].isnan().all()
        close(kept[..., :rows, :cols], full[want][..., :rows, :cols])
    model.set_fast_path(False)
    try:
        masks, _ = model.predict_all(emb, hq_features, input_points=points, mask_extent=(5, 7))
    finally:
        model.set_fast_path(True)
    close(masks, full)


@pytest.mark.parametrize("shape", [(600, 800), (800, 600), (300, 1000)])
def test_predictor_upscaled_only_gives_the_same_upscaled_masks(model, shape):
    """decode(upscaled_only=True) leaves the padded frame's unread rows (landscape) or columns (portrait) NaN;
    upscale_masks gives the full decode's masks (4:3: 193 of 256), and hole removal turns the option off (it reads
    every pixel). predict(return_low_res=False) gives predict's masks and scores, and None for the logits."""
    p = SamHQPredictor(model)
    p.set_image(np.random.default_rng(5).integers(0, 255, (*shape, 3), dtype=np.uint8))
    pts, lab = torch.tensor([[[300.0, 200.0]], [[100.0, 250.0]]]), torch.ones(2, 1, dtype=torch.int)
    low, scores = p.decode(pts, lab)
    part, part_scores = p.decode(pts, lab, upscaled_only=True)
    rows, cols = p.transform.low_res_read(low.shape[-2:], p.input_size)
    assert {(600, 800): (193, 256), (800, 600): (256, 193), (300, 1000): (78, 256)}[shape] == (rows, cols)
    assert part[..., rows:, :].isnan().all() and part[..., cols:].isnan().all()
    assert not part[..., :rows, :cols].isnan().any()
    close(part_scores, scores)
    close(p.upscale_masks(part), p.upscale_masks(low))
    for multimask in (True, False):
        click = dict(point_coords=np.array([[250.0, 150.0]]), point_labels=np.array([1]), multimask_output=multimask,
                     return_logits=True)
        masks, s, logits = p.predict(**click)
        fast_masks, fast_s, none = p.predict(**click, return_low_res=False)
        assert none is None and logits.shape[-2:] == (256, 256) and not np.isnan(fast_masks).any()
        close(torch.from_numpy(fast_masks), torch.from_numpy(masks))
        close(torch.from_numpy(fast_s), torch.from_numpy(s))
    p.max_hole_area = 10.0
    assert not p.decode(pts, lab, upscaled_only=True)[0].isnan().any()


@pytest.mark.parametrize("p", [1, 4])
def test_decoder_graph_forms(model, p):
    """set_fast_path("graph") (the ONNX export's setting: the folded HQ convolution as plain algebra) = plain forms."""
    g = torch.Generator().manual_seed(20 + p)
    emb, inter = model.get_image_embeddings(torch.randn(1, 3, 1024, 1024, generator=g))
    hq_features = model.compute_hq_features(emb, inter)
    try:
        for prompts in _prompts(g, p):
            model.set_fast_path("graph")
            assert model.mask_decoder.use_graph_forms and not model.runs_fast_path
            masks, iou = model.predict_all(emb, hq_features, **prompts)
            model.set_fast_path(False)
            masks0, iou0 = model.predict_all(emb, hq_features, **prompts)
            close(masks, masks0)
            close(iou, iou0)
        with pytest.raises(ValueError, match="True, False or 'graph'"):
            model.set_fast_path("fast")
    finally:
        model.set_fast_path(True)


def test_decoder_context_is_the_fast_paths_alone(model):
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(3))
    assert model.decoder_context(emb) is not None
    model.set_fast_path(False)
    try:
        assert model.decoder_context(emb) is None  # the plain forms share nothing between prompts
    finally:
        model.set_fast_path(True)


def test_model_forward_and_train_mode(model):
    g = torch.Generator().manual_seed(4)
    pixels = torch.randn(1, 3, 1024, 1024, generator=g)
    boxes = torch.tensor([[[10.0, 20, 500, 600], [300, 300, 900, 700]]])
    fast, plain = both(model, lambda: model(pixel_values=pixels, input_boxes=boxes))
    close(fast.pred_masks, plain.pred_masks)
    close(fast.iou_scores, plain.iou_scores)
    model.train()  # train mode runs the plain forms whatever the switch says, so autograd works
    try:
        with torch.enable_grad():
            out = model(pixel_values=pixels, input_boxes=boxes, labels=torch.zeros(1, 256, 256))
            out.loss.backward()
        close(out.pred_masks.detach(), plain.pred_masks)
    finally:
        model.eval().zero_grad(set_to_none=True)


def test_predictor_masks(model):
    rng = np.random.default_rng(0)
    image = (rng.random((300, 400, 3)) * 255).astype(np.uint8)

    def run():
        p = SamHQPredictor(model)
        p.set_image(image)
        return p.predict(point_coords=np.array([[100, 80], [250, 200]]), point_labels=np.array([1, 0]),
                         box=np.array([50, 40, 350, 260]), return_logits=True)

    fast, plain = both(model, run)
    for a, b in zip(fast, plain):
        close(torch.as_tensor(a), torch.as_tensor(b))


def test_predictor_follows_features_assigned_directly(model):
    rng = np.random.default_rng(0)
    p = SamHQPredictor(model)
    p.set_image((rng.random((300, 400, 3)) * 255).astype(np.uint8))
    other = SamHQPredictor(model)
    other.set_image((rng.random((300, 400, 3)) * 255).astype(np.uint8))
    box = np.array([50, 40, 250, 200])
    p.predict(box=box)  # the per-image context of the first image is made here
    p.features, p.hq_features = other.features, other.hq_features  # assigned directly, as some segment_anything code does
    torch.testing.assert_close(torch.as_tensor(p.predict(box=box, return_logits=True)[0]),
                               torch.as_tensor(other.predict(box=box, return_logits=True)[0]))


def test_eval_mode_inference_without_no_grad(model):
    """transformers-style inference (eval mode, autograd left on) runs the fast path without autograd;
    with the fast path off, eval mode gives gradients."""
    pixels = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(6))
    boxes = torch.tensor([[[10.0, 20, 500, 600]]])
    with torch.enable_grad():
        out = model.eval()(pixel_values=pixels, input_boxes=boxes)
        assert not out.pred_masks.requires_grad
        model.set_fast_path(False)
        try:
            out = model(pixel_values=pixels, input_boxes=boxes)
            assert out.pred_masks.requires_grad
        finally:
            model.set_fast_path(True)


@pytest.mark.parametrize("b, h, w, window", [(1, 64, 64, 14), (2, 20, 13, 7), (1, 14, 28, 14)])
def test_window_order_is_window_partition(b, h, w, window):
    """Gathering x's tokens in `window_order` (zero where -1) gives `window_partition(x)`, padding included."""
    from samhq.modeling.image_encoder import window_partition

    x = torch.randn(b, h, w, 3, generator=torch.Generator().manual_seed(2))
    order = fast_paths.window_order(b, h, w, window, x.device)
    gathered = x.reshape(-1, 3)[order.clamp(min=0)] * (order >= 0)[:, None]
    windows, _ = window_partition(x, window)
    assert torch.equal(gathered, windows.reshape(-1, 3))


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


def test_run_jobs_on_worker_threads_one_torch_thread_each(two_threads):
    """Results in order, computed on the pool's threads with one torch thread, under the caller's grad and inference
    modes; torch's thread count comes back; even a single job leaves the caller's thread."""
    import threading

    def job(i):
        return i, threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()

    with torch.no_grad():
        out = fast_paths.run_jobs([lambda i=i: job(i) for i in range(5)])
    assert [o[0] for o in out] == list(range(5))
    assert all(name.startswith("samhq-jobs") and threads == 1 and not grad for _, name, threads, grad in out)
    assert torch.get_num_threads() == 2
    assert fast_paths.run_jobs([lambda: threading.current_thread().name])[0].startswith("samhq-jobs")
    with torch.inference_mode():
        assert fast_paths.run_jobs([torch.is_inference_mode_enabled] * 3) == [True] * 3


def test_jobs_of_a_job_are_shared_with_an_idle_worker(two_threads):
    """A job's own jobs run on its thread and on the idle worker at the same time (each waits for the other at a
    barrier, which one thread alone would never pass), in order, under the job's grad mode."""
    import threading

    meet = threading.Barrier(2, timeout=30)

    def inner(i):
        meet.wait()
        return i, threading.current_thread().name, torch.is_grad_enabled()

    def outer():
        return threading.current_thread().name, fast_paths.run_jobs([lambda i=i: inner(i) for i in range(2)])

    with torch.no_grad():
        [(name, out)] = fast_paths.run_jobs([outer])
    assert [o[0] for o in out] == [0, 1] and not any(o[2] for o in out)
    names = {o[1] for o in out}
    assert name in names and len(names) == 2 and all(n.startswith("samhq-jobs") for n in names)


def test_jobs_of_jobs_finish_when_every_worker_is_busy(two_threads):
    """Every worker runs a job that has jobs of its own and no worker is idle to help: each job works through its own
    list (its helpers, queued behind the other jobs, are cancelled or find nothing left), and an inner job's
    exception reaches the caller after the rest have finished."""
    def outer(k):
        return fast_paths.run_jobs([lambda i=i: (k, i) for i in range(5)])

    out = fast_paths.run_jobs([lambda k=k: outer(k) for k in range(6)])
    assert out == [[(k, i) for i in range(5)] for k in range(6)]

    done = []

    def bad():
        raise ValueError("inner job failed")

    with pytest.raises(ValueError, match="inner job failed"):
        fast_paths.run_jobs([lambda: fast_paths.run_jobs([bad, lambda: done.append(1), lambda: done.append(2)])])
    assert sorted(done) == [1, 2] and torch.get_num_threads() == 2


def test_run_jobs_waits_for_all_then_raises(two_threads):
    import time

    done = []

    def slow():
        time.sleep(0.2)
        done.append(1)

    def bad():
        raise ValueError("job failed")

    with pytest.raises(ValueError, match="job failed"):
        fast_paths.run_jobs([bad, slow, slow])
    assert len(done) == 2 and torch.get_num_threads() == 2


def test_run_jobs_leave_other_threads_their_thread_count(two_threads):
    """While jobs run on their one-thread workers, and after, this thread and threads started later keep torch's
    count (setting the workers' count must not leak into the default a new thread starts with)."""
    import threading

    fast_paths._pools.clear()  # the pool is started (its workers set) inside this test
    seen = []
    out = fast_paths.run_jobs([lambda: torch.get_num_threads()] * 4)
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert out == [1] * 4 and seen == [2] and torch.get_num_threads() == 2


def _jobs_in_child(queue):
    queue.put(fast_paths.run_jobs([lambda i=i: i * i for i in range(4)]))


def test_run_jobs_after_fork(two_threads):
    """A forked child inherits the pool object but none of its threads: it makes its own instead of waiting forever."""
    import multiprocessing

    fast_paths.run_jobs([lambda: 0] * 2)  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_jobs_in_child, args=(queue,))
    child.start()
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and queue.get(timeout=5) == [0, 1, 4, 9]


def assert_tiles(edges: list, rows: int) -> None:
    """Sorted bands (r0, r1) cover rows 0..rows once: each starts where the one before ends."""
    assert edges[0][0] == 0 and edges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))


@pytest.mark.parametrize("jobs", [True, False])
def test_decoder_jobs_give_the_same_masks(model, monkeypatch, two_threads, jobs):
    """Prompt chunks and bands of rows on worker threads (PARALLEL_JOBS) or in turn: the plain forward's masks, also
    with `mask_extent` cutting a band and the columns, and without the HQ branch; the bands of each prompt tile its
    rows once."""
    import threading
    from collections import Counter

    g = torch.Generator().manual_seed(52)
    emb, inter = model.get_image_embeddings(torch.randn(1, 3, 1024, 1024, generator=g))
    hq_features = model.compute_hq_features(emb, inter)
    points = torch.rand(1, 11, 1, 2, generator=g) * 1024
    monkeypatch.setattr(fast_paths, "PARALLEL_JOBS", jobs)
    bands, band = [], fast_paths._mask_band
    monkeypatch.setattr(fast_paths, "_mask_band", lambda *a: bands.append((a[-2:], threading.current_thread().name))
                        or band(*a))
    for hq in (hq_features, None):
        for extent in (None, (200, 150)):  # 200: inside the second band
            bands.clear()
            (masks, iou), (plain, plain_iou) = both(model, lambda hq=hq, extent=extent: model.predict_all(
                emb, hq, input_points=points, context=model.decoder_context(emb), mask_extent=extent))
            cut, cols = plain.shape[-2:] if extent is None else extent
            close(masks[..., :cut, :cols], plain[..., :cut, :cols])
            close(iou, plain_iou)
            counts = Counter(b for b, _ in bands)
            assert set(counts.values()) == {11}
            assert_tiles(sorted(counts), cut)
            assert all(name.startswith("samhq-jobs") == jobs for _, name in bands)


@pytest.mark.parametrize("clicks", [1, 12])
def test_a_lone_chunk_runs_on_a_worker(model, monkeypatch, two_threads, clicks):
    """One prompt's chunk is a job (its token work on a worker's one torch thread), unless its 12 clicks + 6 output
    tokens reach the head width (16) and the transformer takes the plain form, which stays on the calling thread."""
    import threading

    g = torch.Generator().manual_seed(53)
    emb, inter = model.get_image_embeddings(torch.randn(1, 3, 1024, 1024, generator=g))
    hq_features = model.compute_hq_features(emb, inter)
    points = torch.rand(1, 1, clicks, 2, generator=g) * 1024
    seen, transformer = [], fast_paths._transformer
    monkeypatch.setattr(fast_paths, "_transformer",
                        lambda *a, **k: seen.append(threading.current_thread().name) or transformer(*a, **k))
    (masks, iou), (plain, plain_iou) = both(model, lambda: model.predict_all(
        emb, hq_features, input_points=points, context=model.decoder_context(emb)))
    close(masks, plain)
    close(iou, plain_iou)
    assert len(seen) == 1 and seen[0].startswith("samhq-jobs") == (clicks == 1)


@pytest.mark.parametrize("rows", [None, 40])
def test_a_lone_prompt_has_a_band_per_worker(model, monkeypatch, rows):
    """With more workers than a prompt's `HQ_BAND_PIXELS` bands, one prompt's rows split into a band per worker (of
    `MIN_BAND_ROWS` or more rows: 40 rows make two), which tile its rows once and give the plain forward's masks."""
    g = torch.Generator().manual_seed(54)
    emb, inter = model.get_image_embeddings(torch.randn(1, 3, 1024, 1024, generator=g))
    hq_features = model.compute_hq_features(emb, inter)
    points = torch.rand(1, 1, 1, 2, generator=g) * 1024
    bands, band = [], fast_paths._mask_band
    monkeypatch.setattr(fast_paths, "_mask_band", lambda *a: bands.append(a[-2:]) or band(*a))
    with torch_threads(5):
        (masks, iou), (plain, plain_iou) = both(model, lambda: model.predict_all(
            emb, hq_features, input_points=points, context=model.decoder_context(emb),
                mask_extent=None if rows is None else (rows, 256)))
    cut = plain.shape[-2] if rows is None else rows
    close(masks[..., :cut, :], plain[..., :cut, :])
    close(iou, plain_iou)
    assert len(bands) == (5 if rows is None else 2)
    assert_tiles(sorted(bands), cut)
