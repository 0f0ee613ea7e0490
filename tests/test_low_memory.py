"""low_memory loading: the weights stay in the memory-mapped checkpoint and the image encoder's pages are
handed back after use (samhq.modeling.low_memory).

Checked against the default load (equal outputs, bit for bit) and against the kernel's own page table
(/proc/self/pagemap: whether a virtual page is mapped into this process right now)."""
import os
import sys

import numpy as np
import pytest
import torch

from samhq import SamHQModel, SamHQPredictor, load_model
from samhq.modeling.low_memory import _PAGE
from samhq.modeling.model import save_official
from samhq.train.trainer import set_trainable

from conftest import random_model

NO_GRAD = True
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="low_memory needs Linux")

PIXELS = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))


def resident_pages(t: torch.Tensor) -> tuple[int, int]:
    """(pages mapped into this process, whole pages) of tensor t's memory, from /proc/self/pagemap (bit 63: present)."""
    start = -(-t.data_ptr() // _PAGE)
    end = (t.data_ptr() + t.numel() * t.element_size()) // _PAGE
    if end <= start:
        return 0, 0
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start * 8)
        entries = np.frombuffer(f.read((end - start) * 8), dtype="<u8")
    return int((entries >> np.uint64(63)).sum()), end - start


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same random weights as an official .pth and as a transformers-layout folder (model.safetensors)."""
    d = tmp_path_factory.mktemp("lowmem")
    model = random_model(hidden_size=128)
    save_official(model, d / "model.pth")
    model.save_pretrained(d / "folder")
    return {"pth": d / "model.pth", "safetensors": d / "folder"}


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_outputs_equal_the_default_load(checkpoints, fmt):
    full = load_model(checkpoints[fmt])
    low = load_model(checkpoints[fmt], low_memory=True)
    assert low.low_memory and not getattr(full, "low_memory", False)
    want = full.get_image_embeddings(PIXELS)
    for _ in range(2):  # the second embedding reads back the pages the first handed back
        got = low.get_image_embeddings(PIXELS)
        assert torch.equal(got[0], want[0])
        assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    point = dict(point_coords=np.array([[300.0, 420.0]]), point_labels=np.array([1]))
    image = (np.random.default_rng(1).random((600, 800, 3)) * 255).astype(np.uint8)
    results = []
    for predictor in (SamHQPredictor(full), SamHQPredictor.from_pretrained(checkpoints[fmt], low_memory=True)):
        predictor.set_image(image)
        results.append(predictor.predict(**point, multimask_output=True))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_encoder_pages_are_handed_back(checkpoints):
    model = load_model(checkpoints["safetensors"], low_memory=True)
    layers = model.vision_encoder.layers
    qkv0 = layers[0].attn.qkv.weight
    assert resident_pages(qkv0)[1] >= 16
    assert all(not p.requires_grad for p in model.vision_encoder.parameters())
    assert resident_pages(qkv0)[0] == 0, "released once the load had checked them"
    float(qkv0.sum())  # reading maps them in again
    assert resident_pages(qkv0) == (resident_pages(qkv0)[1],) * 2
    seen = {}
    first = [p for p in layers[0].parameters() if p.numel() >= 4096]  # the fast form calls neither proj nor lin2
    layers[-1].register_forward_hook(lambda m, a, o: seen.update(first=sum(resident_pages(p)[0] for p in first),
                                                                     last=resident_pages(layers[-1].attn.qkv.weight)[0]))
    model.get_image_embeddings(PIXELS)
    assert seen["first"] == 0, "the first block's weights are handed back before the last block runs"
    assert seen["last"] == 0, "a block's weights are handed back when it finishes"
    for name, p in model.vision_encoder.named_parameters():
        assert resident_pages(p)[0] == 0, name
    decoder = model.mask_decoder.iou_prediction_head.layers[0].weight
    float(decoder.sum())
    model.get_image_embeddings(PIXELS)
    assert resident_pages(decoder)[0] == resident_pages(decoder)[1] > 0, "only the encoder's pages go back"


def test_a_replaced_weight_is_left_alone(checkpoints):
    """Pages are handed back only at the mapped addresses: a weight replaced by an in-memory tensor keeps its values
    (a released anonymous page would read back as zeros)."""
    full = load_model(checkpoints["pth"])
    low = load_model(checkpoints["pth"], low_memory=True)
    new = torch.randn_like(full.vision_encoder.layers[1].mlp.lin1.weight)
    for m in (full, low):
        m.vision_encoder.layers[1].mlp.lin1.weight = torch.nn.Parameter(new.clone(), requires_grad=False)
    assert torch.equal(low.get_image_embeddings(PIXELS)[0], full.get_image_embeddings(PIXELS)[0])
    assert torch.equal(low.vision_encoder.layers[1].mlp.lin1.weight, new)
    assert resident_pages(low.vision_encoder.layers[1].mlp.lin1.weight)[0] > 0


def test_refused_where_it_cannot_work(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="float32"):
        load_model(checkpoints["pth"], dtype=torch.bfloat16, low_memory=True)
    with pytest.raises(ValueError, match="for the CPU"):
        load_model(checkpoints["pth"], device="meta", low_memory=True)
    state = torch.load(checkpoints["pth"], weights_only=True)
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="cannot be memory-mapped"):
        load_model(tmp_path / "legacy.pth", low_memory=True)
    from safetensors.torch import save_file

    save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="float16"):
        load_model(tmp_path / "half.safetensors", low_memory=True)
    name = next(k for k, v in state.items() if k.startswith("image_encoder.") and v.ndim == 2)
    state[name] = state[name].t().contiguous().t()  # the same values, stored column-major
    torch.save(state, tmp_path / "strided.pth")
    with pytest.raises(ValueError, match="cannot be memory-mapped as they are"):
        load_model(tmp_path / "strided.pth", low_memory=True)
    for f in ("legacy.pth", "half.safetensors", "strided.pth"):
        assert load_model(tmp_path / f) is not None


def test_full_training_is_refused(checkpoints):
    low = load_model(checkpoints["pth"], low_memory=True)
    with pytest.raises(ValueError, match="without low_memory"):
        set_trainable(low, "full")
    assert set_trainable(low, "hq") and all(n.startswith("mask_decoder.") for n in set_trainable(low, "hq"))


def test_cli_segment_with_low_memory(checkpoints, tmp_path):
    from PIL import Image

    from samhq.cli import main

    Image.fromarray((np.random.default_rng(2).random((300, 400, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    outs = []
    for flag in ([], ["--low-memory"]):
        out = tmp_path / f"out{len(flag)}.png"
        main(["segment", str(tmp_path / "in.png"), "--model", str(checkpoints["pth"]), "--point", "200,150",
              "--out", str(out), "--force", *flag])
        outs.append(np.asarray(Image.open(out)))
    np.testing.assert_array_equal(*outs)
    assert os.path.getsize(tmp_path / "out1.png") > 0


def test_default_load_hands_file_pages_back_as_it_copies(checkpoints):
    """The default load copies the weights a chunk at a time and releases each chunk's file pages, so the file and
    the model are never both resident."""
    from samhq.checkpoints import read_checkpoint
    from samhq.modeling.low_memory import map_state
    from samhq.modeling.pretrained import _copy_weights

    state, config, where = read_checkpoint(checkpoints["safetensors"])
    mapped = map_state(state, where.split(":", 1)[1])
    target = SamHQModel(config).eval()
    copied, resident = [], []
    load = target.load_state_dict

    def spy(chunk, strict):  # before each chunk: how many pages of the chunks copied so far are still mapped
        resident.append(sum(resident_pages(t)[0] for t in copied))
        copied.extend(chunk.values())
        return load(chunk, strict=strict)

    target.load_state_dict = spy
    _copy_weights(target, state, mapped, chunk_bytes=1 << 18)
    assert len(resident) > 10 and sum(resident_pages(t)[1] for t in copied) > 1000
    assert max(resident) == 0, f"file pages left mapped after their chunk was copied: {resident}"
    got = target.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_overwriting_the_file_keeps_a_low_memory_model_working(tmp_path):
    """samhq writes checkpoints to a temporary file renamed over the old one, so a process that has the old file
    mapped keeps reading the old weights (an in-place rewrite would change them under it, or fault)."""
    path = tmp_path / "model.pth"
    save_official(random_model(seed=3, hidden_size=128), path)
    low = load_model(path, low_memory=True)
    want = low.get_image_embeddings(PIXELS)[0]
    save_official(random_model(seed=4, hidden_size=128), path, overwrite=True)
    assert torch.equal(low.get_image_embeddings(PIXELS)[0], want)
    assert not torch.equal(load_model(path).get_image_embeddings(PIXELS)[0], want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    from samhq.checkpoints import write_replacing

    path = tmp_path / "model.pth"
    path.write_bytes(b"old")

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_replacing(path, fail)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]


@pytest.mark.parametrize("layout", ["official", "transformers"])
def test_hq_sam2_low_memory(tmp_path, layout):
    """HQ-SAM 2 loads the same way: equal embeddings, the Hiera trunk's pages handed back."""
    from samhq.config_sam2 import SamHQ2Config
    from samhq.modeling.sam2 import SamHQ2Model

    from official_ref import perturb_
    from sam2_ref import our_config, small_hiera

    # an official .pt carries no config, so its Hiera must be a released size; the transformers layout can be small
    config = SamHQ2Config.from_variant("hiera_t") if layout == "official" else our_config(small_hiera("hiera_t"))
    model = perturb_(SamHQ2Model(config), seed=1).eval()
    src = model.save_official(tmp_path / "hq.pt") if layout == "official" else model.save_pretrained(tmp_path / "hq")
    full, low = load_model(src), load_model(src, low_memory=True)
    assert isinstance(low, SamHQ2Model) and low.low_memory
    size = model.config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    want = full.embed_image(pixels)
    for _ in range(2):
        got = low.embed_image(pixels)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    weights = [p for p in low.vision_encoder.parameters() if resident_pages(p)[1] > 0]
    assert weights and all(resident_pages(p)[0] == 0 for p in weights)
