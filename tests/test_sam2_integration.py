"""HQ-SAM 2 / SAM 2.1 through everything that takes a model (issue 18): one loader for both generations,
the predictor API SAM 2 users rely on (`set_image_batch` / `predict_batch`, `normalize_coords`, batched
prompts, hole and sprinkle filling), the CLI (`info`, `convert`, `segment`, `evaluate`), the server.

Oracles: Meta's `SAM2ImagePredictor` (PyPI sam2, with its CUDA connected-components kernel replaced by
scipy in `sam2_ref.connected_components`) on the same perturbed weights; hand computations; for
SAM-HQ v1 models, which have no official batch API, the single-image calls the batch calls must equal.
Small configs: Hiera-T's structure at 8 channels per head and 256 px.
"""
import io
import json
import zipfile

import numpy as np
import pytest
import torch

import samhq
from samhq.checkpoints import CheckpointError, checkpoint_family
from samhq.cli import main
from samhq.modeling.sam2 import SamHQ2Model
from samhq.predictor import SamHQPredictor
from samhq.processing import fill_holes_and_sprinkles

from conftest import random_model
from sam2_ref import (
    SMALL_IMAGE_SIZE,
    TOL,
    connected_components,
    load_sam2,
    meta_pair,
    meta_predictor,
    random_image,
    rel_err,
    small_model,
)

sam2 = load_sam2()
needs_sam2 = pytest.mark.skipif(sam2 is None, reason="sam2 (and hydra-core) are not installed")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
NO_GRAD = True


@pytest.fixture(scope="module")
def hq_file(tmp_path_factory):
    """A small HQ-SAM 2 model and a folder with its official `.pt` (laid out as SysCV's sam2.1_hq_hiera_large.pt) and
    our config.json (a small trunk is no released preset, so its heads and windows are not in the tensor shapes)."""
    model = small_model(hq=True)
    path = tmp_path_factory.mktemp("hq2")
    model.save_official(path / "sam2.1_hq_small.pt")
    model.config.to_json_file(path / "config.json")
    return model, path


# ---------------------------------------------------------------------------------------------
# One loader


def test_load_model_detects_the_family(hq_file, tmp_path):
    model, path = hq_file
    plain = small_model(hq=False, seed=4)
    plain.save_pretrained(tmp_path / "plain_sam2")
    v1 = random_model()
    v1.save_pretrained(tmp_path / "v1")
    samhq.save_official(v1, tmp_path / "v1.pth")
    pixels = torch.randn(1, 3, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([[[20.0, 30.0, 200.0, 180.0]]])
    for src, cls, hq, ref in [(path, SamHQ2Model, True, model), (tmp_path / "plain_sam2", SamHQ2Model, False, plain),
                              (tmp_path / "v1", samhq.SamHQModel, True, v1), (tmp_path / "v1.pth", samhq.SamHQModel, True, v1)]:
        loaded = samhq.load_model(src)
        assert type(loaded) is cls and loaded.hq_enabled is hq, src
        assert checkpoint_family(src) == ("sam2" if cls is SamHQ2Model else "sam")
        if cls is SamHQ2Model:
            a, b = loaded(pixel_values=pixels, input_boxes=box), ref(pixel_values=pixels, input_boxes=box)
            assert torch.equal(a.pred_masks, b.pred_masks) and torch.equal(a.iou_scores, b.iou_scores)
    assert isinstance(SamHQPredictor.from_pretrained(path).model, SamHQ2Model)
    assert isinstance(samhq.pipelines.load_for_inference(str(path)), SamHQ2Model)
    bf16 = samhq.load_model(path, dtype=torch.bfloat16)
    assert bf16.encoder_dtype == torch.bfloat16 and bf16.dtype == torch.float32
    with pytest.raises(CheckpointError, match="plain SAM 2 checkpoint"):
        samhq.load_model(tmp_path / "plain_sam2", strict_hq=True)
    with pytest.raises(CheckpointError, match="a SAM 2 / HQ-SAM 2 checkpoint.*samhq.load_model"):
        samhq.SamHQModel.from_pretrained(path)


def test_hub_ids_take_transformers_weights_or_one_official_file(hq_file, tmp_path, monkeypatch):
    """Hub repositories hold transformers' files (config.json of Sam2VideoModel, model.safetensors) next to Meta's
    .pt: the transformers files are fetched, never both; a repository with only a .pt gets that. No network:
    huggingface_hub's two calls are replaced by a local folder."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    model, path = hq_file
    repo = tmp_path / "repo"
    model.save_pretrained(repo)
    cfg = json.loads((repo / "config.json").read_text())
    cfg.pop("samhq2_config")
    cfg["model_type"] = "sam2_video"  # what the hub's facebook/sam2.1-hiera-* repositories say
    (repo / "config.json").write_text(json.dumps(cfg))
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append(sorted(allow_patterns))
        return str(repo if "model.safetensors" in allow_patterns else path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    files = ["README.md", "config.json", "model.safetensors", "sam2.1_hiera_large.pt", "sam2.1_hiera_l.yaml"]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id: files)
    loaded = samhq.load_model("facebook/sam2.1-hiera-large")
    assert calls == [["config.json", "model.safetensors"]] and isinstance(loaded, SamHQ2Model)
    assert loaded.config.vision_config.stages == model.config.vision_config.stages
    files = ["README.md", "config.json", "sam2.1_hq_small.pt"]
    assert isinstance(samhq.load_model("org/official-only"), SamHQ2Model)
    assert calls[-1] == ["config.json", "sam2.1_hq_small.pt"]
    files = ["a.pt", "b.pt"]
    with pytest.raises(CheckpointError, match="several checkpoints"):
        samhq.load_model("org/two-files")


def test_damaged_pickle_data_is_not_called_pickled_objects(hq_file, tmp_path):
    """A .pt whose pickle is damaged is 'not readable', not 'pickled Python objects' (which is for pickled code)."""
    _, path = hq_file
    with zipfile.ZipFile(path / "sam2.1_hq_small.pt") as z:
        data = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in data if n.endswith("data.pkl"))
    data[pkl] = data[pkl][:2] + b"\xf0\xf1" + data[pkl][4:]  # opcodes no pickle has
    bad = tmp_path / "damaged.pt"
    with zipfile.ZipFile(bad, "w") as z:
        for n, v in data.items():
            z.writestr(n, v)
    for load in (samhq.load_model, samhq.SamHQModel.from_pretrained, SamHQ2Model.from_pretrained):
        with pytest.raises(CheckpointError) as e:
            load(bad)
        text = str(e.value)
        assert "damaged.pt: not a readable PyTorch checkpoint (damaged or truncated?)" in text, text
        assert "pickled" not in text and "\n" not in text


def test_cli_info_and_convert(hq_file, tmp_path, capsys):
    model, path = hq_file
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sam2" and info["hq"] is True and info["image_size"] == SMALL_IMAGE_SIZE
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["format"].startswith("official:") and info["dtype"] == "float32"
    assert main(["convert", str(path), str(tmp_path / "hf")]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.pt")]) == 0
    a = torch.load(path / "sam2.1_hq_small.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "back.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.pt")]) == 2  # no overwrite without --force
    assert "--force" in capsys.readouterr().err


def test_cli_segment(hq_file, tmp_path):
    from PIL import Image

    model, path = hq_file
    image = random_image(90, 120, 3)
    Image.fromarray(image).save(tmp_path / "im.png")
    args = ["segment", str(tmp_path / "im.png"), "--model", str(path), "--point", "40,50", "--json", str(tmp_path / "r.json"),
            "--out", str(tmp_path / "m.png")]
    assert main(args + ["--multimask", "--hq-token-only"]) == 0
    p = SamHQPredictor(model)
    p.set_image(image)
    masks, scores, _ = p.predict(point_coords=np.array([[40.0, 50.0]]), point_labels=np.array([1]), multimask_output=True,
                                 hq_token_only=True)
    assert masks.shape == (1, 90, 120) and scores.shape == (3,)  # the HQ mask alone, the three SAM tokens' scores
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")) > 127, masks[0])
    assert json.loads((tmp_path / "r.json").read_text())["masks"][0]["score"] == pytest.approx(float(scores.max()))


# ---------------------------------------------------------------------------------------------
# Predictor API, against Meta's SAM2ImagePredictor


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    # the hypernetworks' last layers scaled up so that some logits pass +-32 (the clamp of returned low-res logits)
    def louder(ref):
        for mlp in ref.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(6.0)

    ref, ours, _ = meta_pair(tmp_path_factory.mktemp("meta"), edit=louder)
    return ref, ours


@needs_sam2
def test_batch_normalize_coords_and_batched_prompts_match_meta(meta):
    ref, ours = meta
    images = [random_image(180, 300, 7), random_image(240, 160, 8)]
    theirs, mine = meta_predictor(ref), SamHQPredictor(ours)
    theirs.set_image_batch(images)
    mine.set_image_batch(images)
    assert mine.batch_size == 2
    points = [np.array([[40.0, 60.0], [200.0, 90.0]]), np.array([[[30.0, 30.0]], [[100.0, 200.0]]])]  # 1 prompt, 2 prompts
    labels = [np.array([1, 0]), np.array([[1], [1]])]
    boxes = [np.array([30.0, 20.0, 250.0, 160.0]), None]
    for multimask in (True, False):
        a = theirs.predict_batch(points, labels, boxes, multimask_output=multimask, return_logits=True)
        b = mine.predict_batch(points, labels, boxes, multimask_output=multimask, return_logits=True)
        for x, y in zip(a, b):
            for u, v in zip(x, y):
                assert u.shape == v.shape
                assert rel_err(torch.as_tensor(v), torch.as_tensor(u), floor=1.0) < TOL
    assert max(np.abs(low).max() for low in b[2]) == 32.0  # clamped as Meta's (the fixture's logits pass 32)
    with pytest.raises(RuntimeError, match="predict_batch"):
        mine.predict(point_coords=points[0], point_labels=labels[0])

    theirs.set_image(images[0])
    mine.set_image(images[0])
    rel = dict(point_coords=np.array([[0.2, 0.4], [0.7, 0.1]]), point_labels=np.array([1, 0]), box=np.array([0.1, 0.1, 0.8, 0.9]))
    batched = dict(point_coords=np.array([[[40.0, 60.0]], [[120.0, 100.0]], [[250.0, 30.0]]]), point_labels=np.ones((3, 1)),
                   box=np.array([[10.0, 10.0, 100.0, 100.0], [50.0, 40.0, 280.0, 170.0], [0.0, 0.0, 300.0, 180.0]]))
    for kw, norm in ((rel, False), (batched, True)):
        a = theirs.predict(**kw, normalize_coords=norm, return_logits=True)
        b = mine.predict(**kw, normalize_coords=norm, return_logits=True)
        for u, v in zip(a, b):
            assert u.shape == v.shape and rel_err(torch.as_tensor(v), torch.as_tensor(u), floor=1.0) < TOL
    assert b[0].shape == (3, 3, 180, 300)


@needs_sam2
@pytest.mark.parametrize("areas", [(40, 0), (0, 25), (40, 25)])
def test_hole_and_sprinkle_filling_matches_meta(meta, monkeypatch, areas):
    import sam2.utils.misc

    monkeypatch.setattr(sam2.utils.misc, "get_connected_components", connected_components)
    ref, ours = meta
    image = random_image(150, 210, 9)
    theirs = meta_predictor(ref, max_hole_area=areas[0], max_sprinkle_area=areas[1])
    mine = SamHQPredictor(ours, max_hole_area=areas[0], max_sprinkle_area=areas[1])
    plain = SamHQPredictor(ours)
    theirs.set_image(image)
    mine.set_image(image)
    plain.set_image(image)
    changed = 0
    for kw in (dict(point_coords=np.array([[60.0, 50.0], [150.0, 100.0]]), point_labels=np.array([1, 0])),
               dict(box=np.array([20.0, 20.0, 180.0, 140.0]))):
        a = theirs.predict(**kw, return_logits=True)
        b = mine.predict(**kw, return_logits=True)
        for u, v in zip(a, b):
            assert rel_err(torch.as_tensor(v), torch.as_tensor(u), floor=1.0) < TOL
        changed += int((plain.predict(**kw)[0] != (b[0] > 0)).sum())
        np.testing.assert_array_equal(b[2], plain.predict(**kw)[2])  # the returned low-res logits are not filled
    assert changed > 0  # the filling did something on these logits


def test_fill_holes_and_sprinkles_by_hand():
    """8-connected regions from the input logits: holes (<= 0) of area <= 2 become +10, specks (> 0) of area <= 4
    become -10; a ring of area 8 around a one-pixel hole is removed while its hole is filled (both from the input)."""
    x = -np.ones((8, 10), np.float32)
    x[1:4, 1:4] = 1.0
    x[2, 2] = -1.0                  # ring of 8 around a hole of 1
    x[5:8, 0:5] = 2.0               # a block of 15 with a hole of 2 pixels touching each other
    x[6, 1:3] = -3.0
    x[1, 7] = x[2, 8] = 0.5         # two diagonal neighbours: one speck of 2
    x[4, 9] = 0.0                   # 0 is background (<= threshold)
    out = fill_holes_and_sprinkles(torch.from_numpy(x)[None, None], max_hole_area=2, max_sprinkle_area=8)[0, 0].numpy()
    want = x.copy()
    want[2, 2] = 10.0
    want[6, 1:3] = 10.0
    want[1:4, 1:4][[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 0, 2, 0, 1, 2]] = -10.0
    want[1, 7] = want[2, 8] = -10.0
    np.testing.assert_array_equal(out, want)
    assert fill_holes_and_sprinkles(torch.from_numpy(x), 0, 0).equal(torch.from_numpy(x))
    border = -np.ones((4, 4), np.float32)
    border[:, 2:] = 1.0
    out = fill_holes_and_sprinkles(torch.from_numpy(border), max_hole_area=8, max_sprinkle_area=0).numpy()
    assert (out[:, :2] == 10.0).all()  # a background region touching the border counts as a hole (as Meta's)


def test_sam_hq_v1_gets_the_same_api():
    """The batch, normalize_coords and filling options on a SAM-HQ (v1) model, checked against single calls."""
    model = random_model(image_size=256, window_size=8)
    images = [random_image(120, 200, 1), random_image(200, 90, 2)]
    p = SamHQPredictor(model, max_hole_area=30, max_sprinkle_area=30)
    p.set_image_batch(images)
    masks, scores, lows = p.predict_batch([np.array([[50.0, 60.0]]), None], [np.array([1]), None],
                                          [None, np.array([10.0, 20.0, 80.0, 150.0])])
    single = SamHQPredictor(model)
    prompts = [dict(point_coords=np.array([[50.0, 60.0]]), point_labels=np.array([1])),
               dict(box=np.array([10.0, 20.0, 80.0, 150.0]))]
    for image, m, s, low, kw in zip(images, masks, scores, lows, prompts):
        single.set_image(image)
        m2, s2, low2 = single.predict(**kw)
        np.testing.assert_allclose(s, s2, atol=1e-6)
        np.testing.assert_allclose(low, low2, atol=1e-5)
        filled = fill_holes_and_sprinkles(torch.from_numpy(low2), 30, 30)
        np.testing.assert_array_equal(m, single.upscale_masks(filled).numpy() > 0)
        h, w = image.shape[:2]
        if "box" in kw:
            rel = single.predict(box=kw["box"] / np.array([w, h, w, h]), normalize_coords=False)
        else:
            rel = single.predict(point_coords=kw["point_coords"] / np.array([w, h]), point_labels=kw["point_labels"],
                                 normalize_coords=False)
        np.testing.assert_allclose(rel[2], low2, atol=1e-4)
    with pytest.raises(ValueError, match="one entry per image"):
        p.predict_batch([np.array([[1.0, 1.0]])], [np.array([1])])
    with pytest.raises(ValueError, match="image 1: give a prompt"):
        p.predict_batch([np.array([[1.0, 1.0]]), None], [np.array([1]), None])


# ---------------------------------------------------------------------------------------------
# Server and evaluation


def test_server_with_a_sam2_model(hq_file):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient
    from PIL import Image

    from samhq.server import create_app

    model, path = hq_file
    client = TestClient(create_app(str(path)), base_url="http://127.0.0.1:8000")
    image = random_image(100, 140, 5)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    image_id = client.post("/api/images", files={"file": ("a.png", buf.getvalue(), "image/png")}).json()["image_id"]
    info = client.get("/api/info").json()
    assert info["image_size"] == SMALL_IMAGE_SIZE and info["hq"] is True
    ref = SamHQPredictor(model)
    ref.set_image(image)
    point = dict(point_coords=np.array([[30.0, 40.0]]), point_labels=np.array([1]))
    for body, kw in [(dict(points=[[30.0, 40.0]], labels=[1]), point),
                     (dict(box=[10.0, 10.0, 120.0, 90.0], multimask=True, hq_token_only=True),
                      dict(box=np.array([10.0, 10.0, 120.0, 90.0]), multimask_output=True, hq_token_only=True))]:
        r = client.post("/api/segment", json={"image_id": image_id, **body})
        assert r.status_code == 200, r.text
        out = r.json()
        masks, scores, _ = ref.predict(**{"multimask_output": False, **kw})
        got = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(out["mask_png"])))) > 127
        np.testing.assert_array_equal(got, masks[0])
        assert out["score"] == pytest.approx(float(scores.max()), abs=1e-6)
    assert "/api/segment" in client.get("/").text


def test_evaluate_with_a_sam2_model(hq_file, tmp_path):
    """`samhq evaluate` on a SAM 2 checkpoint: every object's IoU equals the predictor's masks scored by hand."""
    from samhq.data.synthetic import SyntheticShapes

    model, path = hq_file
    assert main(["evaluate", str(path), "synthetic:2:96:5", "--prompt", "box", "--sam-output", "best", "--json",
                 str(tmp_path / "r.json"), "--quiet"]) == 0
    records = json.loads((tmp_path / "r.json").read_text())["records"]
    data = SyntheticShapes(2, (96, 96), seed=5)
    p = SamHQPredictor(model)
    assert records
    for r in records:
        item = data[r["index"]]
        gt = np.asarray(item["masks"][r["object"]], bool)
        p.set_image(item["image"])
        box = np.array(r["box"], dtype=float)
        hq = p.predict(box=box, multimask_output=False, hq_token_only=True)[0][0]
        low, iou = p.decode(boxes=torch.as_tensor(p.transform.apply_boxes(box, p.original_size), dtype=torch.float),
                            multimask_output=True, sam_token_only=True)
        sam = p.upscale_masks(low[0, int(iou[0].argmax())]).numpy() > 0
        for key, pred in (("hq_iou", hq), ("sam_iou", sam)):
            union = (gt | pred).sum()
            assert r[key] == pytest.approx((gt & pred).sum() / union if union else 1.0, abs=1e-9), key


def test_label_studio_backend_with_a_sam2_model(hq_file, tmp_path):
    """`samhq label-studio --model` with an HQ-SAM 2 checkpoint: a smart click gives the predictor's mask, and the
    automatic mode runs the generator (the Label Studio stand-in server of test_label_studio_backend)."""
    pytest.importorskip("rasterio")
    from test_label_studio_backend import ROOT, TOKEN, brush_masks, click, predict, serve

    from samhq.label_studio import create_label_studio_app

    model, path = hq_file
    ls, other = serve(), serve()
    ls.elsewhere = f"http://127.0.0.1:{other.server_port}"
    try:
        from fastapi.testclient import TestClient
        from PIL import Image

        app = create_label_studio_app(str(path), f"http://127.0.0.1:{ls.server_port}", TOKEN, auto="everything",
                                      points_per_side=3, pred_iou_thresh=0.0, stability_thresh=0.0, max_images=2)
        client = TestClient(app, base_url="http://localhost:9090")
        image = np.asarray(Image.open(ROOT / "examples" / "shapes.png").convert("RGB"))
        r = predict(client, {"result": [click(93, 34)]})
        assert r.status_code == 200, r.text
        (region,) = r.json()["results"][0]["result"]
        ref = SamHQPredictor(model)
        ref.set_image(image)
        masks, _, _ = ref.predict(point_coords=np.array([[93.0, 34.0]]), point_labels=np.array([1]), multimask_output=False)
        np.testing.assert_array_equal(brush_masks([region], tmp_path)[0], masks[0])
        r = predict(client)  # no context: the automatic mode
        assert r.status_code == 200 and r.json()["results"][0]["result"]
    finally:
        ls.shutdown()
        other.shutdown()


def test_cli_everything_with_a_sam2_model(hq_file, tmp_path):
    """`samhq everything --model` with an HQ-SAM 2 checkpoint: the generator's records, SAM 2's default IoU threshold
    unless given, and --use-m2m."""
    from PIL import Image

    from samhq.automatic import SamHQAutomaticMaskGenerator

    model, path = hq_file
    image = random_image(80, 100, 6)
    Image.fromarray(image).save(tmp_path / "im.png")
    args = ["everything", str(tmp_path / "im.png"), "--model", str(path), "--points-per-side", "3", "--stability-thresh",
            "0", "--box-nms-thresh", "1"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    doc = json.loads((tmp_path / "a" / "im.json").read_text())
    assert doc["info"]["pred_iou_thresh"] == 0.8  # SAM 2's default
    want = SamHQAutomaticMaskGenerator(model, points_per_side=3, stability_score_thresh=0.0, box_nms_thresh=1.0).generate(image)
    assert [a["area"] for a in doc["annotations"]] == [r["area"] for r in want]
    assert main(args + ["--out", str(tmp_path / "b"), "--use-m2m", "--pred-iou-thresh", "0"]) == 0
    doc = json.loads((tmp_path / "b" / "im.json").read_text())
    want = SamHQAutomaticMaskGenerator(model, points_per_side=3, stability_score_thresh=0.0, box_nms_thresh=1.0,
                                       pred_iou_thresh=0.0, use_m2m=True).generate(image)
    assert doc["info"]["use_m2m"] is True and len(want) > 0
    assert [a["area"] for a in doc["annotations"]] == [r["area"] for r in want]
