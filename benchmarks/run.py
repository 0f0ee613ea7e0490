"""SAM-HQ on the CPU: samhq (fp32 and fast modes) against the official `segment_anything_hq` and
transformers' `SamHQModel`, with the same random weights loaded into every implementation; and HQ-SAM 2
(Hiera-L) against Meta's `sam2` with SysCV's HQ decoder computation (the tests' stand-in).

    python benchmarks/run.py            # the full run (about 10 minutes on a 2-core CPU)
    python benchmarks/run.py --quick    # a smoke run: vit_tiny only, 8x8 AMG grid, one repeat
    python benchmarks/run.py --busy     # also each measurement again with one core kept busy by another process
    python benchmarks/run.py --device cuda   # every implementation on the GPU (writes results-cuda.json)

Every (case, implementation) runs in a fresh subprocess, which reports the median of its timed
repeats and its peak resident memory (ru_maxrss; on a GPU, torch.cuda.max_memory_allocated). samhq's workers
import samhq before torch, as a user's program does (it sets OMP_WAIT_POLICY=PASSIVE and glibc's malloc
thresholds, `samhq.limits.tune_malloc`); the references run with torch's own defaults. Writes benchmarks/results.json and
benchmarks/results.md and prints the table. The image is a 768x1024 synthetic image.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
MARK = "@@RESULT@@"
IMAGE_SIZE = (768, 1024)  # (H, W)

SAMHQ = ["samhq fp32", "samhq bf16", "samhq int8", "samhq onnxruntime"]
# fp32, asking only for the masks and scores (predict(return_low_res=False), as samhq's server and CLI do): the decoder
# skips the padded square's rows the masks never read (a quarter for the 768x1024 image)
MASKS_ONLY = "samhq masks only"
OPENVINO = ["openvino f32", "openvino bf16"]  # samhq's exported ONNX files in OpenVINO (samhq.engines.OpenVinoEngine)
REFS = ["official", "transformers"]
CPU_ONLY = {"samhq int8": "int8 dynamic quantization runs on the CPU only",
            "samhq low-memory": "low_memory leaves the weights in the memory-mapped file, for the CPU",
            "samhq onnxruntime": "the onnxruntime engine runs on the CPU (CPUExecutionProvider)",
            **{impl: "samhq's OpenVINO engine is compiled for the CPU" for impl in OPENVINO}}
BUSY_TARGET = 2.5  # busy time / quiet time, every samhq row (issue 17)
# Another process that keeps one core busy: a plain Python spin loop, saying when it has started.
SPIN = "print('spinning', flush=True)\nwhile True:\n    pass\n"


def cases(quick: bool) -> list[dict]:
    """The issue's cases; repeats are (warmup, timed)."""
    # The HQ decoder costs ~6 GFLOP per prompt (its 3x3 convolutions at 256x256), so 64 boxes and a
    # 32x32 AMG grid take seconds to minutes per run: few repeats there keep the full run near 12 minutes.
    enc, prompt, boxes, amg = ((0, 1), (1, 3), (0, 1), (0, 1)) if quick else ((1, 3), (2, 10), (0, 3), (0, 1))
    out = []
    if not quick:
        out += [
            dict(name="vit_b encoder 1024x1024", kind="encoder", variant="vit_b", reps=enc, impls=SAMHQ + OPENVINO + REFS),
            dict(name="vit_b one prompt", kind="prompt", variant="vit_b", reps=prompt,
                 impls=SAMHQ[:2] + [MASKS_ONLY] + SAMHQ[3:] + OPENVINO + REFS),
            dict(name="vit_b 64 boxes", kind="boxes", variant="vit_b", reps=boxes,
                 impls=SAMHQ[:2] + [MASKS_ONLY] + SAMHQ[3:] + REFS),
            dict(name="vit_b automatic masks 32x32", kind="amg", variant="vit_b", reps=amg, side=32,
                 impls=["samhq fp32", "samhq bf16", "official"]),
        ]
    out += [
        dict(name="vit_tiny encoder 1024x1024", kind="encoder", variant="vit_tiny", reps=enc,
             impls=SAMHQ + OPENVINO + ["official"]),
        dict(name="vit_tiny one prompt", kind="prompt", variant="vit_tiny", reps=prompt,
             impls=SAMHQ[:2] + SAMHQ[3:] + OPENVINO + ["official"]),
    ]
    if quick:
        out += [
            dict(name="vit_tiny 64 boxes", kind="boxes", variant="vit_tiny", reps=boxes,
                 impls=["samhq fp32", "samhq onnxruntime", "official"]),
            dict(name="vit_tiny automatic masks 8x8", kind="amg", variant="vit_tiny", reps=amg, side=8,
                 impls=["samhq fp32", "official"]),
        ]
    else:
        out.append(dict(name="vit_h embed one image (memory)", kind="memory", variant="vit_h", reps=(0, 1),
                        impls=["samhq fp32", "samhq low-memory", "samhq bf16", "official", "transformers"]))
        # HQ-SAM 2 (Hiera-L, the released size): "official" is Meta's sam2 (PyPI) with SysCV's HQ decoder computation
        # (tests/sam2_ref.hq_decoder_stand_in), loading the same random weights from the official .pt.
        out += [
            dict(name="hiera_l hq-sam2 encoder 1024x1024", kind="encoder", variant="hiera_l_hq", reps=enc,
                 impls=["samhq fp32", "samhq low-memory", "samhq bf16", "official"]),
            dict(name="hiera_l hq-sam2 one prompt", kind="prompt", variant="hiera_l_hq", reps=prompt,
                 impls=["samhq fp32", "official"]),
        ]
    return out


# --------------------------------------------------------------------------- worker side


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _device(spec):
    import torch

    return torch.device(spec.get("device", "cpu"))


def peak_mb(device) -> float:
    """Peak memory so far: the GPU's allocations on CUDA, the process's resident memory on the CPU."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else maxrss_mb()


def _image():
    from samhq.data.synthetic import SyntheticShapes

    return SyntheticShapes(1, image_size=IMAGE_SIZE, seed=0)[0]["image"]


def _boxes(n: int):
    import numpy as np

    rng = np.random.default_rng(7)
    h, w = IMAGE_SIZE
    xy = rng.random((n, 2, 2)) * [w, h]
    return np.concatenate([xy.min(1), xy.max(1) + 16], axis=1)


POINT = [[400.0, 300.0]]


def _samhq_model(impl: str, spec: dict):
    import torch

    from samhq import SamHQModel
    from samhq.fast import compile_encoder, quantize_int8

    model = SamHQModel.from_pretrained(spec["seed_dir"], device=_device(spec),
                                       dtype=torch.bfloat16 if impl == "samhq bf16" else None).eval()
    if impl == "samhq int8":
        model = quantize_int8(model)
    if impl == "samhq compile":
        model = compile_encoder(model)
    return model


def _load_embedding(spec, dtype=None):
    import torch

    e = torch.load(spec["embedding"], weights_only=True)
    dev = _device(spec)
    cast = (lambda t: t.to(device=dev, dtype=dtype)) if dtype is not None else (lambda t: t.to(dev))
    return cast(e["features"]), [cast(t) for t in e["interm"]], cast(e["hq"]), tuple(e["original_size"]), tuple(e["input_size"])


def _set_embedding(p, features: dict, orig, inp):
    """Give predictor p an image embedding computed elsewhere, through its public API."""
    from samhq.predictor import ImageEmbedding

    tensors = {k: v for k, v in features.items() if k in p.engine.saved_features}
    p.set_image_embedding(ImageEmbedding(tensors, orig, inp, p.image_size, p.engine.fingerprint()))


def _onnx_file_predictor(impl, spec):
    """The predictor over the exported ONNX files for "samhq onnxruntime" and "openvino f32/bf16", else None."""
    from samhq.predictor import OnnxPredictor, SamHQPredictor

    if impl == "samhq onnxruntime":
        return OnnxPredictor(spec["onnx_dir"])
    if impl in OPENVINO:
        return SamHQPredictor.from_openvino(spec["onnx_dir"], precision=impl.split()[1])
    return None


def _samhq_predictor(impl, spec):
    from samhq.predictor import SamHQPredictor

    feats, inter, hq, orig, inp = _load_embedding(spec)
    p = _onnx_file_predictor(impl, spec)
    if p is not None:
        _set_embedding(p, {"features": feats, "hq_features": hq}, orig, inp)
        return p
    p = SamHQPredictor(_samhq_model(impl, spec))
    _set_embedding(p, {"features": feats, "early_features": inter[0]}, orig, inp)
    return p


def _official_predictor(spec):
    from _refs import official_model, official_module

    sah = official_module()
    p = sah.SamPredictor(official_model(spec["variant"], spec["official_pth"]).to(_device(spec)))
    feats, inter, _, orig, inp = _load_embedding(spec)
    p.features, p.interm_features, p.original_size, p.input_size, p.is_image_set = feats, inter, orig, inp, True
    return p


def _transformers_runner(spec, kind):
    import numpy as np
    import torch
    from _refs import transformers_model
    from transformers import SamImageProcessorPil

    from samhq.processing import scale_coords

    dev = _device(spec)
    hf = transformers_model(spec["seed_dir"]).to(dev)
    proc = SamImageProcessorPil()
    feats, inter, _, orig, inp = _load_embedding(spec)

    def run():
        if kind == "prompt":
            pts = torch.as_tensor(scale_coords(np.array(POINT), orig, 1024), dtype=torch.float, device=dev)[None, None]
            out = hf(image_embeddings=feats, intermediate_embeddings=inter, input_points=pts,
                     input_labels=torch.ones(1, 1, 1, dtype=torch.long, device=dev), multimask_output=True)
        else:
            boxes = torch.as_tensor(scale_coords(_boxes(64).reshape(-1, 2, 2), orig, 1024), dtype=torch.float, device=dev)
            out = hf(image_embeddings=feats, intermediate_embeddings=inter, input_boxes=boxes.reshape(1, -1, 4),
                     multimask_output=False)
        return proc.post_process_masks(out.pred_masks, original_sizes=[orig], reshaped_input_sizes=[inp])

    return run


def setup_encoder(impl, spec):
    import torch

    pixels = torch.load(spec["pixels"], weights_only=True).to(_device(spec))
    if impl == "official":
        from _refs import official_model

        enc = official_model(spec["variant"], spec["official_pth"]).image_encoder.to(pixels.device)
        return lambda: enc(pixels), None
    if impl == "transformers":
        from _refs import transformers_model

        hf = transformers_model(spec["seed_dir"]).to(pixels.device)
        return lambda: hf.get_image_embeddings(pixels), None
    e = torch.load(spec["embedding"], weights_only=True)
    orig, inp = tuple(e["original_size"]), tuple(e["input_size"])
    from samhq.predictor import SamHQPredictor

    p = _onnx_file_predictor(impl, spec) or SamHQPredictor(_samhq_model(impl, spec))
    last = {}

    def run():  # the engine's embedding of the preprocessed image, as set_image computes it
        last["features"] = p.engine.embed(pixels)

    return run, lambda: _box_masks(p, spec, last["features"], orig, inp)


def _box_masks(p, spec, features, orig, inp) -> dict:
    """64 box prompts decoded from this implementation's own embedding, saved for the quality report."""
    import numpy as np
    import torch

    _set_embedding(p, features, orig, inp)
    boxes = p.transform.apply_boxes_torch(torch.as_tensor(_boxes(64), dtype=torch.float), p.original_size)
    masks, _, _ = p.predict_torch(None, None, boxes, multimask_output=False)
    np.save(spec["masks_out"], masks[:, 0].cpu().numpy())
    return {"masks_file": spec["masks_out"]}


def setup_prompt(impl, spec, kind):
    import numpy as np
    import torch

    if impl == "transformers":
        return _transformers_runner(spec, kind), None
    p = _official_predictor(spec) if impl == "official" else _samhq_predictor(impl, spec)
    masks_only = {"return_low_res": False} if impl == MASKS_ONLY else {}
    if kind == "prompt":
        return lambda: p.predict(point_coords=np.array(POINT), point_labels=np.array([1]), **masks_only), None
    boxes = torch.as_tensor(_boxes(64), dtype=torch.float, device=_device(spec))  # the official predict_torch wants them there
    return lambda: p.predict_torch(None, None, p.transform.apply_boxes_torch(boxes, p.original_size),
                                   multimask_output=False, **masks_only), None


def setup_amg(impl, spec):
    image = _image()
    side = spec["case"]["side"]
    if impl == "official":
        from _refs import official_module

        p = _official_predictor(spec)
        gen = official_module().SamAutomaticMaskGenerator(p.model, points_per_side=side, **spec["amg"])
        cached = (p.features, p.interm_features, p.original_size, p.input_size)
    else:
        from samhq.automatic import SamHQAutomaticMaskGenerator

        p = _samhq_predictor(impl, spec)
        gen = SamHQAutomaticMaskGenerator(p, points_per_side=side, **spec["amg"])
        cached = p.export_image_embedding()
    target = gen.predictor

    def set_cached(img, image_format="RGB"):  # the embedding is cached: no encoder run per call
        if impl == "official":
            target.features, target.interm_features, target.original_size, target.input_size = cached
            target.is_image_set = True
        else:
            target.set_image_embedding(cached)

    target.set_image = set_cached
    count = {}

    def run():
        count["masks"] = len(gen.generate(image))

    return run, lambda: {"num_masks": count.get("masks")}


def setup_memory(impl, spec):
    import torch
    from _refs import fill_random_, on_meta

    dev = _device(spec)
    pixels = torch.load(spec["pixels"], weights_only=True).to(dev)
    if impl == "official":
        from _refs import official_module

        sah = official_module()
        enc = fill_random_(on_meta(lambda: sah.sam_model_registry["vit_h"]())).eval().image_encoder.to(dev)
        return lambda: enc(pixels), None
    if impl == "transformers":
        from transformers import SamHQConfig as HFConfig
        from transformers import SamHQModel as HFModel

        cfg = HFConfig.from_pretrained(spec["config_dir"])
        hf = fill_random_(on_meta(lambda: HFModel(cfg))).eval().to(dev)
        return lambda: hf.get_image_embeddings(pixels), None
    from samhq import SamHQConfig, SamHQModel, load_model

    if impl == "samhq low-memory":  # the same weights, read from the checkpoint the parent wrote
        model = load_model(spec["official_pth"], low_memory=True)
        return lambda: model.get_image_embeddings(pixels), None
    model = fill_random_(on_meta(lambda: SamHQModel(SamHQConfig.from_variant("vit_h")))).eval().to(dev)
    if impl == "samhq bf16":
        model = model.to(torch.bfloat16)
    return lambda: model.get_image_embeddings(pixels), None


# --------------------------------------------------------------------------- HQ-SAM 2 (Hiera-L)


def _sam2_reference(spec):
    """Meta's SAM2Base (PyPI sam2, its own classes at Hiera-L's structure) with the official .pt's weights and
    SysCV's HQ decoder computation (the tests' stand-in), and the HQ tensors."""
    import _refs  # noqa: F401 - puts tests/ (sam2_ref, its torchvision stand-ins) on the path
    import torch

    from samhq.checkpoints_sam2 import is_video_key
    from samhq.config_sam2 import SAM2_VARIANTS

    from sam2_ref import build_sam2_image_model, hq_decoder_stand_in, load_sam2

    if load_sam2() is None:
        raise ImportError("sam2 is not installed (scripts/install_references.sh)")
    ref = build_sam2_image_model(dict(SAM2_VARIANTS["hiera_l"]), image_size=1024)
    state = torch.load(spec["official_pt"], map_location="cpu", weights_only=True, mmap=True)["model"]
    hq = {k: v for k, v in state.items() if k.startswith(("sam_mask_decoder.hf_", "sam_mask_decoder.embedding_maskfeature"))}
    missing, unexpected = ref.load_state_dict({k: v for k, v in state.items() if k not in hq}, strict=False)
    missing = [k for k in missing if not is_video_key(k)]  # SAM2Base's video parameters: unused for images
    if unexpected or missing:
        raise RuntimeError(f"the official .pt does not fit Meta's model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hq_decoder_stand_in(ref.sam_mask_decoder, hq)
    return ref.eval()


def setup_sam2(impl, spec, kind):
    import numpy as np
    import torch

    dev = _device(spec)
    pixels = torch.load(spec["pixels"], weights_only=True).to(dev)
    e = {k: v.to(dev) for k, v in torch.load(spec["embedding"], weights_only=True).items()}
    if impl == "official":
        ref = _sam2_reference(spec).to(dev)
        from sam2_ref import meta_predictor

        if kind == "encoder":  # Meta's forward_image: trunk, neck and the high-res projections, as our embed
            return lambda: ref.forward_image(pixels), None
        p = meta_predictor(ref, 1024)
        p._features = {"image_embed": e["features"], "high_res_feats": [e["high_res_s0"], e["high_res_s1"]]}
        p._orig_hw, p._is_image_set = [IMAGE_SIZE], True
        return lambda: p.predict(point_coords=np.array(POINT), point_labels=np.array([1]), multimask_output=False), None
    from samhq import load_model
    from samhq.predictor import SamHQPredictor

    p = SamHQPredictor(load_model(spec["official_pt_dir"], device=dev, dtype=torch.bfloat16 if impl == "samhq bf16" else None,
                                  low_memory=impl == "samhq low-memory"))
    if kind == "encoder":
        return lambda: p.engine.embed(pixels), None
    _set_embedding(p, e, IMAGE_SIZE, (1024, 1024))
    return lambda: p.predict(point_coords=np.array(POINT), point_labels=np.array([1]), multimask_output=False), None


def prepare_sam2(d: Path) -> dict:
    """HQ-SAM 2 Hiera-L with random, perturbed weights (HQ parts included) as an official .pt, the SAM 2 pixels of
    the image and its embedding."""
    import torch
    from _refs import perturb_

    from samhq import SamHQ2Config, SamHQ2Model
    from samhq.processing import ResizeSquare

    torch.manual_seed(0)
    model = perturb_(SamHQ2Model(SamHQ2Config.from_variant("hiera_l")), seed=1).eval()
    (d / "official").mkdir(exist_ok=True)
    model.save_official(d / "official" / "sam2.1_hq_hiera_large.pt", overwrite=True)
    pixels = ResizeSquare(1024).preprocess(_image())
    torch.save(pixels, d / "pixels.pt")
    torch.save(model.embed_image(pixels), d / "embedding.pt")
    return {"pixels": str(d / "pixels.pt"), "embedding": str(d / "embedding.pt"), "official_pt_dir": str(d / "official"),
            "official_pt": str(d / "official" / "sam2.1_hq_hiera_large.pt")}


def worker(spec: dict) -> dict:
    impl, case = spec["impl"], spec["case"]
    if impl.startswith("samhq"):
        import samhq  # noqa: F401 - before torch, as in a user's program: the settings a user gets (OMP_WAIT_POLICY, malloc)
    else:  # the other rows import samhq only for helpers (test images, the OpenVINO engine): keep glibc's malloc defaults
        os.environ["SAMHQ_MALLOC_TUNING"] = "0"
    import torch

    torch.set_grad_enabled(False)
    kind = case["kind"]
    dev = _device(spec)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if spec["variant"] == "hiera_l_hq":
        fn, after = setup_sam2(impl, spec, kind)
    elif kind == "encoder":
        fn, after = setup_encoder(impl, spec)
    elif kind in ("prompt", "boxes"):
        fn, after = setup_prompt(impl, spec, kind)
    elif kind == "amg":
        fn, after = setup_amg(impl, spec)
    else:
        fn, after = setup_memory(impl, spec)
    loaded = peak_mb(dev)
    warmup, repeats = case["reps"]
    if dev.type == "cuda":  # the first call on a GPU pays for kernel selection and the allocator's growth
        warmup = max(warmup, 1)
    times, flops = [], None
    for i in range(warmup + repeats):
        if i == 0 and kind == "encoder" and impl == "samhq fp32" and warmup:
            import torch
            from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

            # torch's counter has formulas for the GPU attention kernels and for addmm, not for the CPU attention
            # kernel (count its two matrix products, q.k and p.v, as it counts theirs) or in-place addmm_
            uncounted = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                         lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
                         torch.ops.aten.addmm_: lambda c, a, b, *args, **kwargs: 2 * a[0] * a[1] * b[1]}
            counter = FlopCounterMode(display=False, custom_mapping=uncounted)
            with counter:
                fn()
            flops = counter.get_total_flops()
            continue
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"times": times, "median_s": statistics.median(times), "loaded_mb": loaded, "peak_mb": peak_mb(dev),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
           "malloc_tuned": bool(getattr(sys.modules.get("samhq.limits"), "malloc_tuned", False))}
    if flops:
        out["flops"] = flops
    if after is not None:
        out.update(after())
    return out


def prepare(variant: str, work: Path, onnx: bool) -> dict:
    """Random, perturbed weights in both layouts, the preprocessed image and a cached embedding."""
    import torch
    from _refs import perturb_

    from samhq import SamHQConfig, SamHQModel, save_official
    from samhq.predictor import SamHQPredictor

    torch.set_grad_enabled(False)
    d = work / variant
    d.mkdir(parents=True, exist_ok=True)
    if variant == "hiera_l_hq":
        return prepare_sam2(d)
    image = _image()
    out = {"pixels": str(d / "pixels.pt"), "embedding": str(d / "embedding.pt")}
    if variant == "vit_h":  # memory case: built on the meta device in each worker; only the config is shared
        from _refs import fill_random_, on_meta

        SamHQConfig.from_variant("vit_h").to_json_file(d / "config.json")
        torch.save(_pixels(image), out["pixels"])
        # the low-memory row reads its weights from a file: the fp32 rows' random weights, as an official .pth
        save_official(fill_random_(on_meta(lambda: SamHQModel(SamHQConfig.from_variant("vit_h")))), d / "official.pth",
                      overwrite=True)
        return dict(out, config_dir=str(d), official_pth=str(d / "official.pth"))
    torch.manual_seed(0)
    model = perturb_(SamHQModel(SamHQConfig.from_variant(variant)), seed=1).eval()
    model.save_pretrained(d / "seed")
    save_official(model, d / "official.pth", overwrite=True)
    p = SamHQPredictor(model)
    pixels = _pixels(image)
    torch.save(pixels, out["pixels"])
    feats, inter = model.get_image_embeddings(pixels)
    hq = model.compute_hq_features(feats, inter)
    h, w = image.shape[:2]
    inp = p.transform.get_preprocess_shape(h, w, 1024)
    torch.save({"features": feats, "interm": list(inter), "hq": hq, "original_size": [h, w], "input_size": list(inp)},
               out["embedding"])
    out.update(seed_dir=str(d / "seed"), official_pth=str(d / "official.pth"), amg=_amg_thresholds(model, p, feats, inter))
    if onnx:
        from samhq.export.onnx import export_onnx

        export_onnx(model, d / "onnx", overwrite=True)
        out["onnx_dir"] = str(d / "onnx")
    return out


def _amg_thresholds(model, p, feats, inter) -> dict:
    """Filter thresholds that let ~15% of a 32x32 grid's masks through on these random weights.

    Random weights predict IoUs and stabilities unlike a trained model's, so the default thresholds
    (0.88, 0.95) keep no mask and the post-processing would go unmeasured. Both generators get the
    same thresholds: the 70th percentile of predicted IoU, then the median low-res stability of the
    masks above it.
    """
    import numpy as np
    import torch

    from samhq.masks import stability_score

    _set_embedding(p, {"features": feats, "early_features": inter[0]}, IMAGE_SIZE,
                   p.transform.get_preprocess_shape(*IMAGE_SIZE, 1024))
    side = np.linspace(0.5 / 32, 1 - 0.5 / 32, 32)
    grid = np.stack(np.meshgrid(side, side), -1).reshape(-1, 2) * [IMAGE_SIZE[1], IMAGE_SIZE[0]]
    grid = grid[::8]  # a subsample is enough to place the quantiles
    coords = torch.as_tensor(p.transform.apply_coords(grid, IMAGE_SIZE), dtype=torch.float)
    ious, stabs = [], []
    for i in range(0, len(coords), 64):
        c = coords[i:i + 64]
        low, iou = p.decode(c[:, None], torch.ones(len(c), 1, dtype=torch.int), multimask_output=True)
        ious.append(iou.flatten())
        stabs.append(stability_score(low.flatten(0, 1), 0.0, 1.0))
    iou, stab = torch.cat(ious), torch.cat(stabs)
    iou_t = float(iou.quantile(0.7))
    return {"pred_iou_thresh": iou_t, "stability_score_thresh": float(stab[iou > iou_t].median())}


def _pixels(image):
    """(H, W, 3) uint8 -> (1, 3, 1024, 1024) as the predictor preprocesses it."""
    import torch

    from samhq.processing import normalize_and_pad, resize_rgb

    resized = torch.as_tensor(resize_rgb(image, 1024).copy()).permute(2, 0, 1)[None]
    return normalize_and_pad(resized, 1024)


# --------------------------------------------------------------------------- parent side


def run_child(args: list[str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:300]}


def combine_rounds(rs: list[dict]) -> dict:
    """One row from a measurement repeated in rounds (`--rounds`): the median of the rounds' medians, every time,
    the highest peak; the first round's other fields. A failed round makes the row that error."""
    failed = next((r for r in rs if "median_s" not in r), None)
    if failed is not None or len(rs) == 1:
        return failed or rs[0]
    medians = [r["median_s"] for r in rs]
    return dict(rs[0], median_s=statistics.median(medians), round_medians=medians,
                times=[t for r in rs for t in r["times"]], peak_mb=max(r["peak_mb"] for r in rs))


def run_busy(args: list[str], timeout: float) -> dict:
    """`run_child` while another process keeps one core busy from before the child starts until it ends.

    Adds "spinner_core_share": the spinner's CPU time over that wall time (1.0: it held a whole core).
    """
    spin = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
    spin.stdout.readline()
    t0 = time.perf_counter()
    try:
        r = run_child(args, timeout)
    finally:
        wall = time.perf_counter() - t0
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        spin.kill()
        spin.wait()
        spin.stdout.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    r["spinner_core_share"] = round((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / wall, 2)
    return r


def measure_busy(r: dict, spec: dict, timeout: float) -> str:
    """Measure the worker of row r again under `run_busy` and add the busy fields to r; returns what to print."""
    b = run_busy(["--worker", json.dumps(spec)], timeout)
    if "median_s" not in b:
        r["busy_error"] = b["error"]
        return f"busy ERROR {b['error']}"
    r.update(busy_median_s=b["median_s"], busy_ratio=round(b["median_s"] / r["median_s"], 3),
             busy_times=b["times"], spinner_core_share=b["spinner_core_share"])
    return f"busy {b['median_s']:.3f} s ({r['busy_ratio']:.2f}x, spinner {b['spinner_core_share']:.0%} of a core)"


def matmul_gflops(dtype_name: str, n: int = 2048, seconds: float = 1.5, device: str = "cpu") -> float:
    """The machine's matmul rate: n x n products repeated for `seconds`, rated by the fastest one.

    The fastest product, not the average: on a shared machine (steal time, other tenants) an average
    sinks with the noise and would make every "fraction of peak" look better than it is.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
        if dtype != torch.float32 and time.perf_counter() - start > seconds / 3:
            break  # without BF16 units one product can take seconds
    return 2 * n**3 / best / 1e9


def machine_info(device: str = "cpu") -> dict:
    import torch

    from samhq.fast import bf16_supported

    cpu, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            if flags and cpu:
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
                      if f in flags],
        "device": device, "bf16_units": bf16_supported(),
    }
    if device == "cuda":
        if not torch.cuda.is_available():
            return dict(info, gpu=None)
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, bf16_units=torch.cuda.is_bf16_supported())
    info["fp32_matmul_gflops"] = round(matmul_gflops("float32", device=device), 1)
    info["bf16_matmul_gflops"] = round(matmul_gflops("bfloat16", n=2048 if info["bf16_units"] else 512, device=device), 1)
    for name in ("transformers", "onnxruntime", "onnx", "openvino"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def skip_reason(impl: str, case: dict, info: dict, prep: dict) -> str | None:
    if info["device"] == "cuda" and impl in CPU_ONLY:
        return CPU_ONLY[impl]
    if impl == "samhq bf16" and info["device"] == "cuda" and not info["bf16_units"]:
        return f"{info['gpu']} does not support bfloat16"
    if impl == "samhq bf16" and not info["bf16_units"]:
        return (f"no BF16 units on this CPU (bf16 matmul {info['bf16_matmul_gflops']} GFLOP/s vs fp32 "
                f"{info['fp32_matmul_gflops']}); bf16 would be far slower than fp32 here")
    if impl == "samhq onnxruntime" and info["onnxruntime"] is None:
        return "onnxruntime not installed"
    if impl == "samhq onnxruntime" and "onnx_dir" not in prep:
        return "no ONNX export (onnx not installed, or --no-onnx)"
    if impl in OPENVINO and info["openvino"] is None:
        return "openvino not installed"
    if impl in OPENVINO and "onnx_dir" not in prep:
        return "no ONNX export (onnx not installed, or --no-onnx)"
    if impl == "openvino bf16" and not info["bf16_units"]:
        return "no BF16 units on this CPU (OpenVINO would run f32)"
    if case["variant"] == "hiera_l_hq" and impl == "official":
        import importlib.util

        if importlib.util.find_spec("sam2") is None or importlib.util.find_spec("hydra") is None:
            return "Meta's sam2 is not installed (scripts/install_references.sh)"
    if impl == "transformers" and info["transformers"] is None:
        return "transformers not installed"
    if case["kind"] == "amg":  # found without importing samhq: the parent stays free of torch and of samhq's OMP setting
        import importlib.util

        found = importlib.util.find_spec("samhq")
        if found is None or not (Path(found.origin).parent / "automatic.py").is_file():
            return "samhq.automatic is not available in this build"
    return None


def mask_ious(a, b):
    import numpy as np

    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    union = (a | b).sum(1)
    return np.where(union > 0, (a & b).sum(1) / np.maximum(union, 1), 1.0)


def summarize(results: dict, info: dict) -> tuple[list[dict], dict]:
    """Ratios per row and the issue's targets."""
    rows = []
    for case, impls in results.items():
        ok = {k: v for k, v in impls.items() if "median_s" in v}
        off = ok.get("official", {}).get("median_s")
        hf = ok.get("transformers", {}).get("median_s")
        faster = min([t for t in (off, hf) if t] or [None]) if (off or hf) else None
        for impl, r in impls.items():
            row = {"case": case, "impl": impl, **r}
            if "median_s" in r:
                for key, ref in (("vs_official", off), ("vs_transformers", hf), ("vs_faster_ref", faster)):
                    row[key] = round(r["median_s"] / ref, 3) if ref else None
                if off and r.get("peak_mb") and ok["official"].get("peak_mb"):
                    row["peak_vs_official"] = round(r["peak_mb"] / ok["official"]["peak_mb"], 3)
                if r.get("flops"):
                    row["gflops_per_s"] = round(r["flops"] / r["median_s"] / 1e9, 1)
                    row["fraction_of_fp32_peak"] = round(row["gflops_per_s"] / info["fp32_matmul_gflops"], 3)
            rows.append(row)
    get = {(r["case"], r["impl"]): r for r in rows}

    def ratio(case, impl, key):
        r = get.get((case, impl))
        return r.get(key) if r else None

    busy = [r for r in rows if r.get("busy_ratio") is not None and r["impl"].startswith("samhq")]
    worst_busy = max(r["busy_ratio"] for r in busy) if busy else None

    def best(case, key, impls=SAMHQ):
        values = [x for x in (ratio(case, i, key) for i in impls) if x is not None]
        return min(values) if values else None

    def vs_peers(case):  # samhq fp32 / the fastest of the other CPU runtimes (onnxruntime, OpenVINO)
        mine = get.get((case, "samhq fp32"), {}).get("median_s")
        peers = [get[(case, i)]["median_s"] for i in ("samhq onnxruntime", *OPENVINO) if "median_s" in get.get((case, i), {})]
        return round(mine / min(peers), 3) if mine and peers else None

    amg_case = next((c for c in results if c.startswith("vit_b automatic masks")), None)
    enc = "vit_b encoder 1024x1024"
    # issue 17's floors; "best samhq mode" is the fastest of fp32, bf16, int8, onnxruntime and fp32 masks only
    targets = {
        "vit_b encoder fp32 <= 0.70x transformers": (ratio(enc, "samhq fp32", "vs_transformers"), 0.70),
        "vit_b encoder fp32 >= 0.70 of the fp32 matmul peak": (ratio(enc, "samhq fp32", "fraction_of_fp32_peak"), 0.70, ">="),
        "vit_b encoder bf16 <= 0.25x transformers fp32 (CPUs with BF16 units)":
            (ratio(enc, "samhq bf16", "vs_transformers"), 0.25),
        "one prompt <= 0.15x the faster reference (best samhq mode)":
            (best("vit_b one prompt", "vs_faster_ref", SAMHQ + [MASKS_ONLY]), 0.15),
        "64 boxes <= 0.20x the faster reference (best samhq mode)":
            (best("vit_b 64 boxes", "vs_faster_ref", SAMHQ + [MASKS_ONLY]), 0.20),
        "automatic masks <= 0.15x official": (ratio(amg_case, "samhq fp32", "vs_official"), 0.15),
        "vit_h peak memory <= 0.45x official (best samhq mode)":
            (best("vit_h embed one image (memory)", "peak_vs_official", SAMHQ + ["samhq low-memory"]), 0.45),
        f"busy CPU <= {BUSY_TARGET}x quiet, every samhq row (the worst)": (worst_busy, BUSY_TARGET),
        "vit_b encoder: samhq fp32 / fastest other runtime <= 1": (vs_peers(enc), 1.0),
        "vit_b one prompt: samhq fp32 / fastest other runtime <= 1": (vs_peers("vit_b one prompt"), 1.0),
    }
    met = lambda v, t, op="<=": None if v is None else (v >= t if op == ">=" else v <= t)  # noqa: E731
    return rows, {k: {"value": x[0], "target": x[1], "met": met(*x)} for k, x in targets.items()}


def fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def busy_summary(rows: list[dict]) -> list[str]:
    """The busy column's worst rows (samhq and the references) and how much of a core the spinner held."""
    busy = [r for r in rows if r.get("busy_ratio") is not None]
    if not busy:
        return []
    out = []
    for label, group in (("samhq", [r for r in busy if r["impl"].startswith("samhq")]),
                         ("references", [r for r in busy if not r["impl"].startswith("samhq")])):
        if group:
            w = max(group, key=lambda r: r["busy_ratio"])
            out.append(f"worst {label} row {w['busy_ratio']:.2f}x ({w['case']}, {w['impl']})")
    shares = [r["spinner_core_share"] for r in busy if r.get("spinner_core_share") is not None]
    policies = sorted({f"{r['impl'].split()[0]}: {r['omp_wait_policy']}" for r in busy if r.get("omp_wait_policy")})
    return ["", f"Busy CPU (another process spins on one core for the whole measurement): busy/quiet {'; '.join(out)} "
                f"(target for samhq: <= {BUSY_TARGET}x). The spinner held {min(shares):.0%}–{max(shares):.0%} of a core. "
                f"OMP_WAIT_POLICY {', '.join(policies)}."]


def markdown(info: dict, rows: list[dict], targets: dict, quality: dict, quick: bool) -> str:
    where = (f"GPU {info['gpu']} (CUDA {info['cuda']}); host " if info.get("gpu") else "")
    lines = [
        f"Machine: {where}{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads, {info['cpu_capability']}; "
        f"flags {' '.join(info.get('cpu_flags', [])) or 'none listed'}), "
        f"torch {info['torch']}; measured matmul fp32 {info['fp32_matmul_gflops']} GFLOP/s, "
        f"bf16 {info['bf16_matmul_gflops']} GFLOP/s (BF16 units: {'yes' if info['bf16_units'] else 'no'})"
        + ("; peak MB is torch.cuda.max_memory_allocated" if info.get("gpu") else "")
        + (" — quick smoke run, not the benchmark" if quick else ""),
        "",
        "| case | implementation | median s | × official | × transformers | × faster ref | peak MB | busy s | busy/quiet "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "median_s" in r:
            note = []
            if r.get("gflops_per_s"):
                note.append(f"{r['gflops_per_s']} GFLOP/s = {r['fraction_of_fp32_peak']:.0%} of fp32 matmul peak")
            if r.get("num_masks") is not None:
                note.append(f"{r['num_masks']} masks")
            if r.get("peak_vs_official"):
                note.append(f"peak {r['peak_vs_official']}× official")
            if r["impl"] == "samhq low-memory":
                note.append("weights read from the memory-mapped checkpoint, each encoder module's pages handed back after use")
            lines.append(f"| {r['case']} | {r['impl']} | {r['median_s']:.3f} | {fmt(r.get('vs_official'))} | "
                         f"{fmt(r.get('vs_transformers'))} | {fmt(r.get('vs_faster_ref'))} | {r['peak_mb']:.0f} | "
                         f"{fmt(r.get('busy_median_s'))} | {fmt(r.get('busy_ratio'))} | {'; '.join(note)} |")
        else:
            lines.append(f"| {r['case']} | {r['impl']} | – | – | – | – | – | – | – | {r.get('skipped') or r.get('error')} |")
    rounds = max((len(r.get("round_medians", [])) for r in rows), default=0)
    if rounds:
        lines += ["", f"Each row is the median of {rounds} rounds of its measurement, the rows' order reversed every other "
                      "round (`--rounds`), so a drift in the machine's speed favours no row."]
    lines += busy_summary(rows)
    tuned = sorted({f"{r['impl'].split()[0]}: {'tuned' if r.get('malloc_tuned') else 'glibc defaults'}"
                    for r in rows if "median_s" in r})
    if tuned:
        lines += ["", f"malloc (samhq.limits.tune_malloc) {', '.join(tuned)}."]
    if quality:
        lines += ["", "Mask agreement with samhq fp32 (64 boxes, each mode's own embedding; random weights):", "",
                  "| case | mode | min IoU | mean IoU |", "|---|---|---|---|"]
        for _key, q in quality.items():
            lines.append(f"| {q['case']} | {q['impl']} | {q['min_iou']:.4f} | {q['mean_iou']:.4f} |")
    if not quick:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        for name, t in targets.items():
            lines.append(f"| {name} | {fmt(t['value'])} | {'–' if t['met'] is None else 'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: vit_tiny cases only, one repeat, 8x8 AMG grid")
    ap.add_argument("--out", default=None,
                    help="JSON output (default benchmarks/results.json, or results-quick.json with --quick)")
    ap.add_argument("--markdown", default=None, help="markdown table output (default: next to --out, results.md)")
    ap.add_argument("--compile", action="store_true", help="also time samhq with torch.compile (slow to compile)")
    ap.add_argument("--cases", default="",
                    help="run only the cases whose name contains this text (or one of several, comma-separated)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime and openvino engines")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per measurement")
    ap.add_argument("--amg-side", type=int, default=None, help="points per side of the AMG grid (default 32, 8 with --quick)")
    ap.add_argument("--busy", action="store_true",
                    help="measure everything a second time while another process keeps one core busy (the busy column)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure each case's rows this many times, alternating their order, and report the median of "
                         "the rounds (for a machine whose speed drifts between rows)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where every implementation runs (cuda: the GPU; int8 and onnxruntime are skipped there)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--machine", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be 1 or more")

    if args.worker:
        print(MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.machine:
        print(MARK + json.dumps(machine_info(args.device)), flush=True)
        return 0
    if args.prepare:
        spec = json.loads(args.prepare)
        print(MARK + json.dumps(prepare(spec["variant"], Path(spec["work"]), spec["onnx"])), flush=True)
        return 0

    # The parent stays small (no torch): a child's ru_maxrss starts from the RSS of the process that spawned it.
    start = time.time()
    info = run_child(["--machine", "--device", args.device], args.timeout)
    if "error" in info:
        raise SystemExit(f"measuring the machine failed: {info['error']}")
    if args.device == "cuda" and not info.get("gpu"):
        raise SystemExit(f"--device cuda: torch {info['torch']} sees no CUDA GPU here (torch.cuda.is_available() is False); "
                         "run it on a machine with an NVIDIA GPU and a CUDA build of torch, or leave out --device")
    print(f"machine: {info}", flush=True)
    # the ONNX engines run on the CPU only: no export for a GPU run
    have_onnx = (args.device == "cpu" and not args.no_onnx and info["onnx"] is not None
                 and (info["onnxruntime"] or info["openvino"]) is not None)
    plan = [c for c in cases(args.quick) if any(part in c["name"] for part in args.cases.split(","))]
    for c in plan:
        if c["kind"] == "amg" and args.amg_side:
            c["side"] = args.amg_side
            c["name"] = c["name"].rsplit(" ", 1)[0] + f" {args.amg_side}x{args.amg_side}"
    if not plan:
        raise SystemExit(f"no case name contains {args.cases!r}")
    if args.compile:
        for c in plan:
            if c["kind"] == "encoder":
                c["impls"].insert(1, "samhq compile")
    results, quality = {}, {}
    with tempfile.TemporaryDirectory(prefix="samhq-bench-") as tmp:
        work = Path(tmp)
        prep = {}
        for variant in dict.fromkeys(c["variant"] for c in plan):
            t0 = time.time()
            prep[variant] = run_child(["--prepare", json.dumps({"variant": variant, "work": str(work), "onnx": have_onnx})],
                                      args.timeout)
            if "error" in prep[variant]:
                raise SystemExit(f"preparing {variant} failed: {prep[variant]['error']}")
            print(f"prepared {variant} in {time.time() - t0:.0f} s", flush=True)
        for case in plan:
            results[case["name"]] = row = {}
            runnable = []
            for impl in case["impls"]:
                row[impl] = None  # the table keeps the case's order
                reason = skip_reason(impl, case, info, prep[case["variant"]])
                if reason:
                    row[impl] = {"skipped": reason}
                    print(f"{case['name']:32s} {impl:18s} skipped: {reason}", flush=True)
                    continue
                masks_out = str(work / f"masks-{len(results)}-{impl.replace(' ', '_')}.npy")
                runnable.append((impl, dict(prep[case["variant"]], impl=impl, case=case, variant=case["variant"],
                                            masks_out=masks_out, device=args.device)))
            measured = {impl: [] for impl, _ in runnable}
            for k in range(args.rounds):  # forward, then backward: a drifting machine speed favours no row
                for impl, spec in runnable if k % 2 == 0 else runnable[::-1]:
                    r = run_child(["--worker", json.dumps(spec)], args.timeout)
                    measured[impl].append(r)
                    shown = f"{r['median_s']:.3f} s, peak {r['peak_mb']:.0f} MB" if "median_s" in r else f"ERROR {r['error']}"
                    if k == args.rounds - 1:  # the last round: the row, and its busy twin measured right after
                        row[impl] = r = combine_rounds(measured[impl])
                        if args.busy and "median_s" in r:
                            shown += "; " + measure_busy(r, spec, args.timeout)
                    print(f"{case['name']:32s} {impl:18s} {shown}" + (f" (round {k + 1})" if args.rounds > 1 else ""),
                          flush=True)
        import numpy as np

        for case, impls in results.items():
            base = impls.get("samhq fp32", {}).get("masks_file")
            for impl, r in impls.items():
                if base and r.get("masks_file") and impl != "samhq fp32":
                    iou = mask_ious(np.load(r["masks_file"]), np.load(base))
                    quality[f"{case}/{impl}"] = {"case": case, "impl": impl,
                                                 "min_iou": float(iou.min()), "mean_iou": float(iou.mean())}
            for r in impls.values():
                r.pop("masks_file", None)
    rows, targets = summarize(results, info)
    report = {"machine": info, "amg_thresholds": {v: prep[v].get("amg") for v in prep}, "quick": args.quick,
              "rounds": args.rounds, "image_size": list(IMAGE_SIZE), "results": results, "rows": rows,
              "quality": quality, "targets": targets, "wall_s": round(time.time() - start, 1)}
    name = "results" + ("-quick" if args.quick else "") + ("-cuda" if args.device == "cuda" else "")
    out = Path(args.out) if args.out else HERE / f"{name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md = markdown(info, rows, targets, quality, args.quick)
    md_path = Path(args.markdown) if args.markdown else out.with_suffix(".md")
    md_path.write_text(md, encoding="utf-8")
    print("\n" + md)
    print(f"wrote {out} and {md_path} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
