"""The fast forms of the model's computation, for inference. One place, one switch.

Every function here computes what a plain forward in `samhq.modeling` computes, only faster on a
CPU; each is used instead of that forward when the module's `use_fast_path` is true (the model's
`set_fast_path(True)`, the default, and eval mode). `tests/test_fast_paths.py` checks each one
against the plain form. What they do:

- ViT attention (`vit_attention`): PyTorch's fused attention with the decomposed relative-position
  bias built contiguously, a block of query rows at a time into one reused buffer, so the
  (HW, HW) bias never exists whole and no fresh 100 MB tensor is page-faulted per block.
- ViT blocks (`vit_layer`): windows gathered by index (`window_order`), with neither projection spending
  work on the windows' padding, and the residual adds inside the projections' matrix products; the patch
  embedding (`patch_embed`, float32) as one matrix product over the image's patches.
- In-place GELU (`common.gelu(x, in_place=True)`) on freshly computed activations.
- TinyViT: batch norms folded into their convolutions (`conv_bn`), 1x1 convolutions as matmuls on
  channels-last activations (`channels_last`).
- Mask decoder (`decode_masks`; on a CPU only, see `MaskDecoder.use_fast_path_on`):
  - the first transformer layer's projections of the image tokens are made once per image
    (`image_context`) and shared by all its prompts;
  - cross attention between the T prompt tokens and the HW image tokens never projects the image
    tokens while T is below the head width: the query/key projections move onto the tokens' side of
    the product, the value/output projections after the weighted sum (T/d of the multiply-adds);
  - prompts are decoded a few at a time through the transformer (`DECODE_CHUNK`) and one band of rows
    at a time through upscaling and the HQ branch, so the large per-prompt tensors stay in cache; the bands cover
    only the rows and columns asked for (`mask_extent`: what the upscaling of a padded image reads);
  - the chunks (even a single one), and a chunk's bands, run as jobs on worker threads with one torch thread each
    (`run_jobs`, `PARALLEL_JOBS`; a job's own jobs are shared with idle workers): far fewer thread wake-ups than
    OpenMP's per-operation ones; so does the
    transformer's image side of one chunk, in phases split by rows (`_image_phase`: each applies a layer's
    image->token attention and LayerNorm row by row, then the next token->image attention's softmax as partial
    maxima and sums per job, combined as flash attention combines blocks);
  - the two 2x2 transposed convolutions of the upscaling are per-pixel matmuls on unshuffled
    sub-pixels (with LayerNorm and GELU, which also act per pixel), shuffled once at the end;
  - the HQ hypernetwork vector is folded into `mask_conv2` (linear), so the HQ branch computes one
    output channel per prompt instead of C/8, in bands of rows (`HQ_BAND_PIXELS`) whose tensors are
    reused from call to call rather than freshly mapped.
These rely on in-place writes and reused buffers, which autograd cannot differentiate: training runs
the plain forms (train mode, or `set_fast_path(False)`). The ONNX export sets `set_fast_path("graph")`: the plain
forms except where a fast form is plain tensor algebra that traces to one graph (`hq_mask_graph`, the folded HQ
convolution).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial, reduce

import torch
from torch import nn
from torch.nn import functional as F

from .common import gelu, kept_rows, rel_pos_terms

# Global attention over 64x64 tokens would need a (heads, 4096, 4096) bias; query rows are processed
# in blocks so that no block's bias exceeds this many elements, unless the blocks would then average fewer
# than MIN_BLOCK_QUERIES queries: PyTorch's CPU flash-attention kernel tiles 768 or more queries by 256 and
# fewer by 64, which costs 10-20% more per query (torch 2.13; ViT-B: blocks of 13 rows, 163 MB, not 10).
MAX_BIAS_ELEMENTS = 1 << 25
MIN_BLOCK_QUERIES = 768
# Prompts per pass through the decoder's transformer.
DECODE_CHUNK = 8
# Pixels per band of rows in the upscaling and the HQ branch's full-resolution convolution (ViT-B: 128 of the
# 256 rows); a prompt gets more, smaller bands where its chunk would otherwise leave workers idle.
HQ_BAND_PIXELS = 32768
MIN_BAND_ROWS = 16


# Run the decoder's independent pieces (prompt chunks, bands of mask rows) as `run_jobs` jobs on worker threads.
PARALLEL_JOBS = True


# ------------------------------------------------------------------------------------------------
# Jobs on worker threads


_pools: dict = {}  # (process id, threads) -> the pool `run_jobs` uses
_pools_lock = threading.Lock()
_local = threading.local()  # slots: this thread runs a job, from a pool of this many workers


def run_jobs(jobs: list) -> list:
    """Call each of `jobs` (functions of no arguments) and return their results in order, on worker threads with one
    torch thread each. From outside a job, every job goes to the `torch.get_num_threads()` workers and this thread
    waits; from inside one, this thread takes the jobs one by one and any worker that is idle meanwhile helps. With
    one torch thread or `PARALLEL_JOBS` off they run in turn on this thread. The jobs run under this thread's grad,
    inference and CPU autocast modes. An exception raised by a job is raised here, after every job has finished.

    Why: with OMP_WAIT_POLICY=PASSIVE (samhq's default, docs/performance.md) every parallel region wakes sleeping
    OpenMP threads, which costs 0.1-0.5 ms on a VM; the decoder's hundreds of small and mid-sized operations per prompt
    then run little faster on two threads than on one. Whole prompt chunks or bands of rows on threads of their own
    wake a thread once per job, and a job's own small operations never wake one.
    """
    slots = job_slots()
    if slots < 2:
        return [job() for job in jobs]
    pool = _pool(slots)
    modes = (slots, torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
             torch.get_autocast_dtype("cpu"))  # thread-local: the jobs run as this thread would
    if not _in_job():
        futures = [pool.submit(_job, job, *modes) for job in jobs]
        wait(futures)
        return [f.result() for f in futures]
    # inside a job: this thread works through the list, idle workers help; a helper that never started is cancelled
    # (waiting for it could wait on this very thread's pool slot)
    lock, results, order = threading.Lock(), [None] * len(jobs), iter(range(len(jobs)))

    def work():
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            try:
                results[i] = (True, jobs[i]())
            except BaseException as error:  # noqa: BLE001 - raised on the calling thread below
                results[i] = (False, error)

    helpers = [pool.submit(_job, work, *modes) for _ in range(min(slots, len(jobs)) - 1)]
    work()
    for f in helpers:
        if not f.cancel():
            f.result()
    for ok, value in results:
        if not ok:
            raise value
    return [value for _, value in results]


def job_slots() -> int:
    """How many jobs `run_jobs` can run at once from this thread: the pool's size inside a job, else torch's thread
    count; 1 with `PARALLEL_JOBS` off."""
    if not PARALLEL_JOBS:
        return 1
    return getattr(_local, "slots", 0) or torch.get_num_threads()


def _in_job() -> bool:
    return bool(getattr(_local, "slots", 0))


def _pool(threads: int) -> ThreadPoolExecutor:
    """This process's pool of `threads` workers, each set to one torch thread (a forked child inherits the parent's
    pool objects but none of their threads, hence the process id in the key)."""
    key = (os.getpid(), threads)
    with _pools_lock:
        if key not in _pools:
            caller = torch.get_num_threads()
            pool = ThreadPoolExecutor(threads, "samhq-jobs")
            started = threading.Barrier(threads)  # each worker takes one of these calls: all of them are set
            for f in [pool.submit(_one_thread, started) for _ in range(threads)]:
                f.result()
            # torch.set_num_threads also sets the count that threads starting later begin with: put it back
            torch.set_num_threads(caller)
            _pools[key] = pool
        return _pools[key]


def _one_thread(started: threading.Barrier) -> None:
    torch.get_num_threads()  # torch's first call on a thread sets it to the process default: let that happen first
    torch.set_num_threads(1)
    started.wait()


def _job(job, slots: int, grad: bool, inference: bool, autocast: bool, autocast_dtype):
    _local.slots = slots
    with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
            torch.autocast("cpu", autocast_dtype, enabled=autocast):
        return job()


# ------------------------------------------------------------------------------------------------
# Image encoders


def vit_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`image_encoder.Attention`'s attention: q, k, v (B, n, HW, d) -> (B, HW, n, d)."""
    if not attn.use_rel_pos:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    b, n, _, _ = q.shape
    # contiguous terms: broadcasting over strided einsum outputs is several times slower
    term_h, term_w = (t.contiguous() for t in rel_pos_terms(q, attn.rel_pos_h, attn.rel_pos_w, h, w))
    bounds = bias_blocks(h, w, b * n * h * w)
    buf = q.new_empty(b, n, max(r1 - r0 for r0, r1 in zip(bounds, bounds[1:])), w, h, w)
    blocks = []
    for r0, r1 in zip(bounds, bounds[1:]):
        bias = torch.add(term_h[:, :, r0:r1, :, :, None], term_w[:, :, r0:r1, :, None, :], out=buf[:, :, : r1 - r0])
        bias = bias.reshape(b, n, (r1 - r0) * w, h * w)  # a view (a shorter block keeps the buffer's head stride)
        blocks.append(F.scaled_dot_product_attention(q[:, :, r0 * w : r1 * w], k, v, attn_mask=bias).transpose(1, 2))
    return torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]


def bias_blocks(h: int, w: int, per_query: int) -> list[int]:
    """Row bounds [0, ..., h] of the blocks of query rows `vit_attention` processes; per_query: bias elements per query.

    As few blocks as `MAX_BIAS_ELEMENTS` allows, but never so many that they average under `MIN_BLOCK_QUERIES`
    queries; their sizes differ by at most one row.
    """
    cap_rows = max(1, MAX_BIAS_ELEMENTS // (per_query * w))
    count = max(1, min(-(-h // cap_rows), h * w // MIN_BLOCK_QUERIES))
    return [round(i * h / count) for i in range(count + 1)]


def patch_embed(conv: nn.Conv2d, pixel_values: torch.Tensor) -> torch.Tensor:
    """`image_encoder.PatchEmbed`: its p x p convolution with stride p as one matrix product over the image's
    patches. pixel_values (B, 3, S, S) -> (B, S // p, S // p, C), channels last (the conv's cropping of S)."""
    b, ch, hh, ww = pixel_values.shape
    p = conv.kernel_size[0]
    h, w = hh // p, ww // p
    patches = pixel_values[:, :, : h * p, : w * p].reshape(b, ch, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
    return F.linear(patches.reshape(b, h, w, ch * p * p), conv.weight.reshape(conv.out_channels, -1), conv.bias)


def window_order(b: int, h: int, w: int, window: int, device) -> torch.Tensor:
    """The tokens of `image_encoder.window_partition(x, window)` for x (b, h, w, C), in its order (window by window,
    row-major inside each): each one's index into x's b*h*w tokens (int64), -1 where it is zero padding."""
    hp, wp = -(-h // window) * window, -(-w // window) * window
    y = torch.arange(hp, device=device).view(-1, 1, window, 1)
    x = torch.arange(wp, device=device).view(1, -1, 1, window)
    flat = torch.where((y < h) & (x < w), y * w + x, -1).flatten()
    return torch.where(flat >= 0, flat + torch.arange(b, device=device)[:, None] * (h * w), -1).flatten()


def vit_layer(layer, x: torch.Tensor) -> torch.Tensor:
    """`image_encoder.VisionLayer`'s forward, x (B, H, W, C) -> (B, H, W, C), a new tensor.

    A windowed layer projects the image's tokens to q, k, v before partitioning them into windows, gathers the
    windows' rows in one pass (a padding token's are qkv(0), as the plain form's zero padding gives), and gathers
    the attention's output back to the image's tokens before the output projection: neither projection spends
    work on the padding. Both residual adds happen in the projections' matrix products (addmm onto the residual
    stream, `_add_linear`).
    """
    b, h, w, c = x.shape
    attn = layer.attn
    qkv = attn.qkv(layer.layer_norm1(x).view(-1, c))
    if layer.window_size:
        order = window_order(b, h, w, layer.window_size, x.device)
        padding = order < 0
        kept = (~padding).nonzero()[:, 0]
        qkv = qkv.index_select(0, order.clamp(min=0))
        qkv[padding] = attn.qkv(qkv.new_zeros(1, c))
        gh = gw = layer.window_size
    else:
        gh, gw = h, w
    q, k, v = attn.split_heads(qkv.view(-1, gh * gw, 3 * c))
    out = vit_attention(attn, q, k, v, gh, gw).reshape(-1, c)  # token-major rows
    if layer.window_size:
        out = out.index_select(0, torch.empty_like(kept).index_copy_(0, order[kept], kept))
    x = _add_linear(x.reshape(-1, c).clone(), out, attn.proj)
    hidden = gelu(layer.mlp.lin1(layer.layer_norm2(x)), in_place=True)
    return _add_linear(x, hidden, layer.mlp.lin2).view(b, h, w, c)


def _add_linear(x: torch.Tensor, inputs: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """x += linear(inputs), in place; inside the matrix product for a plain nn.Linear (an int8 one is called)."""
    if type(linear) is not nn.Linear:
        return x.add_(linear(inputs))
    x.addmm_(inputs, linear.weight.t())
    return x if linear.bias is None else x.add_(linear.bias)


def conv_bn(module, x: torch.Tensor) -> torch.Tensor:
    """`tiny_vit.ConvBN` with the batch norm folded into the convolution (one pass over the activations)."""
    c, bn = module.c, module.bn
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    weight = c.weight * scale[:, None, None, None]
    nhwc = x.permute(0, 2, 3, 1)
    if c.kernel_size == (1, 1) and c.stride == (1, 1) and c.groups == 1 and nhwc.is_contiguous():
        return F.linear(nhwc, weight.flatten(1), bias).permute(0, 3, 1, 2)  # a 1x1 conv on channels-last x is a matmul
    return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)


def channels_last(pixel_values: torch.Tensor) -> torch.Tensor:
    """TinyViT's input in channels-last memory: oneDNN's depthwise and 1x1 convolutions are much faster on it."""
    return pixel_values.contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------------
# Two-way transformer: attention between a few prompt tokens and many image tokens


def _head_weight(attn, proj: nn.Linear) -> torch.Tensor:
    return proj.weight.view(attn.num_heads, attn.head_dim, -1)  # (heads, d, C)


def _value_out(attn, v: torch.Tensor) -> torch.Tensor:
    """Tokens v (..., T, C) -> each head's values through its slice of out_proj, plus out_proj's bias / heads,
    (..., heads*T, C). Each head's softmax weights sum to one, so weights over all heads*T rows add the bias once."""
    w = attn.out_proj.weight.unflatten(1, (attn.num_heads, -1)).permute(1, 2, 0)  # (heads, d, C)
    return (attn.heads(attn.v_proj(v)) @ w + attn.out_proj.bias / attn.num_heads).flatten(-3, -2)


def image_context(decoder, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor) -> dict:
    """The decoder's per-image work for prompts without a mask input, shared by all of them.

    image_embeddings (B, C, h, w), image_pe (1, C, h, w), dense (1, 1, C, 1, 1) or (B, 1, C, h, w):
    the no-mask embedding. Returns the image tokens, their positional encoding and the first layer's
    projections of them (head layout), for `decode_masks(..., context=...)`.
    """
    image = image_embeddings[:, None] + dense
    keys = image.flatten(-2).transpose(-1, -2).contiguous()  # (B, 1, HW, C)
    key_pe = image_pe.to(image.dtype).flatten(-2).transpose(-1, -2).contiguous()
    k = keys + key_pe
    first = decoder.transformer.layers[0]
    t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
    return {"keys": keys, "key_pe": key_pe,
            "k": t2i.heads(t2i.k_proj(k))[:, 0].contiguous(), "v": t2i.heads(t2i.v_proj(keys))[:, 0].contiguous(),
            "q": i2t.heads(i2t.q_proj(k))[:, 0].contiguous()}


def _transformer(transformer, image, image_pe, tokens, context=None):
    """`TwoWayTransformer.forward` for P prompts per image: image (B, 1 or P, C, h, w), tokens (B, P, T, C),
    or `context` in place of image and image_pe -> (tokens (B, P, T, C), image tokens (B, P, HW, C)).

    The attentions between the T tokens and the HW image tokens never project the image tokens (while T is below
    the head width; the plain form otherwise): the query/key projections move onto the tokens' side of the product,
    the value/output projections after the weighted sum (T/d of the multiply-adds). The image's side runs in phases,
    one per token->image attention: each applies the previous layer's image->token attention and LayerNorm to the
    image tokens, then sums this attention's softmax over them. A phase's rows run as `run_jobs` jobs (`_image_rows`),
    whose partial sums are combined as flash attention combines blocks.
    """
    b, p, t, c = tokens.shape
    if context is None:
        keys = image.flatten(-2).transpose(-1, -2).contiguous()  # (B, 1 or P, HW, C)
        key_pe = image_pe.flatten(-2).transpose(-1, -2)[0].contiguous()
    else:
        keys, key_pe = context["keys"], context["key_pe"][0]
    if _plain_form(transformer, t):
        hs, keys = transformer.attend(keys.expand(b, p, -1, -1).flatten(0, 1), key_pe, tokens.flatten(0, 1))
        return hs.view(b, p, t, c), keys.view(b, p, -1, c)
    own = keys.new_empty(b, p, keys.shape[-2], c)  # the image tokens after the first layer, written in place
    queries, pending = tokens, None
    for i, layer in enumerate(transformer.layers):
        queries = layer.token_self_attention(queries, tokens)
        attn = layer.cross_attn_token_to_image
        if i == 0 and context is not None:  # the image's projections are shared by all prompts
            qh = attn.heads(attn.q_proj(queries + tokens)).transpose(1, 2).reshape(b, attn.num_heads, p * t, -1)
            out = F.scaled_dot_product_attention(qh, context["k"], context["v"])  # (B, heads, P*T, d)
            out = attn.out_proj(out.unflatten(2, (p, t)).permute(0, 2, 3, 1, 4).flatten(-2))
        else:
            out = _image_phase(attn, queries + tokens, keys, own, key_pe, pending)
            keys = own if pending is not None else keys
        queries = layer.layer_norm2(queries + out)
        queries = layer.layer_norm3(queries + layer.mlp(queries))
        pending = _image_update(layer, queries + tokens, queries, context["q"] if i == 0 and context else None)
    out = _image_phase(transformer.final_attn_token_to_image, queries + tokens, keys, own, key_pe, pending)
    keys = own if pending is not None else keys
    return transformer.layer_norm_final_attn(queries + out), keys


def _plain_form(transformer, t: int) -> bool:
    """Whether `_transformer` runs `TwoWayTransformer.attend` for t prompt tokens: from the head width on, projecting
    the image tokens costs less than moving the projections onto the tokens' side."""
    return t >= transformer.final_attn_token_to_image.head_dim


def _image_update(layer, k: torch.Tensor, v: torch.Tensor, shared_q: torch.Tensor | None) -> dict:
    """A layer's image->token attention (plus residual and layer_norm4) as the token-side terms `_image_rows` applies:
    tokens k, v (B, P, T, C); shared_q: the image's projected queries (B, heads, HW, d) when one image serves all P
    prompts (the first layer), else the queries' projection moves onto the tokens' side (the query bias adds one
    score per head and token)."""
    attn = layer.cross_attn_image_to_token
    heads, t, scale = attn.num_heads, k.shape[-2], attn.head_dim ** -0.5
    kh = attn.heads(attn.k_proj(k)) * scale  # (B, P, heads, T, d)
    update = {"norm": layer.layer_norm4, "heads": heads, "t": t, "vo": _value_out(attn, v).flatten(0, 1)}
    if shared_q is not None:
        b, p = k.shape[:2]
        return {**update, "shared_q": shared_q, "kh": kh.permute(0, 2, 4, 1, 3).reshape(b, heads, -1, p * t)}
    qk = (kh @ _head_weight(attn, attn.q_proj)).flatten(-3, -2)  # (B, P, heads*T, C)
    bias = (kh @ attn.q_proj.bias.view(heads, -1, 1)).flatten(-3)  # (B, P, heads*T)
    return {**update, "qk_t": qk.flatten(0, 1).transpose(1, 2), "bias": bias.flatten(0, 1)[:, None]}


def _image_phase(attn, q: torch.Tensor, keys, own, key_pe, pending) -> torch.Tensor:
    """Token->image attention `attn(q, keys + key_pe, keys)` (B, P, T, C) for tokens q (B, P, T, C), after applying
    `pending` (`_image_update`, or None) to the image tokens keys (B, 1 or P, HW, C), which writes them into own
    (B, P, HW, C); the attention then reads own. The rows run as `job_slots()` jobs."""
    t, hw = q.shape[-2], keys.shape[-2]
    # the key bias adds one constant to each query's scores: softmax ignores it
    query = (attn.heads(attn.q_proj(q)) @ _head_weight(attn, attn.k_proj)) * attn.head_dim ** -0.5  # (B, P, heads, T, C)
    query_t = query.flatten(-3, -2).flatten(0, 1).transpose(1, 2)  # (BP, C, heads*T)
    parts = job_slots()
    bounds = [round(i * hw / parts) for i in range(parts + 1)]
    sums = run_jobs([partial(_image_rows, query_t, keys, own, key_pe, pending, lo, hi)
                     for lo, hi in zip(bounds, bounds[1:])])
    _, total, weighted = reduce(_merge, sums)
    y = (weighted / total[..., None]).view(*q.shape[:-2], attn.num_heads, t, -1)  # (B, P, heads, T, C)
    # softmax weights sum to one, so the value bias passes through unchanged
    out = y @ _head_weight(attn, attn.v_proj).transpose(-1, -2) + attn.v_proj.bias.view(attn.num_heads, 1, -1)
    return attn.out_proj(out.transpose(-3, -2).flatten(-2))


def _image_rows(query_t, keys, own, key_pe, pending, lo: int, hi: int):
    """Image tokens lo:hi of `_image_phase`: apply pending, then the softmax's partial sums over these tokens: (max
    score (BP, K), sum of exp(score - max) (BP, K), those weights times the tokens (BP, K, C)), K = heads*T."""
    b, p, _, c = own.shape
    rows = keys[:, :, lo:hi].expand(b, p, -1, -1).reshape(b * p, hi - lo, c)
    pe = key_pe[lo:hi]
    if pending is not None:
        rows = _apply_update(pending, rows, pe, lo, hi)
        own[:, :, lo:hi] = rows.view(b, p, -1, c)
    scores = torch.bmm(rows + pe, query_t)  # (BP, R, K)
    top = scores.amax(1)
    weights = scores.sub_(top[:, None]).exp_()
    return top, weights.sum(1), torch.bmm(weights.transpose(1, 2), rows)


def _apply_update(u: dict, rows: torch.Tensor, pe: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """`_image_update` u on image tokens r0:r1, rows (BP, R, C) with their positional encoding pe (R, C)."""
    heads, t = u["heads"], u["t"]
    if "shared_q" in u:
        kh = u["kh"]
        b, pt = kh.shape[0], kh.shape[-1]
        a = (u["shared_q"][:, :, r0:r1] @ kh).view(b, heads, r1 - r0, pt // t, t).softmax(-1)
        a = a.permute(0, 3, 2, 1, 4).reshape(-1, r1 - r0, heads * t)  # (BP, R, heads*T)
    else:
        a = torch.baddbmm(u["bias"], rows + pe, u["qk_t"]).unflatten(-1, (heads, t)).softmax(-1).flatten(-2)
    return u["norm"](torch.baddbmm(rows, a, u["vo"]))


def _merge(a: tuple, b: tuple) -> tuple:
    """Two partial softmax sums (`_image_rows`) as one: each rescaled to the larger of their maxima."""
    top = torch.maximum(a[0], b[0])
    sa, sb = (a[0] - top).exp_(), (b[0] - top).exp_()
    return top, a[1] * sa + b[1] * sb, torch.addcmul(a[2] * sa[..., None], b[2], sb[..., None])


# ------------------------------------------------------------------------------------------------
# Mask decoder


def decode_masks(decoder, image_embeddings, image_pe, sparse, dense, hq_features, context=None, needed=None,
                 mask_extent=None):
    """`MaskDecoder.forward`: every output token's mask logits (B, P, K, 4h, 4w) and IoU predictions (B, P, 4).

    context: `image_context(...)` of these image embeddings, for prompts without a mask input.
    needed: see `MaskDecoder.forward`; the masks of the prompts it rejects are NaN, never computed.
    mask_extent: see `MaskDecoder.forward`; the rows below it and the columns right of it are NaN, never computed.
    Prompts are decoded `DECODE_CHUNK` at a time, each chunk as a `run_jobs` job (a lone chunk too, unless its
    transformer takes the plain form); a chunk's masks are jobs of one prompt's band of rows each.
    """
    b, p = sparse.shape[:2]
    c, h, w = image_embeddings.shape[1:]
    out_tokens = decoder.output_tokens(hq_features is not None).to(sparse.dtype)
    t = out_tokens.shape[0] + sparse.shape[2]
    # a chunk runs as a job (its own small operations then never wake OpenMP threads) unless its transformer takes the
    # plain form, whose image-token projections want all of torch's threads
    if p > DECODE_CHUNK or (not _in_job() and job_slots() > 1 and not _plain_form(decoder.transformer, t)):
        parts = run_jobs([partial(decode_masks, decoder, image_embeddings, image_pe, sparse[:, i:i + DECODE_CHUNK],
                                  dense[:, i:i + DECODE_CHUNK] if dense.shape[1] > 1 else dense, hq_features, context,
                                  needed, mask_extent)
                          for i in range(0, p, DECODE_CHUNK)])
        return torch.cat([m for m, _ in parts], dim=1), torch.cat([q for _, q in parts], dim=1)
    tokens = torch.cat([out_tokens.expand(b, p, -1, -1), sparse], dim=2)
    if context is None:
        src = image_embeddings[:, None] + dense  # (B, 1 or P, C, h, w): shared by the prompts without a mask input
        hs, keys = _transformer(decoder.transformer, src, image_pe.to(src.dtype), tokens)
    else:
        hs, keys = _transformer(decoder.transformer, None, None, tokens, context)
    hs, keys = hs.flatten(0, 1), keys.expand(b, p, -1, -1).reshape(b * p, h, w, c)
    iou = decoder.iou_prediction_head(hs[:, 0]).view(b, p, -1)
    rows = range(b * p) if needed is None else kept_rows(needed, iou).tolist()

    n = decoder.num_mask_tokens
    hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    hyper_hq = decoder.hq_mask_mlp(hs[:, 1 + n]) if hq_features is not None else None
    k = n + (hq_features is not None)
    extent = (4 * h, 4 * w) if mask_extent is None else mask_extent
    rows_out, cols_out = (max(1, min(size, int(e))) for size, e in zip((4 * h, 4 * w), extent))
    whole = needed is None and (rows_out, cols_out) == (4 * h, 4 * w)
    masks = hs.new_empty(b * p, k, 16 * h * w) if whole else hs.new_full((b * p, k, 16 * h * w), float("nan"))
    bands = -(-job_slots() // max(1, len(rows)))  # at least this many per prompt, so that every worker has one
    run_jobs([job for i in rows for job in _prompt_bands(
        decoder, masks[i], keys[i], hyper[i], None if hyper_hq is None else hyper_hq[i],
        None if hyper_hq is None else hq_features[i // p], rows_out, cols_out, bands)])
    return masks.view(b, p, -1, 4 * h, 4 * w), iou


def _prompt_bands(decoder, out: torch.Tensor, keys: torch.Tensor, hyper: torch.Tensor, hyper_hq: torch.Tensor | None,
                  image_hq: torch.Tensor | None, rows: int, cols: int, least: int = 1) -> list:
    """The jobs that write the first `rows` rows and `cols` columns of one prompt's mask logits into out (K, 16hw), a
    band of rows each (equal bands of at most `HQ_BAND_PIXELS`, and at least `least` bands of `MIN_BAND_ROWS` or more
    rows): K = 4 SAM masks, plus the HQ mask when hyper_hq is given.

    keys (h, w, C) image tokens after the transformer, hyper (4, C/8), hyper_hq (C/8) or None, image_hq (C/8, 4h, 4w)
    the image's fused HQ features or None.
    """
    count = max(-(-rows // max(1, HQ_BAND_PIXELS // cols)), min(least, rows // MIN_BAND_ROWS))
    bounds = [round(i * rows / count) for i in range(count + 1)]
    taps = None if hyper_hq is None else _hq_taps(decoder, hyper_hq[None])
    return [partial(_mask_band, decoder, out, keys, hyper, hyper_hq, taps, image_hq, cols, r0, r1)
            for r0, r1 in zip(bounds, bounds[1:])]


def _mask_band(decoder, out, keys, hyper, hyper_hq, taps, image_hq, cols: int, r0: int, r1: int) -> None:
    """Rows r0:r1, columns 0:cols of one prompt's masks into out (K, 16hw), from its image tokens alone
    (`_prompt_bands`' arguments; taps: `_hq_taps` of hyper_hq). Everything runs channels-last (N, H, W, C)."""
    hh, ww = 4 * keys.shape[0], 4 * keys.shape[1]
    # the HQ branch's two 3x3 convolutions read two pixels of the upscaled features beyond the band on each side
    halo = 0 if hyper_hq is None else 2
    top, bottom = max(r0 - halo, 0) // 4, -(-min(r1 + halo, hh) // 4)  # rows of the image tokens those come from
    right = -(-min(cols + halo, ww) // 4)  # and columns
    up = _upscale(decoder, keys[None, top:bottom, :right])  # (1, 4 * (bottom - top), 4 * right, C/8), from row 4 * top
    band = out.view(-1, hh, ww)[:, r0:r1, :cols]
    n, m = hyper.shape[0], r1 - r0
    # the products run on whole rows (views, no copies), then the wanted columns are kept
    band[:n] = (hyper @ up[0, r0 - 4 * top:r1 - 4 * top].flatten(0, 1).t()).view(n, m, -1)[..., :cols]
    if hyper_hq is None:
        return
    hq = _hq_rows(decoder, up, taps, r0, r1, cols, 4 * top, (hh, ww))[0] + hyper_hq @ decoder.mask_conv2.bias
    band[n] = hq + (hyper_hq @ image_hq[:, r0:r1].flatten(1).to(hyper_hq.dtype)).view(m, ww)[:, :cols]


def _hq_taps(decoder, hyper_hq: torch.Tensor) -> torch.Tensor:
    """The HQ hypernetwork vectors (N, C/8) folded into `mask_conv2`: one 3x3 output channel per prompt, (N, 9, C/4)."""
    w2 = decoder.mask_conv2.weight  # (C/8, C/4, 3, 3)
    return (hyper_hq @ w2.flatten(1)).view(-1, w2.shape[1], 9).transpose(1, 2)


def hq_mask_graph(decoder, upscaled: torch.Tensor, hyper_hq: torch.Tensor, hq_features: torch.Tensor, p: int) -> torch.Tensor:
    """The HQ mask logits (BP, 1, 16hw) with `mask_conv2` folded, as plain tensor algebra (the "graph" setting).

    upscaled (BP, C/8, H, W) SAM's upscaled features, hyper_hq (BP, C/8), hq_features (B, C/8, H, W), p prompts per
    image. Equal to `hyper_hq . (mask_feature(upscaled) + hq_features)`: the 3x3 convolution's output channels are
    dotted with hyper_hq anyway, so each prompt convolves with one folded kernel (1/32 of the multiply-adds), written
    as a matmul and nine shifted sums rather than a grouped convolution, whose group count would be a constant.
    """
    g = decoder.mask_feature_hidden(upscaled)  # (BP, C/4, H, W)
    n, c4, hh, ww = g.shape
    r = F.pad((_hq_taps(decoder, hyper_hq) @ g.flatten(2)).view(n, 9, hh, ww), (1, 1, 1, 1))
    out = (hyper_hq @ decoder.mask_conv2.bias)[:, None, None]
    for k in range(9):
        ky, kx = divmod(k, 3)
        out = out + r[:, k, ky:ky + hh, kx:kx + ww]
    glob = hyper_hq.unflatten(0, (-1, p)) @ hq_features.flatten(2).to(hyper_hq.dtype)  # (B, P, HW)
    return out.view(n, 1, hh * ww) + glob.view(n, 1, hh * ww)


def _deconv_matrix(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel-2, stride-2 transposed convolution as a per-pixel linear map: weight (2*2*Cout, Cin), bias."""
    return conv.weight.permute(2, 3, 1, 0).flatten(0, 2), conv.bias.repeat(4)


def _upscale(decoder, keys: torch.Tensor) -> torch.Tensor:
    """`MaskDecoder.upscale` on image tokens (N, h, w, C) -> (N, 4h, 4w, C/8), channels-last."""
    n, h, w, _ = keys.shape
    x = F.linear(keys, *_deconv_matrix(decoder.upscale_conv1))  # (N, h, w, 2*2*C/4): sub-pixels (a, b)
    x = gelu(decoder.upscale_layer_norm.last_dim(x.unflatten(-1, (4, -1))), in_place=True)
    x = gelu(F.linear(x, *_deconv_matrix(decoder.upscale_conv2)), in_place=True)  # (N, h, w, 4, 2*2*C/8): then (c, d)
    x = x.view(n, h, w, 2, 2, 2, 2, -1)  # (N, i, j, a, b, c, d, C/8) -> row 4i+2a+c, column 4j+2b+d
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(n, 4 * h, 4 * w, -1)


def _hq_rows(decoder, up: torch.Tensor, taps: torch.Tensor, r0: int, r1: int, cols: int, top: int,
             size: tuple[int, int]) -> torch.Tensor:
    """Rows r0:r1, columns 0:cols of the HQ mask logits (N, r1-r0, cols) from the folded taps (N, 9, C/4) and up
    (N, H', W', C/8): rows top:top+H', columns 0:W' of the upscaled features, whose whole size is `size` (H, W). up
    must hold the rows r0-2 .. r1+1 and the columns up to cols+1 that exist."""
    height, width = size
    lo, hi = max(r0 - 1, 0), min(r1 + 1, height)  # rows of mask_conv1's output these need
    ulo, uhi = max(lo - 1, 0), min(hi + 1, height)  # rows of up those need
    right = min(cols + 1, width)  # columns of mask_conv1's output
    assert top <= ulo and uhi <= top + up.shape[1] and min(right + 1, width) <= up.shape[2], "up lacks what the band needs"
    g = decoder.mask_conv1(up[:, ulo - top:uhi - top].permute(0, 3, 1, 2))  # channels-last memory in and out
    # mask_conv1 pads beyond up's last column with zeros, as beyond the image's edge: where up stops short of the edge,
    # its output's last column is wrong, and `right` stops short of it
    g = gelu(decoder.mask_norm.last_dim(g[:, :, lo - ulo:hi - ulo, :right].permute(0, 2, 3, 1)), in_place=True)
    nb, rows = g.shape[:2]
    r = (taps @ g.reshape(nb, rows * right, -1).transpose(1, 2)).view(nb, 9, rows, right)
    # zeros beyond the image: rows r0-1 .. r1, columns -1 .. cols
    r = F.pad(r, (1, int(cols == width), int(r0 == 0), int(r1 == height)))
    m = r1 - r0
    out = r[:, 0, :m, :cols].clone()
    for k in range(1, 9):
        ky, kx = divmod(k, 3)
        out += r[:, k, ky:ky + m, kx:kx + cols]
    return out
