"""Track objects through a video with SAM 2.1 / HQ-SAM 2: prompts on some frames, masks on every frame.

`SamHQ2VideoPredictor` has the API of Meta's `SAM2VideoPredictor` (sam2 1.1.0) and follows its
semantics: each object is tracked on its own, with its own memory bank, so objects can be added,
corrected or removed at any time; a prompt on a frame not yet tracked makes it a conditioning frame
(segmented like an image, then remembered); a prompt on a tracked frame corrects it. HQ-SAM 2
checkpoints add their HQ mask to every frame's mask, as SysCV's `SAM2HQVideoPredictor` does.

    predictor = SamHQ2VideoPredictor.from_pretrained("sam2.1_hq_hiera_large.pt")
    state = predictor.init_state("video.mp4")              # or a folder of frames, or a list of arrays
    predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=[[210, 350]], labels=[1])
    predictor.add_new_points_or_box(state, frame_idx=0, obj_id=2, box=[300, 0, 500, 400])
    for frame_idx, obj_ids, mask_logits in predictor.propagate_in_video(state):
        masks = (mask_logits > 0).cpu().numpy()              # (objects, 1, H, W) bool, in the video's pixels

Memory: frames are read when needed (never all at once); each frame's image features are kept for
the `feature_window` most recently used frames (on the model's device, or on the CPU with
`offload_state_to_cpu`), and written to `feature_cache_dir` when given, instead of recomputed. What
stays per tracked frame and object is small: the memory features (mem_dim x S/16 x S/16, bfloat16),
the low-resolution mask logits (S/4 x S/4), the object pointer and score, as in Meta's predictor.

Frames go through samhq's one image intake (`samhq.image_io.to_rgb_array`) and SAM 2's one image
transform (`samhq.processing.ResizeSquare`). (Meta's video loader resizes with PIL instead of the
torchvision resize of its image predictor; we use the one transform for both.) Coordinates are (x, y)
pixels of the video frame, as in `SamHQPredictor`, or in [0, 1] with `normalize_coords=False`.
Video files need PyAV (`pip install 'samhq[video]'`).
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .image_io import to_rgb_array
from .limits import check_prompt_count
from .modeling.sam2 import tracking
from .modeling.sam2.tracking import NO_OBJ_SCORE
from .processing import ResizeSquare, fill_holes_and_sprinkles

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")


# ---------------------------------------------------------------------------------------------
# Frames, read lazily


def natural_key(name: str):
    """Sort key that orders "frame2" before "frame10"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


class VideoFrames:
    """The frames of a video as (H, W, 3) uint8 RGB arrays, read on access; `len()`, `[i]`, `height`, `width`,
    `names` (a name per frame, for output files). All frames must have the first frame's size."""

    def __init__(self, read, count: int, names: list[str], source: str):
        self._read, self._count, self.names, self.source = read, count, names, source
        self.height = self.width = None
        if count == 0:
            raise ValueError(f"{source}: no frames")
        first = self[0]
        self.height, self.width = first.shape[:2]

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self._count:
            raise IndexError(f"frame {index} is outside 0..{self._count - 1}")
        rgb = to_rgb_array(self._read(index))
        if not rgb.flags.writeable:  # decoded images can be read-only views; torch wants to own what it wraps
            rgb = rgb.copy()
        if self.height is not None and rgb.shape[:2] != (self.height, self.width):
            raise ValueError(f"{self.source}: frame {self.names[index]} is {rgb.shape[1]}x{rgb.shape[0]} pixels, the first "
                             f"frame {self.width}x{self.height}; every frame of a video must have one size")
        return rgb

    def subset(self, start: int = 0, stop: int | None = None, step: int = 1) -> "VideoFrames":
        """Frames start, start + step, ... before stop (a frame range and stride), read from this source."""
        indices = range(len(self))[start:stop:step]
        if step < 1:
            raise ValueError(f"the frame stride must be >= 1, got {step}")
        return VideoFrames(lambda i: self._read(indices[i]), len(indices), [self.names[i] for i in indices], self.source)


class _VideoFile:
    """Random access to a video file's frames with PyAV: packet timestamps are listed once (no decoding), frames
    are decoded in order and a backward jump seeks to the keyframe before it."""

    def __init__(self, path: Path):
        try:
            import av
        except ImportError:
            raise ImportError("reading video files needs PyAV: pip install 'samhq[video]' (or pip install av), "
                              "or extract the frames into a folder") from None
        self.path = path
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stamps = [p.pts if p.pts is not None else p.dts for p in container.demux(stream) if p.size > 0]
        except (av.error.FFmpegError, IndexError, OSError) as e:
            raise ValueError(f"{path}: not a readable video ({e})") from None
        self.pts = sorted(t for t in stamps if t is not None)
        self._av, self._container, self._frames, self._next = av, None, None, None

    def _open_at(self, index: int):
        if self._container is None:
            self._container = self._av.open(str(self.path))
        stream = self._container.streams.video[0]
        if index > 0:
            self._container.seek(self.pts[index], stream=stream, backward=True, any_frame=False)
        else:
            self._container.seek(self.pts[0] if self.pts else 0, stream=stream, backward=True, any_frame=False)
        self._frames = self._container.decode(stream)

    def __call__(self, index: int) -> np.ndarray:
        if self._next != index:
            self._open_at(index)
        target = self.pts[index]
        for frame in self._frames:
            if frame.pts is None or frame.pts >= target:
                self._next = index + 1
                return frame.to_ndarray(format="rgb24")
        raise ValueError(f"{self.path}: frame {index} could not be decoded")

    def close(self):
        if self._container is not None:
            self._container.close()
            self._container = None


def open_video(video) -> VideoFrames:
    """A video as lazily read frames: a folder of images (natural name order), a video file (PyAV), or a list of
    images (arrays, tensors, PIL images, paths, bytes; anything `samhq.image_io.to_rgb_array` reads).

    Raises FileNotFoundError for a missing path, ValueError for an empty folder, unreadable frames or frames of
    different sizes, ImportError for a video file without PyAV.
    """
    if isinstance(video, VideoFrames):
        return video
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        if path.is_dir():
            files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                           key=lambda p: natural_key(p.name))
            if not files:
                raise ValueError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            names = [p.stem for p in files]
            if len(set(names)) < len(names):  # "a.jpg" and "a.png"
                names = [p.name.replace(".", "_") for p in files]
            return VideoFrames(lambda i: files[i], len(files), names, str(path))
        reader = _VideoFile(path)
        return VideoFrames(reader, len(reader.pts), [f"{i:05d}" for i in range(len(reader.pts))], str(path))
    if isinstance(video, (list, tuple)) or (isinstance(video, np.ndarray) and video.ndim == 4) or \
            (isinstance(video, torch.Tensor) and video.ndim == 4):
        frames = video
        return VideoFrames(lambda i: frames[i], len(frames), [f"{i:05d}" for i in range(len(frames))], "the frame list")
    raise TypeError(f"unsupported video {type(video).__name__}: pass a folder of frames, a video file, or a list of images")


def masks_to_label_map(obj_ids, logits: np.ndarray) -> np.ndarray:
    """Per-object mask logits (N, H, W) -> an (H, W) label map: each pixel the id of the object with the highest
    positive logit there, else 0; uint8, or uint16 when an id is over 255 (ids must be 1..65535)."""
    ids = np.asarray(obj_ids, dtype=np.int64)
    if ids.size == 0 or ids.min() < 1 or ids.max() > 65535:
        raise ValueError(f"object ids must be whole numbers 1..65535 to be stored in a label map, got {list(obj_ids)}")
    ids = ids.astype(np.uint16 if ids.max() > 255 else np.uint8)
    logits = np.asarray(logits)
    return np.where(logits.max(axis=0) > 0, ids[logits.argmax(axis=0)], 0).astype(ids.dtype)


# ---------------------------------------------------------------------------------------------
# Image features of a bounded window of frames


class FeatureCache:
    """Per-frame image features (`tracking.frame_features`), computed on demand: the `window` most recently used
    frames are kept (on `storage_device`); with `cache_dir`, evicted ones are written there (safetensors) and read
    back instead of recomputed."""

    def __init__(self, compute, window: int, storage_device, cache_dir=None):
        if window < 1:
            raise ValueError(f"feature_window must be >= 1, got {window}")
        self.compute, self.window, self.storage_device = compute, window, torch.device(storage_device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.kept: OrderedDict[int, dict] = OrderedDict()
        self.position = None  # the same for every frame

    def _file(self, index: int) -> Path:
        return self.cache_dir / f"frame_{index:06d}.safetensors"

    def get(self, index: int, device) -> dict:
        """Frame `index`'s "features" (1, C, h, w), "position" (1, C, h, w) and "high_res" list, on `device`."""
        if index in self.kept:
            self.kept.move_to_end(index)
            stored = self.kept[index]
        else:
            stored = None
            if self.cache_dir is not None and self._file(index).exists():
                from safetensors.torch import load_file

                flat = load_file(str(self._file(index)), device=str(self.storage_device))
                stored = {"features": flat["features"], "high_res": [flat[k] for k in sorted(flat) if k.startswith("high_res")]}
            if stored is None:
                computed = self.compute(index)
                self.position = computed["position"].to(self.storage_device)
                stored = {"features": computed["features"].to(self.storage_device),
                          "high_res": [f.to(self.storage_device) for f in computed["high_res"]]}
            self.kept[index] = stored
            while len(self.kept) > self.window:
                old, evicted = self.kept.popitem(last=False)
                if self.cache_dir is not None and not self._file(old).exists():
                    from safetensors.torch import save_file

                    flat = {"features": evicted["features"], **{f"high_res{i}": t for i, t in enumerate(evicted["high_res"])}}
                    save_file({k: v.contiguous().cpu() for k, v in flat.items()}, str(self._file(old)))
        if self.position is None:  # features read back from disk before any was computed in this session
            self.position = self.compute(index)["position"].to(self.storage_device)
        return {"features": stored["features"].to(device), "position": self.position.to(device),
                "high_res": [f.to(device) for f in stored["high_res"]]}

    def clear(self):
        self.kept.clear()


# ---------------------------------------------------------------------------------------------
# Inference state


class VideoInferenceState:
    """One video's tracking session (Meta's `inference_state`): the frames, the objects, their prompts and outputs.

    Attributes: `frames` (`VideoFrames`), `num_frames`, `video_height`, `video_width`, `obj_ids` (the caller's ids,
    in the order of the masks returned), `device` (compute), `storage_device`. Per object index:
    `point_inputs_per_obj`, `mask_inputs_per_obj`, `output_dict_per_obj` ({"cond_frame_outputs": {frame: out},
    "non_cond_frame_outputs": {frame: out}}), `temp_output_dict_per_obj` (outputs of prompts not yet propagated),
    `frames_tracked_per_obj` ({frame: {"reverse": bool}}).
    """

    def __init__(self, frames: VideoFrames, device, storage_device, features: FeatureCache):
        self.frames = frames
        self.num_frames = len(frames)
        self.video_height, self.video_width = frames.height, frames.width
        self.device, self.storage_device = torch.device(device), torch.device(storage_device)
        self.features = features
        self.constants: dict = {}
        self.obj_id_to_idx: OrderedDict = OrderedDict()
        self.obj_idx_to_id: OrderedDict = OrderedDict()
        self.obj_ids: list = []
        self.point_inputs_per_obj: dict = {}
        self.mask_inputs_per_obj: dict = {}
        self.output_dict_per_obj: dict = {}
        self.temp_output_dict_per_obj: dict = {}
        self.frames_tracked_per_obj: dict = {}

    def __getitem__(self, key):  # Meta's inference_state is a dict; its keys read the same here
        return getattr(self, key)


# ---------------------------------------------------------------------------------------------
# The predictor


class SamHQ2VideoPredictor:
    """SAM 2 / HQ-SAM 2 video predictor over a `SamHQ2Model` with video modules.

    fill_hole_area: background holes of at most this many low-resolution pixels inside an object's mask are
    filled (8-connected; Meta's `build_sam2_video_predictor` uses 8; 0 = off; needs scipy).
    non_overlap_masks: each pixel goes to the highest-scoring object in the returned masks.
    clear_non_cond_mem_around_input: a correction on a frame drops that object's tracked memories within
    num_maskmem x stride frames of it. add_all_frames_to_correct_as_cond: corrected frames become conditioning
    frames. feature_window: frames whose image features are kept in memory (>= 1); feature_cache_dir: a folder
    to keep evicted features in (read back instead of recomputed). Raises ValueError for a model without video
    modules.
    """

    def __init__(self, model, fill_hole_area: int = 8, non_overlap_masks: bool = False,
                 clear_non_cond_mem_around_input: bool = False, add_all_frames_to_correct_as_cond: bool = False,
                 feature_window: int = 4, feature_cache_dir=None):
        if not getattr(model, "has_video", False):
            raise ValueError("this SAM 2 model has no video modules (memory encoder, memory attention): load a full "
                             "SAM 2 / SAM 2.1 / HQ-SAM 2 checkpoint such as sam2.1_hiera_large.pt or sam2.1_hq_hiera_large.pt")
        self.model = model.eval()
        self.fill_hole_area = fill_hole_area
        self.non_overlap_masks = non_overlap_masks
        self.clear_non_cond_mem_around_input = clear_non_cond_mem_around_input
        self.add_all_frames_to_correct_as_cond = add_all_frames_to_correct_as_cond
        self.feature_window = feature_window
        self.feature_cache_dir = feature_cache_dir
        self.transform = ResizeSquare(model.config.image_size)
        self.image_size = model.config.image_size

    @classmethod
    def from_pretrained(cls, source, device=None, dtype=None, **kwargs) -> "SamHQ2VideoPredictor":
        """Load a full SAM 2 / SAM 2.1 / HQ-SAM 2 checkpoint (`samhq.modeling.sam2.load_sam2_model`) and wrap it."""
        from .modeling.sam2 import load_sam2_model

        return cls(load_sam2_model(source, device=device, dtype=dtype), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- session ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def init_state(self, video=None, offload_video_to_cpu: bool = False, offload_state_to_cpu: bool = False,
                   async_loading_frames: bool = False, *, video_path=None, feature_window: int | None = None,
                   feature_cache_dir=None) -> VideoInferenceState:
        """Start a session on `video` (or `video_path`, Meta's name; see `open_video`). offload_state_to_cpu keeps the
        per-frame outputs and the image features on the CPU (saves GPU memory, a little slower). Frames are always
        read when needed and never kept on the GPU, so Meta's offload_video_to_cpu and async_loading_frames have
        nothing to change and are accepted for compatibility. feature_window / feature_cache_dir override the
        predictor's. Frame 0's features are computed now. Raises ValueError / FileNotFoundError for unreadable videos."""
        if (video is None) == (video_path is None):
            raise ValueError("give the video once: init_state(video) or init_state(video_path=...)")
        frames = open_video(video if video is not None else video_path)
        storage = torch.device("cpu") if offload_state_to_cpu else self.device
        cache_dir = feature_cache_dir if feature_cache_dir is not None else self.feature_cache_dir
        cache = FeatureCache(lambda i: self._compute_features(frames, i), feature_window or self.feature_window, storage,
                             cache_dir)
        state = VideoInferenceState(frames, self.device, storage, cache)
        cache.get(0, self.device)
        return state

    def _compute_features(self, frames: VideoFrames, index: int) -> dict:
        pixels = self.transform.preprocess(frames[index]).to(self.device)
        return tracking.frame_features(self.model, pixels)

    def _frame_features(self, state: VideoInferenceState, frame_idx: int, batch: int = 1) -> dict:
        f = state.features.get(frame_idx, state.device)
        return {"features": f["features"].expand(batch, -1, -1, -1), "position": f["position"],
                "high_res": [h.expand(batch, -1, -1, -1) for h in f["high_res"]]}

    def _obj_idx(self, state: VideoInferenceState, obj_id) -> int:
        idx = state.obj_id_to_idx.get(obj_id)
        if idx is not None:
            return idx
        idx = len(state.obj_id_to_idx)
        state.obj_id_to_idx[obj_id] = idx
        state.obj_idx_to_id[idx] = obj_id
        state.obj_ids = list(state.obj_id_to_idx)
        state.point_inputs_per_obj[idx] = {}
        state.mask_inputs_per_obj[idx] = {}
        state.output_dict_per_obj[idx] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        state.temp_output_dict_per_obj[idx] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        state.frames_tracked_per_obj[idx] = {}
        return idx

    def _check_frame(self, state: VideoInferenceState, frame_idx) -> int:
        if isinstance(frame_idx, bool) or not isinstance(frame_idx, (int, np.integer)) or not 0 <= frame_idx < state.num_frames:
            raise ValueError(f"frame_idx must be a frame number in 0..{state.num_frames - 1}, got {frame_idx!r}")
        return int(frame_idx)

    # -- prompts ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def add_new_points_or_box(self, inference_state: VideoInferenceState, frame_idx: int, obj_id, points=None, labels=None,
                              clear_old_points: bool = True, normalize_coords: bool = True, box=None):
        """Click points (N, 2) (x, y) with labels (N,) (1 foreground, 0 background) and/or a box (4,) x0, y0, x1, y1
        for object `obj_id` on `frame_idx`; pixels of the video frame (normalize_coords=True) or in [0, 1].

        A box is only a first prompt (clear_old_points=True); with clear_old_points=False the points are added to the
        frame's earlier ones. Returns (frame_idx, obj_ids, mask logits (len(obj_ids), 1, H, W)) on that frame.
        Raises ValueError for malformed prompts or frame numbers.
        """
        state = inference_state
        frame_idx = self._check_frame(state, frame_idx)
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be given together")
        if points is None and box is None:
            raise ValueError("give points with labels, a box, or both")
        points, labels, box = (x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in (points, labels, box))
        pts = torch.zeros(0, 2) if points is None else torch.as_tensor(np.asarray(points, dtype=np.float32)).reshape(-1, 2)
        lab = torch.zeros(0, dtype=torch.int32) if labels is None else \
            torch.as_tensor(np.asarray(labels)).reshape(-1).to(torch.int32)
        if points is not None and np.asarray(points).reshape(-1).size != 2 * len(lab):
            raise ValueError(f"points must be (N, 2) with one label each; got points of shape {np.asarray(points).shape} "
                             f"and {len(lab)} labels")
        if len(lab) and not bool(((lab == 0) | (lab == 1)).all()):
            raise ValueError(f"labels must be 1 (foreground) or 0 (background), got {sorted(set(lab.tolist()))}")
        if box is not None:
            if not clear_old_points:
                raise ValueError("a box must be the first prompt of a frame: pass clear_old_points=True with it")
            b = np.asarray(box, dtype=np.float32).reshape(-1)
            if b.size != 4:
                raise ValueError(f"box must be 4 numbers x0, y0, x1, y1, got {b.size}")
            pts = torch.cat([torch.from_numpy(b).reshape(2, 2), pts])
            lab = torch.cat([torch.tensor([2, 3], dtype=torch.int32), lab])
        if not torch.isfinite(pts).all():
            raise ValueError("points and boxes must be finite numbers")
        check_prompt_count(int((lab < 2).sum()), int(box is not None))
        if normalize_coords:
            pts = self.transform.apply_coords_torch(pts, (state.video_height, state.video_width))
        else:
            pts = pts * self.image_size
        pts, lab = pts[None].to(state.device), lab[None].to(state.device)

        obj_idx = self._obj_idx(state, obj_id)
        point_inputs = None if clear_old_points else state.point_inputs_per_obj[obj_idx].get(frame_idx)
        if point_inputs is not None:
            pts = torch.cat([point_inputs["point_coords"], pts], dim=1)
            lab = torch.cat([point_inputs["point_labels"], lab], dim=1)
        point_inputs = {"point_coords": pts, "point_labels": lab}
        state.point_inputs_per_obj[obj_idx][frame_idx] = point_inputs
        state.mask_inputs_per_obj[obj_idx].pop(frame_idx, None)
        return self._add_prompt(state, obj_idx, frame_idx, point_inputs=point_inputs)

    @torch.inference_mode()
    def add_new_mask(self, inference_state: VideoInferenceState, frame_idx: int, obj_id, mask):
        """A mask prompt (H, W) (bool or 0/1, any size: resized to the model's square input) for `obj_id` on `frame_idx`.

        Returns (frame_idx, obj_ids, mask logits (len(obj_ids), 1, H, W)). Raises ValueError for a mask that is not 2-D.
        """
        state = inference_state
        frame_idx = self._check_frame(state, frame_idx)
        m = mask.detach().cpu() if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
        if m.ndim != 2 or m.numel() == 0:
            raise ValueError(f"mask must be a 2-D (H, W) array, got shape {tuple(m.shape)}")
        m = (m > 0).float()[None, None].to(state.device)
        s = self.image_size
        if tuple(m.shape[-2:]) != (s, s):
            m = (F.interpolate(m, (s, s), mode="bilinear", align_corners=False, antialias=True) >= 0.5).float()
        obj_idx = self._obj_idx(state, obj_id)
        state.mask_inputs_per_obj[obj_idx][frame_idx] = m
        state.point_inputs_per_obj[obj_idx].pop(frame_idx, None)
        return self._add_prompt(state, obj_idx, frame_idx, mask_inputs=m)

    def _add_prompt(self, state, obj_idx, frame_idx, point_inputs=None, mask_inputs=None):
        tracked = state.frames_tracked_per_obj[obj_idx]
        is_init_cond_frame = frame_idx not in tracked
        reverse = False if is_init_cond_frame else tracked[frame_idx]["reverse"]
        outputs, temp = state.output_dict_per_obj[obj_idx], state.temp_output_dict_per_obj[obj_idx]
        is_cond = is_init_cond_frame or self.add_all_frames_to_correct_as_cond
        key = "cond_frame_outputs" if is_cond else "non_cond_frame_outputs"
        prev_logits = None
        if point_inputs is not None:  # new clicks refine the frame's latest mask
            prev = temp[key].get(frame_idx) or outputs["cond_frame_outputs"].get(frame_idx) or \
                outputs["non_cond_frame_outputs"].get(frame_idx)
            if prev is not None and prev["pred_masks"] is not None:
                prev_logits = prev["pred_masks"].to(state.device).clamp(-32.0, 32.0)
        out, _ = self._run_single_frame(state, outputs, frame_idx, is_init_cond_frame, point_inputs, mask_inputs, reverse,
                                        run_mem_encoder=False, prev_sam_mask_logits=prev_logits)
        temp[key][frame_idx] = out
        return frame_idx, list(state.obj_ids), self._video_res(state, self._consolidate(state, frame_idx, is_cond))

    def _run_single_frame(self, state, outputs, frame_idx, is_init_cond_frame, point_inputs, mask_inputs, reverse,
                          run_mem_encoder, prev_sam_mask_logits=None):
        out = tracking.track_step(self.model, frame_idx, is_init_cond_frame, self._frame_features(state, frame_idx), outputs,
                                  state.num_frames, point_inputs, mask_inputs, reverse, run_mem_encoder, prev_sam_mask_logits)
        memory = out["maskmem_features"]
        if memory is not None:  # Meta keeps the memories in bfloat16
            memory = memory.to(torch.bfloat16).to(state.storage_device)
        masks = out["pred_masks"]
        if self.fill_hole_area > 0:
            masks = fill_holes_and_sprinkles(masks, self.fill_hole_area, 0, hole_value=0.1)
        compact = {"maskmem_features": memory, "maskmem_pos_enc": self._memory_position(state, out["maskmem_pos_enc"]),
                   "pred_masks": masks.to(state.storage_device), "obj_ptr": out["obj_ptr"],
                   "object_score_logits": out["object_score_logits"]}
        return compact, masks

    def _memory_position(self, state, position):
        """The memories' position encoding is the same for every frame and object: one copy is kept."""
        if position is None:
            return None
        if "maskmem_pos_enc" not in state.constants:
            state.constants["maskmem_pos_enc"] = [p[:1].clone() for p in position]
        return [p.expand(position[0].shape[0], -1, -1, -1) for p in state.constants["maskmem_pos_enc"]]

    def _run_memory_encoder(self, state, frame_idx, high_res_masks, object_score_logits, is_mask_from_pts):
        frame = self._frame_features(state, frame_idx, high_res_masks.shape[0])
        memory, position = tracking.encode_memory(self.model, frame["features"], high_res_masks, object_score_logits,
                                                  is_mask_from_pts)
        return memory.to(torch.bfloat16).to(state.storage_device), self._memory_position(state, [position])

    @staticmethod
    def frame_output(inference_state: VideoInferenceState, obj_idx: int, frame_idx: int) -> dict | None:
        """Object `obj_idx`'s latest output on a frame (prompts not yet propagated first), or None: "pred_masks"
        (1, 1, S/4, S/4) logits, "obj_ptr" (1, C), "object_score_logits" (1, 1), "maskmem_features"."""
        temp, outputs = inference_state.temp_output_dict_per_obj[obj_idx], inference_state.output_dict_per_obj[obj_idx]
        for d in (temp["cond_frame_outputs"], temp["non_cond_frame_outputs"], outputs["cond_frame_outputs"],
                  outputs["non_cond_frame_outputs"]):
            if frame_idx in d:
                return d[frame_idx]
        return None

    def _latest_output(self, state, obj_idx, frame_idx, key):
        out = state.temp_output_dict_per_obj[obj_idx][key].get(frame_idx)
        outputs = state.output_dict_per_obj[obj_idx]
        return out or outputs["cond_frame_outputs"].get(frame_idx) or outputs["non_cond_frame_outputs"].get(frame_idx)

    def _consolidate(self, state, frame_idx, is_cond) -> torch.Tensor:
        """Every object's latest mask logits on the frame at the video's resolution (N, 1, H, W); -1024 for objects
        without an output there."""
        key = "cond_frame_outputs" if is_cond else "non_cond_frame_outputs"
        n = len(state.obj_idx_to_id)
        h, w = state.video_height, state.video_width
        out = torch.full((n, 1, h, w), NO_OBJ_SCORE, dtype=torch.float32, device=state.storage_device)
        for obj_idx in range(n):
            found = self._latest_output(state, obj_idx, frame_idx, key)
            if found is not None:
                out[obj_idx:obj_idx + 1] = F.interpolate(found["pred_masks"].float(), (h, w), mode="bilinear",
                                                         align_corners=False).to(out.device)
        return out

    def _video_res(self, state, masks: torch.Tensor) -> torch.Tensor:
        """Mask logits (N, 1, h', w') -> (N, 1, H, W) at the video's resolution, overlaps removed when asked."""
        masks = masks.to(state.device)
        if tuple(masks.shape[-2:]) != (state.video_height, state.video_width):
            masks = self.transform.postprocess_masks(masks, None, (state.video_height, state.video_width))
        if self.non_overlap_masks:
            masks = tracking.non_overlapping(masks)
        return masks

    # -- propagation ------------------------------------------------------------------------------

    @torch.inference_mode()
    def propagate_in_video_preflight(self, inference_state: VideoInferenceState) -> None:
        """Encode the memories of newly prompted frames and move their outputs into the memory bank."""
        state = inference_state
        n = len(state.obj_idx_to_id)
        if n == 0:
            raise ValueError("no object has a prompt yet: add points, a box or a mask first")
        for obj_idx in range(n):
            outputs, temp = state.output_dict_per_obj[obj_idx], state.temp_output_dict_per_obj[obj_idx]
            for is_cond in (False, True):
                key = "cond_frame_outputs" if is_cond else "non_cond_frame_outputs"
                for frame_idx, out in temp[key].items():
                    if out["maskmem_features"] is None:
                        high = F.interpolate(out["pred_masks"].to(state.device), (self.image_size,) * 2, mode="bilinear",
                                             align_corners=False)
                        out["maskmem_features"], out["maskmem_pos_enc"] = self._run_memory_encoder(
                            state, frame_idx, high, out["object_score_logits"], is_mask_from_pts=True)
                    outputs[key][frame_idx] = out
                    if self.clear_non_cond_mem_around_input:
                        self._clear_non_cond_memory(state, frame_idx, obj_idx)
                temp[key].clear()
            if not outputs["cond_frame_outputs"]:
                raise ValueError(f"object {state.obj_idx_to_id[obj_idx]} has no prompt on any frame: add one, or remove it")
            for frame_idx in outputs["cond_frame_outputs"]:
                outputs["non_cond_frame_outputs"].pop(frame_idx, None)

    @torch.inference_mode()
    def propagate_in_video(self, inference_state: VideoInferenceState, start_frame_idx: int | None = None,
                           max_frame_num_to_track: int | None = None, reverse: bool = False):
        """Track every object from `start_frame_idx` (default: the first prompted frame) forwards, or backwards with
        `reverse`, over at most `max_frame_num_to_track` more frames. Yields (frame_idx, obj_ids, mask logits
        (len(obj_ids), 1, H, W)) per frame; `mask > 0` is the object."""
        state = inference_state
        self.propagate_in_video_preflight(state)
        obj_ids, n, num_frames = list(state.obj_ids), len(state.obj_idx_to_id), state.num_frames
        if start_frame_idx is None:
            start_frame_idx = min(t for out in state.output_dict_per_obj.values() for t in out["cond_frame_outputs"])
        start_frame_idx = self._check_frame(state, start_frame_idx)
        if max_frame_num_to_track is None:
            max_frame_num_to_track = num_frames
        if reverse:
            end = max(start_frame_idx - max_frame_num_to_track, 0)
            order = range(start_frame_idx, end - 1, -1) if start_frame_idx > 0 else []
        else:
            end = min(start_frame_idx + max_frame_num_to_track, num_frames - 1)
            order = range(start_frame_idx, end + 1)
        for frame_idx in order:
            masks = []
            for obj_idx in range(n):
                outputs = state.output_dict_per_obj[obj_idx]
                if frame_idx in outputs["cond_frame_outputs"]:
                    pred = outputs["cond_frame_outputs"][frame_idx]["pred_masks"].to(state.device)
                    if self.clear_non_cond_mem_around_input:
                        self._clear_non_cond_memory(state, frame_idx, obj_idx)
                else:
                    out, pred = self._run_single_frame(state, outputs, frame_idx, False, None, None, reverse,
                                                       run_mem_encoder=True)
                    outputs["non_cond_frame_outputs"][frame_idx] = out
                state.frames_tracked_per_obj[obj_idx][frame_idx] = {"reverse": reverse}
                masks.append(pred)
            yield frame_idx, obj_ids, self._video_res(state, torch.cat(masks))

    def object_scores(self, inference_state: VideoInferenceState, frame_idx: int) -> torch.Tensor:
        """The objects' object-score logits on a tracked or prompted frame, (len(obj_ids),); > 0 means present, NaN
        where an object has no output on that frame."""
        state = inference_state
        scores = torch.full((len(state.obj_ids),), float("nan"))
        for obj_idx in range(len(state.obj_ids)):
            out = self.frame_output(state, obj_idx, frame_idx)
            if out is not None:
                scores[obj_idx] = out["object_score_logits"].reshape(-1)[0].float().cpu()
        return scores

    # -- editing ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def clear_all_prompts_in_frame(self, inference_state: VideoInferenceState, frame_idx: int, obj_id, need_output: bool = True):
        """Remove `obj_id`'s prompts on `frame_idx`; its output there, if any, stays as a tracked (non-conditioning)
        frame. Returns (frame_idx, obj_ids, mask logits) when need_output."""
        state = inference_state
        frame_idx = self._check_frame(state, frame_idx)
        if obj_id not in state.obj_id_to_idx:
            raise ValueError(f"no object {obj_id!r}; objects: {state.obj_ids}")
        obj_idx = state.obj_id_to_idx[obj_id]
        state.point_inputs_per_obj[obj_idx].pop(frame_idx, None)
        state.mask_inputs_per_obj[obj_idx].pop(frame_idx, None)
        temp = state.temp_output_dict_per_obj
        temp[obj_idx]["cond_frame_outputs"].pop(frame_idx, None)
        temp[obj_idx]["non_cond_frame_outputs"].pop(frame_idx, None)
        outputs = state.output_dict_per_obj[obj_idx]
        out = outputs["cond_frame_outputs"].pop(frame_idx, None)
        if out is not None:
            outputs["non_cond_frame_outputs"][frame_idx] = out
            state.frames_tracked_per_obj[obj_idx].pop(frame_idx, None)
        if not need_output:
            return None
        is_cond = any(frame_idx in t["cond_frame_outputs"] for t in temp.values())
        return frame_idx, list(state.obj_ids), self._video_res(state, self._consolidate(state, frame_idx, is_cond))

    @torch.inference_mode()
    def reset_state(self, inference_state: VideoInferenceState) -> None:
        """Remove every object, prompt and output (the frames and their cached features stay)."""
        state = inference_state
        for d in (state.obj_id_to_idx, state.obj_idx_to_id, state.point_inputs_per_obj, state.mask_inputs_per_obj,
                  state.output_dict_per_obj, state.temp_output_dict_per_obj, state.frames_tracked_per_obj):
            d.clear()
        state.obj_ids = []

    @torch.inference_mode()
    def remove_object(self, inference_state: VideoInferenceState, obj_id, strict: bool = False, need_output: bool = True):
        """Remove an object. Returns (obj_ids, [(frame_idx, mask logits)] for the frames it had prompts on). With
        strict, an unknown id is a ValueError."""
        state = inference_state
        old_idx = state.obj_id_to_idx.get(obj_id)
        if old_idx is None:
            if strict:
                raise ValueError(f"no object {obj_id!r} to remove; objects: {state.obj_ids}")
            return list(state.obj_ids), []
        if len(state.obj_id_to_idx) == 1:
            self.reset_state(state)
            return [], []
        prompted = set(state.point_inputs_per_obj[old_idx]) | set(state.mask_inputs_per_obj[old_idx])
        for frame_idx in prompted:
            self.clear_all_prompts_in_frame(state, frame_idx, obj_id, need_output=False)
        remaining = [i for i in range(len(state.obj_ids)) if i != old_idx]
        new_ids = [state.obj_ids[i] for i in remaining]
        state.obj_id_to_idx = OrderedDict((oid, i) for i, oid in enumerate(new_ids))
        state.obj_idx_to_id = OrderedDict((i, oid) for i, oid in enumerate(new_ids))
        state.obj_ids = new_ids
        for d in (state.point_inputs_per_obj, state.mask_inputs_per_obj, state.output_dict_per_obj,
                  state.temp_output_dict_per_obj, state.frames_tracked_per_obj):
            kept = [d[i] for i in remaining]
            d.clear()
            d.update(enumerate(kept))
        updated = []
        if need_output:
            temp = state.temp_output_dict_per_obj
            for frame_idx in sorted(prompted):
                is_cond = any(frame_idx in t["cond_frame_outputs"] for t in temp.values())
                updated.append((frame_idx, self._video_res(state, self._consolidate(state, frame_idx, is_cond))))
        return list(state.obj_ids), updated

    def _clear_non_cond_memory(self, state, frame_idx, obj_idx):
        cfg = self.model.config.video_config
        r = cfg.memory_temporal_stride_for_eval * cfg.num_maskmem
        non_cond = state.output_dict_per_obj[obj_idx]["non_cond_frame_outputs"]
        for t in range(frame_idx - r, frame_idx + r + 1):
            non_cond.pop(t, None)


__all__ = ["SamHQ2VideoPredictor", "VideoInferenceState", "VideoFrames", "FeatureCache", "open_video", "natural_key",
           "masks_to_label_map"]
