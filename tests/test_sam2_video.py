"""The SAM 2 video model's checkpoints, frames, features, hole filling and API behaviour, without a reference.

Checked against independent things: Meta's own YAML-built models and transformers' `Sam2VideoModel`
(names and shapes of every video tensor, both ways), hand-computed hole filling, PyAV's sequential
decoding (random access to a video file), round trips through both checkpoint layouts, and a subprocess's
peak memory (300 tracked frames against 50). Parity of the tracking itself is in test_sam2_video_parity.py.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samhq import checkpoints_sam2 as ckpt
from samhq.config_sam2 import SAM2_VARIANTS, SamHQ2Config, SamHQ2VideoConfig
from samhq.data.synthetic_video import moving_shapes
from samhq.modeling.sam2 import SamHQ2Model, load_sam2_model
from samhq.processing import fill_holes_and_sprinkles
from samhq.video import FeatureCache, SamHQ2VideoPredictor, masks_to_label_map, natural_key, open_video

from video_ref import tiny_video_config, tiny_video_model

NO_GRAD = True
YAML = {"hiera_t": "t", "hiera_s": "s", "hiera_b+": "b+", "hiera_l": "l"}


def our_video_shapes(config: SamHQ2Config) -> dict:
    with torch.device("meta"):
        model = SamHQ2Model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if ckpt.is_our_video_key(k)}


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts


@pytest.mark.parametrize("version", ["sam2.1/sam2.1", "sam2/sam2"])
@pytest.mark.parametrize("variant", list(SAM2_VARIANTS))
def test_official_video_tensors_map_onto_ours_and_back(variant, version):
    """Meta's full-size models from its YAML (SAM 2.1 and 2.0): every video tensor has our name and shape, the video
    config is recognised from the tensors, and the names map back exactly."""
    from sam2_ref import load_sam2, meta_state

    if load_sam2() is None:
        pytest.skip("sam2 (and hydra-core) are not installed")
    state = meta_state(f"configs/{version}_hiera_{YAML[variant]}.yaml")
    image, video = ckpt.official_to_ours(state)
    ours = ckpt.video_to_ours(video, "official")
    cfg = ckpt.infer_video_config(ours)
    assert cfg == SamHQ2VideoConfig.from_release("sam2.1" if version.startswith("sam2.1") else "sam2")
    config = SamHQ2Config.from_dict({**ckpt.infer_config(image).to_dict(), "video_config": cfg})
    assert {k: tuple(v.shape) for k, v in ours.items()} == our_video_shapes(config)
    back = ckpt.video_from_ours(ours, "official")
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in video.items()}


def test_transformers_video_model_names_are_ours():
    """transformers' Sam2VideoModel (SAM 2.1 defaults) has exactly our video parameter names and shapes."""
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        theirs = transformers.Sam2VideoModel(transformers.Sam2VideoConfig()).state_dict()
    video = {k: tuple(v.shape) for k, v in theirs.items() if ckpt.is_our_video_key(k)}
    assert video == our_video_shapes(SamHQ2Config.from_variant("hiera_t", video=True))
    config = ckpt.config_from_transformers(transformers.Sam2VideoConfig().to_dict())
    assert config.video_config == SamHQ2VideoConfig()


def test_round_trips_keep_every_video_tensor(tmp_path):
    model = tiny_video_model(seed=3)
    model.save_official(tmp_path / "a.pt")
    model.config.to_json_file(tmp_path / "config.json")
    official = torch.load(tmp_path / "a.pt", weights_only=True)["model"]
    assert "maskmem_tpos_enc" in official and "memory_encoder.mask_downsampler.encoder.12.weight" in official
    loaded = load_sam2_model(tmp_path / "a.pt", config=model.config)
    assert loaded.has_video and not loaded.video_state
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    loaded.save_pretrained(tmp_path / "hf")
    data = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert data["model_type"] == "sam2_video" and data["num_maskmem"] == 7
    again = load_sam2_model(tmp_path / "hf")
    assert again.config.to_dict() == model.config.to_dict()
    again.save_official(tmp_path / "b.pt")
    back = torch.load(tmp_path / "b.pt", weights_only=True)["model"]
    assert set(back) == set(official) and all(torch.equal(back[k], official[k]) for k in official)


def test_transformers_loads_our_video_directory(tmp_path):
    """transformers' own Sam2VideoModel reads a directory we write, with no missing or unexpected tensors."""
    transformers = pytest.importorskip("transformers")
    from sam2_ref import our_config, small_hiera

    config = our_config(small_hiera("hiera_t"), 128)
    config.video_config = SamHQ2VideoConfig()
    model = SamHQ2Model(config).eval()
    model.hq_enabled = False
    model.save_pretrained(tmp_path)
    theirs, info = transformers.Sam2VideoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = model.state_dict()
    for name, tensor in theirs.state_dict().items():
        if ckpt.is_our_video_key(name):
            assert torch.equal(tensor, ours[name]), name


def test_sam2_0_and_image_only_checkpoints(tmp_path):
    """A SAM 2.0 model has no pointer temporal encoding nor occlusion embedding; an image-only model refuses to track."""
    config = tiny_video_config()
    config.video_config = SamHQ2VideoConfig.from_release("sam2", mem_dim=16, memory_attention_num_layers=2,
                                                         memory_attention_dim_feedforward=128, fuser_num_layers=1)
    model = SamHQ2Model(config)
    assert not hasattr(model, "temporal_positional_encoding_projection_layer")
    assert not hasattr(model, "occlusion_spatial_embedding_parameter")
    model.save_official(tmp_path / "m.pt")
    image_config = SamHQ2Config.from_dict({**config.to_dict(), "video_config": None})
    loaded = load_sam2_model(tmp_path / "m.pt", config=image_config)  # the video part inferred from the tensors
    assert loaded.config.video_config.add_tpos_enc_to_obj_ptrs is False
    inferred = ckpt.infer_video_config(ckpt.video_to_ours(
        {k: v for k, v in torch.load(tmp_path / "m.pt", weights_only=True)["model"].items() if ckpt.is_video_key(k)},
        "official"))
    assert inferred.no_obj_embed_spatial is False and inferred.add_tpos_enc_to_obj_ptrs is False
    with pytest.raises(ValueError, match="no video modules"):
        SamHQ2VideoPredictor(SamHQ2Model(image_config))


# ---------------------------------------------------------------------------------------------
# Hole filling


def test_hole_filling_by_hand():
    """Background regions (logit <= 0) of at most 8 pixels, 8-connected, become 0.1 (Meta's video value); others stay."""
    logits = -np.ones((12, 12), np.float32)
    logits[1:6, 1:6] = 5.0           # a ring: 5x5 square ...
    logits[3, 3] = -2.0               # ... with a one-pixel hole
    logits[7:12, 6:12] = 4.0          # a block with a 3x3 hole (9 pixels, too big)
    logits[8:11, 8:11] = -3.0
    logits[1:4, 8:11] = 3.0           # a block with two diagonal pixels (one 8-connected region of 2)
    logits[2, 9] = -1.0
    logits[1, 8] = 3.0
    expected = logits.copy()
    expected[3, 3] = 0.1
    expected[2, 9] = 0.1
    out = fill_holes_and_sprinkles(torch.from_numpy(logits)[None, None], 8, 0, hole_value=0.1)[0, 0].numpy()
    np.testing.assert_array_equal(out, expected)
    # the background around everything (it touches the border, > 8 pixels) and the 9-pixel hole are untouched
    assert (out[8:11, 8:11] == -3.0).all() and out[0, 0] == -1.0


def test_predictor_fills_the_holes_of_its_masks():
    """With fill_hole_area the stored and returned low-res masks are the unfilled ones with their small holes set to 0.1."""
    from scipy import ndimage

    model = tiny_video_model(seed=5)
    frames, _ = moving_shapes(3, 64, 64)
    outs = []
    for area in (0, 8):
        p = SamHQ2VideoPredictor(model, fill_hole_area=area)
        st = p.init_state(frames)
        p.add_new_points_or_box(st, 0, 1, points=[[20, 20], [40, 50]], labels=[1, 0])
        outs.append(p.frame_output(st, 0, 0)["pred_masks"][0, 0].numpy())
    raw, filled = outs
    labels, n = ndimage.label(raw <= 0, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    holes = (labels > 0) & (sizes[labels] <= 8)
    assert holes.any()  # this model and prompt leave a small hole to fill
    np.testing.assert_array_equal(filled, np.where(holes, np.float32(0.1), raw))


# ---------------------------------------------------------------------------------------------
# Frames and features


def write_frames(frames, folder: Path, names=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / (names[i] if names else f"{i:05d}.png"))
    return folder


def test_frames_from_a_folder_in_natural_order(tmp_path):
    frames, _ = moving_shapes(12, 32, 48)
    names = [f"frame{i}.png" for i in range(12)]
    video = open_video(write_frames(frames, tmp_path / "f", names))
    assert video.names == [f"frame{i}" for i in range(12)] and (video.height, video.width) == (32, 48)
    assert sorted(["f10", "f2", "f1"], key=natural_key) == ["f1", "f2", "f10"]
    np.testing.assert_array_equal(video[11], frames[11])
    sub = video.subset(2, 9, 3)
    assert sub.names == ["frame2", "frame5", "frame8"]
    np.testing.assert_array_equal(sub[1], frames[5])
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "f" / "frame99.png")
    with pytest.raises(ValueError, match="every frame of a video must have one size"):
        open_video(tmp_path / "f")[12]
    with pytest.raises(ValueError, match="no image files"):
        open_video((tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        open_video(tmp_path / "missing")


def test_frames_from_a_video_file_random_access(tmp_path):
    """Any order of access gives the frames PyAV decodes in sequence."""
    av = pytest.importorskip("av")
    frames, _ = moving_shapes(30, 48, 64)
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.gop_size = 8  # several keyframes: seeking has somewhere to go
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    video = open_video(path)
    assert len(video) == len(decoded) == 30
    for i in [0, 1, 2, 29, 3, 17, 16, 0, 25, 8]:
        np.testing.assert_array_equal(video[i], decoded[i])


def test_feature_window_is_bounded_and_disk_cache_is_reused(tmp_path):
    model = tiny_video_model(seed=1)
    frames, _ = moving_shapes(6, 64, 64)
    calls = []
    predictor = SamHQ2VideoPredictor(model)

    def compute(i):
        calls.append(i)
        return predictor._compute_features(open_video(frames), i)

    cache = FeatureCache(compute, window=2, storage_device="cpu", cache_dir=tmp_path / "features")
    first = {i: cache.get(i, "cpu") for i in range(6)}
    assert len(cache.kept) == 2 and calls == list(range(6))
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 4  # the evicted frames
    again = cache.get(1, "cpu")  # read back from disk, not recomputed
    assert calls == list(range(6))
    assert torch.equal(again["features"], first[1]["features"])
    assert all(torch.equal(a, b) for a, b in zip(again["high_res"], first[1]["high_res"]))


def test_label_map_gives_each_pixel_its_best_object():
    logits = np.array([[[1.0, -1.0, 2.0]], [[0.5, -2.0, 3.0]]])  # (2 objects, 1, 3)
    np.testing.assert_array_equal(masks_to_label_map([4, 300], logits), [[4, 0, 300]])
    assert masks_to_label_map([4, 7], logits).dtype == np.uint8
    with pytest.raises(ValueError, match="1..65535"):
        masks_to_label_map([0, 2], logits)


# ---------------------------------------------------------------------------------------------
# API behaviour


@pytest.fixture(scope="module")
def tiny():
    return tiny_video_model(seed=2)


def test_objects_prompts_and_editing(tiny):
    frames, labels = moving_shapes(6, 64, 64)
    p = SamHQ2VideoPredictor(tiny)
    st = p.init_state(frames)
    t, ids, masks = p.add_new_points_or_box(st, 0, 7, points=[[20, 20]], labels=[1])
    assert (t, ids, masks.shape) == (0, [7], (1, 1, 64, 64))
    _, ids, masks = p.add_new_points_or_box(st, 2, "car", box=[40, 35, 60, 55])
    assert ids == [7, "car"] and (masks[0] == -1024).all()  # object 7 has nothing on frame 2 yet
    _, _, masks = p.add_new_mask(st, 4, 9, labels[4] == 1)
    out = list(p.propagate_in_video(st))
    assert [t for t, _, _ in out] == list(range(6)) and all(m.shape == (3, 1, 64, 64) for _, _, m in out)
    assert torch.isfinite(p.object_scores(st, 3)).all()
    assert list(p.propagate_in_video(st, start_frame_idx=5, reverse=True))[-1][0] == 0
    _, _, cleared = p.clear_all_prompts_in_frame(st, 2, "car")
    assert cleared.shape == (3, 1, 64, 64)
    ids, updated = p.remove_object(st, 7)
    assert ids == ["car", 9] and [t for t, _ in updated] == [0]
    assert p.remove_object(st, "nobody") == (["car", 9], [])
    with pytest.raises(ValueError, match="no object"):
        p.remove_object(st, "nobody", strict=True)
    p.reset_state(st)
    assert st.obj_ids == []
    with pytest.raises(ValueError, match="no object has a prompt"):
        list(p.propagate_in_video(st))


@pytest.mark.parametrize("call, match", [
    (lambda p, s: p.add_new_points_or_box(s, 99, 1, points=[[1, 1]], labels=[1]), "frame_idx must be"),
    (lambda p, s: p.add_new_points_or_box(s, 0, 1, points=[[1, 1]], labels=[2]), "labels must be 1"),
    (lambda p, s: p.add_new_points_or_box(s, 0, 1, points=[[1, 1]]), "together"),
    (lambda p, s: p.add_new_points_or_box(s, 0, 1, points=[[1, 1], [2, 2]], labels=[1]), "one label each"),
    (lambda p, s: p.add_new_points_or_box(s, 0, 1, box=[1, 2, 3]), "4 numbers"),
    (lambda p, s: p.add_new_points_or_box(s, 0, 1, box=[1, 2, 3, 4], clear_old_points=False), "first prompt"),
    (lambda p, s: p.add_new_points_or_box(s, 0, 1, points=[[float("nan"), 1]], labels=[1]), "finite"),
    (lambda p, s: p.add_new_mask(s, 0, 1, np.zeros((2, 3, 4))), "2-D"),
])
def test_bad_prompts_are_one_line_errors(tiny, call, match):
    frames, _ = moving_shapes(2, 64, 64)
    p = SamHQ2VideoPredictor(tiny)
    with pytest.raises(ValueError, match=match):
        call(p, p.init_state(frames))


# ---------------------------------------------------------------------------------------------
# Memory


MEASURE = textwrap.dedent("""
    import resource, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from video_ref import tiny_video_model
    from samhq.video import SamHQ2VideoPredictor, open_video
    predictor = SamHQ2VideoPredictor(tiny_video_model(image_size={size}), fill_hole_area=0, feature_window=2)
    state = predictor.init_state(open_video({folder!r}).subset(0, int(sys.argv[1])))
    predictor.add_new_points_or_box(state, 0, 1, points=[[100, 60]], labels=[1])
    for _ in predictor.propagate_in_video(state):
        pass
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_memory_is_bounded_over_long_videos(tmp_path):
    """Peak memory tracking 300 frames is at most 1.2x that of 50 (frames read lazily, features of 2 frames kept).

    At 384 px each frame's image features take ~0.6 MB and its input 1.7 MB: keeping them all for 300 frames would
    add several hundred MB to a peak of a few hundred."""
    size = 384
    frames, _ = moving_shapes(300, size, size)
    folder = write_frames(frames, tmp_path / "frames", [f"{i:05d}.jpg" for i in range(300)])
    script = MEASURE.format(tests=str(Path(__file__).parent), size=size, folder=str(folder))
    peaks = {}
    for n in (50, 300):
        run = subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[n] = int(run.stdout.split()[-1])
    assert peaks[300] <= 1.2 * peaks[50], peaks
