"""Engines: what runs a model for the predictor front end (`samhq.predictor.SamHQPredictor`).

An engine does two things (plus `prepare`, the per-image part of decoding) and nothing else:
- `embed(pixel_values)`: the per-image work, pixel_values (1, 3, S, S) float32 (normalised, padded;
  made by the front end) -> a dict of image features;
- `decode(features, points, labels, boxes, masks, multimask_output, hq_token_only, selection)`: B
  prompts in the resized input frame (validated by the front end) -> low-resolution mask logits
  (B, M, m, m) float32 and their predicted IoU (B, M), selected by `select_masks`.
Image intake, resizing, prompt checks, post-processing and embedding files are the front end's.

The engines: `TorchEngine` (the torch model), and over the files `samhq export onnx` writes, `OnnxEngine`
(onnxruntime) and `OpenVinoEngine` (OpenVINO), which share everything but running the files.
Every engine's feature dict holds "features" (the image embedding, (1, 256, h, w)), plus what its
decoder needs: for SAM-HQ the torch engine keeps the early ViT features ("early_features") and derives
the HQ features and the decoder's per-image context on first use, while the ONNX-file engines'
encoder returns the HQ features ("hq_features") directly; for SAM 2 all keep the two high-resolution
maps ("high_res_s0", "high_res_s1"). `saved_features` names what an embedding file keeps; `family`
("sam" or "sam2"), `transform` and `selection` are the model family's.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .export.onnx import DECODER_FILE, ENCODER_FILE, ENCODER_OUTPUTS, META_FILE, SAM2_ENCODER_OUTPUTS, export_onnx
from .limits import glibc_malloc
from .modeling.mask_selection import best_score, select_masks
from .modeling.model import model_fingerprint
from .processing import ResizeLongestSide, ResizeSquare


def _prompt_batch(points, labels, boxes, masks):
    """The predictor's B prompts in the model's (images=1, prompts=B) layout."""
    b = next(len(t) for t in (points, boxes, masks) if t is not None)
    pts = points[None] if points is not None else None
    lab = labels[None].to(torch.int) if labels is not None else None
    box = boxes.reshape(1, b, 4) if boxes is not None else None
    mask = None
    if masks is not None:  # per prompt; a mask alone is a batch of B one-prompt "images"
        mask = masks.reshape(*((1, b) if pts is not None or box is not None else (b, 1)), *masks.shape[-2:])
    return pts, lab, box, mask


class TorchEngine:
    """A torch model of either family as an engine: `SamHQModel` (SAM-HQ, SAM) or `SamHQ2Model` (HQ-SAM 2, SAM 2.1).

    The model supplies the per-family work (`embed_image`, `prepare_features`, `decode_features`,
    `saved_features`, `stability`); the engine adds the family's image transform and output selection.
    """

    name = "torch"

    def __init__(self, model):
        self.model = model
        self.image_size = model.config.image_size if is_sam2(model) else model.config.vision_config.image_size
        self.mask_size = model.mask_size
        self.transform = ResizeSquare(self.image_size) if is_sam2(model) else ResizeLongestSide(self.image_size)
        self.selection = "token_order" if is_sam2(model) else "best"  # the official predictors'
        self.family = "sam2" if is_sam2(model) else "sam"
        self.saved_features = model.saved_features

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def hq_enabled(self) -> bool:
        return self.model.hq_enabled

    def fingerprint(self) -> str:
        return model_fingerprint(self.model)

    @torch.no_grad()
    def embed(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.embed_image(pixel_values.to(self.device))

    def load_features(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Saved features (see `saved_features`) on this engine's device and dtype."""
        missing = [k for k in self.saved_features if k not in tensors and (k != "early_features" or self.hq_enabled)]
        if missing:
            raise ValueError(f"the image embedding lacks {', '.join(missing)}, which this model needs; embed the image again")
        return {k: tensors[k].to(device=self.device, dtype=self.model.dtype) for k in self.saved_features if k in tensors}

    def prepare(self, features: dict) -> dict:
        """Add the per-image work every prompt shares, once (see the model's `prepare_features`)."""
        return self.model.prepare_features(features)

    @torch.no_grad()
    def decode(self, features, points, labels, boxes, masks, multimask_output: bool, hq_token_only: bool,
               selection: str = "best", sam_token_only: bool = False,
               pred_iou_thresh: float | None = None,
               mask_extent: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        pts, lab, box, mask = _prompt_batch(points, labels, boxes, masks)
        if mask is not None:
            mask = mask.to(model.dtype)
        needed = None
        if pred_iou_thresh is not None:
            def needed(iou):  # in float32, as the caller compares the returned scores
                return best_score(iou.float(), multimask_output, model.stability) > pred_iou_thresh
        all_masks, iou = model.decode_features(features, pts, lab, box, mask, needed=needed, mask_extent=mask_extent)
        # a plain SAM checkpoint gives what segment_anything's predictor gives: the masks in token order
        selection = selection if model.hq_enabled else "token_order"
        low_res, scores = select_masks(all_masks.flatten(0, 1)[None], iou.flatten(0, 1)[None], multimask_output,
                                       hq_token_only, selection, sam_token_only, model.stability)
        return low_res[0].float(), scores[0].float()


def is_sam2(model) -> bool:
    """True for a SAM 2 family model (SAM 2.1, HQ-SAM 2)."""
    return getattr(model.config, "model_type", "") == "sam_hq2"


class _OnnxFileEngine:
    """What the engines over `samhq export onnx`'s files share: reading `samhq_onnx.json` and the two models, the
    fingerprint, the feature dicts and the decoder's inputs. A subclass loads the files (`_load`) and runs them
    (`_run`: a dict of named numpy inputs -> the named outputs as numpy arrays, in the order asked).

    Either family (samhq_onnx.json's "family": "sam" for SAM-HQ, "sam2" for HQ-SAM 2 / SAM 2.1). `model` is the
    torch model when the engine was made from one (`from_model`), else None. Both such engines read the same
    files and return the same features, so their embedding files (same fingerprint) move between them.
    """

    name = ""

    def __init__(self, onnx_dir: str | os.PathLike, model=None, **options):
        self._runtime()
        onnx_dir = Path(onnx_dir)
        meta_path = onnx_dir / META_FILE
        if not meta_path.is_file():
            raise ValueError(f"{onnx_dir} has no {META_FILE}; create it with `samhq export onnx SRC {onnx_dir}`")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != "samhq-onnx":
            raise ValueError(f"{meta_path} is not a samhq ONNX export description")
        self.meta = meta
        self.family = meta.get("family", "sam")
        if self.family not in ("sam", "sam2"):
            raise ValueError(f"{meta_path}: unknown model family {self.family!r}; re-export with this version of samhq")
        sam2 = self.family == "sam2"
        self.hq_enabled = bool(meta.get("hq", True))  # SAM-HQ v1 exports are always HQ
        self.image_size = int(meta["image_size"])
        self.mask_size = int(meta["low_res_size"])
        self.device = torch.device("cpu")
        self.transform = ResizeSquare(self.image_size) if sam2 else ResizeLongestSide(self.image_size)
        self.selection = "token_order" if sam2 else "best"  # the official predictors'
        self.saved_features = ("features", "high_res_s0", "high_res_s1") if sam2 else ("features", "hq_features")
        paths = [onnx_dir / ENCODER_FILE, onnx_dir / DECODER_FILE]
        for p in paths:
            if not p.is_file():
                raise ValueError(f"{p} is missing; export both models with `samhq export onnx SRC {onnx_dir}`")
        self.encoder, self.decoder = (self._load(p, **options) for p in paths)
        self._encoder_outputs = SAM2_ENCODER_OUTPUTS if sam2 else ENCODER_OUTPUTS
        self._decoder_inputs = set(self._input_names(self.decoder))
        self._fingerprint = meta.get("fingerprint") or hashlib.sha256(paths[0].read_bytes()).hexdigest()[:16]
        self.model = model

    @staticmethod
    def _runtime():
        """The runtime's module; ImportError naming the extra that installs it."""
        raise NotImplementedError

    def _load(self, path: Path, **options):
        raise NotImplementedError

    def _input_names(self, loaded) -> list[str]:
        raise NotImplementedError

    def _run(self, loaded, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def _infer(self, loaded, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        """`_run` with glibc's own malloc behaviour, the heap's free memory handed back after it (`limits.glibc_malloc`)."""
        with glibc_malloc():
            return self._run(loaded, feeds, outputs)

    @classmethod
    def from_model(cls, model, onnx_dir: str | os.PathLike | None = None, **options):
        """Export a torch model (to `onnx_dir`, or a temporary directory kept while the engine lives) and load it;
        `options` are the engine's (threads, ...)."""
        cls._runtime()  # before a slow export
        tmp = None
        if onnx_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="samhq-onnx-")
            onnx_dir = tmp.name
        export_onnx(model, onnx_dir)
        engine = cls(onnx_dir, model=model, **options)
        engine._tmp = tmp
        return engine

    def fingerprint(self) -> str:
        return self._fingerprint

    def embed(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self._infer(self.encoder, {"pixel_values": pixel_values.detach().cpu().float().numpy()}, self._encoder_outputs)
        return {k: torch.from_numpy(v) for k, v in zip(self.saved_features, outputs)}

    def load_features(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [k for k in self.saved_features if k not in tensors]
        if missing:
            raise ValueError(f"the image embedding has no {', '.join(missing)}: it was made by another engine or model family; "
                             "embed the image again")
        return {k: tensors[k].float().cpu() for k in self.saved_features}

    def prepare(self, features: dict) -> dict:
        return features  # the exported encoder already returns everything the decoder needs

    def decode(self, features, points, labels, boxes, masks, multimask_output: bool, hq_token_only: bool,
               selection: str | None = None, sam_token_only: bool = False,
               pred_iou_thresh: float | None = None,
               mask_extent: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # pred_iou_thresh and mask_extent are only hints: the exported decoder computes every prompt's whole masks
        if (selection or self.selection) != self.selection or sam_token_only:
            raise ValueError(f"the exported decoder returns the official predictor's masks (selection {self.selection!r}, "
                             "SAM + HQ or HQ alone); use the torch engine for other selections")
        if hq_token_only and not self.hq_enabled:
            raise ValueError("hq_token_only=True needs the HQ token, but this model was exported without HQ weights")
        b = next(len(t) for t in (points, boxes, masks) if t is not None)
        corners = None
        if boxes is not None:  # box corners are points labelled 2 and 3
            corners = (boxes.float().cpu().reshape(-1, 2, 2), torch.tensor([[2.0, 3.0]]).expand(b, 2))
        clicks = (points.float().cpu(), labels.float().cpu()) if points is not None else None
        # SAM: [points, box corners], one padding point when there is no box; SAM 2: [box corners, points] and
        # always one "not a point" token. A mask alone: no sparse tokens.
        parts = [corners, clicks] if self.family == "sam2" else [clicks, corners]
        parts = [x for x in parts if x is not None]
        if parts and (self.family == "sam2" or boxes is None):
            parts.append((torch.zeros(b, 1, 2), torch.full((b, 1), -1.0)))
        coords = torch.cat([c for c, _ in parts], dim=1) if parts else torch.zeros(b, 0, 2)
        point_labels = torch.cat([lab for _, lab in parts], dim=1) if parts else torch.zeros(b, 0)
        s = self.mask_size
        mask, has_mask = (masks.float().cpu(), 1.0) if masks is not None else (torch.zeros(1, 1, s, s), 0.0)
        feeds = {k: features[k].numpy() for k in self.saved_features}
        feeds.update({
            "point_coords": coords.contiguous().numpy(),
            "point_labels": point_labels.contiguous().numpy(),
            "mask_input": mask.contiguous().numpy(),
            "has_mask_input": np.array([has_mask], np.float32),
            "orig_im_size": np.array([s, s], np.float32),  # only the low-res outputs are used here
            "multimask_output": np.array([float(multimask_output)], np.float32),
            "hq_token_only": np.array([float(hq_token_only)], np.float32),
        })
        feeds["image_embeddings"] = feeds.pop("features")
        feeds = {k: v for k, v in feeds.items() if k in self._decoder_inputs}
        scores, low_res = self._infer(self.decoder, feeds, ["iou_predictions", "low_res_masks"])
        return torch.from_numpy(low_res), torch.from_numpy(scores)


def _session(path: Path, threads: int | None, providers):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False  # the arena keeps every large full-size mask buffer alive: 2-3x the peak memory
    # onnxruntime's threads spin while they wait, which stalls them on a busy CPU; they follow samhq's OpenMP
    # policy (PASSIVE unless the user set ACTIVE; docs/performance.md, "Threads and busy CPUs")
    spin = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "ACTIVE"
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


class OnnxEngine(_OnnxFileEngine):
    """`encoder.onnx` and `decoder.onnx` (written by `samhq export onnx`) run with onnxruntime.

    threads: onnxruntime's intra-op threads (None: its default, one per core); providers: onnxruntime
    execution providers (default ["CPUExecutionProvider"]). Raises ImportError without onnxruntime,
    ValueError for a folder that is not a complete samhq ONNX export.
    """

    name = "onnxruntime"

    def __init__(self, onnx_dir: str | os.PathLike, threads: int | None = None, providers=None, model=None):
        super().__init__(onnx_dir, model=model, threads=threads, providers=providers)

    @staticmethod
    def _runtime():
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("the onnxruntime engine needs onnxruntime: pip install 'samhq[onnx]'") from None
        return onnxruntime

    def _load(self, path: Path, threads=None, providers=None):
        return _session(path, threads, providers)

    def _input_names(self, session) -> list[str]:
        return [i.name for i in session.get_inputs()]

    def _run(self, session, feeds, outputs):
        return session.run(outputs, feeds)


class OpenVinoEngine(_OnnxFileEngine):
    """The same ONNX files run with OpenVINO (Intel's CPU runtime), compiled for the CPU.

    precision: OpenVINO's INFERENCE_PRECISION_HINT, "f32" (default; equal to the torch engine within 1e-4) or
    "bf16" (on CPUs with BF16 units, AVX512-BF16 / AMX, OpenVINO runs the matrix work in bfloat16; on others it
    keeps f32). `inference_precision` records what the compiled encoder actually runs ("f32" or "bf16").
    threads: INFERENCE_NUM_THREADS (None: OpenVINO's default, one per core). One inference request per model:
    calls from several threads need the caller's lock. Raises ImportError without openvino, ValueError for an
    unknown precision or a folder that is not a complete samhq ONNX export.
    """

    name = "openvino"

    def __init__(self, onnx_dir: str | os.PathLike, threads: int | None = None, precision: str = "f32", model=None):
        if precision not in ("f32", "bf16"):
            raise ValueError(f"precision must be 'f32' or 'bf16', got {precision!r}")
        self._core = self._runtime().Core()
        super().__init__(onnx_dir, model=model, threads=threads, precision=precision)
        self.precision = precision
        self.inference_precision = self._precision_of(self.encoder)

    @staticmethod
    def _runtime():
        try:
            import openvino
        except ImportError:
            raise ImportError("the openvino engine needs OpenVINO: pip install 'samhq[openvino]'") from None
        return openvino

    def _load(self, path: Path, threads=None, precision="f32"):
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        compiled = self._core.compile_model(self._core.read_model(str(path)), "CPU", config)
        return compiled, compiled.create_infer_request()

    @staticmethod
    def _precision_of(loaded) -> str:
        value = loaded[0].get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type: "f32", "bf16"
        return value.to_string() if hasattr(value, "to_string") else str(value)

    def _input_names(self, loaded) -> list[str]:
        # every name of each input: OpenVINO may list a graph input under an inner tensor's name first
        return [name for i in loaded[0].inputs for name in i.get_names()]

    def _run(self, loaded, feeds, outputs):
        unfed = [i.get_any_name() for i in loaded[0].inputs if not i.get_names() & feeds.keys()]
        if unfed:  # OpenVINO would run with whatever the request's buffer held
            raise RuntimeError(f"no value for the model inputs {unfed}; re-export the model with this version of samhq")
        results = loaded[1].infer(feeds, share_outputs=False)  # copies: the request's buffers are reused by the next call
        return [results[name] for name in outputs]
