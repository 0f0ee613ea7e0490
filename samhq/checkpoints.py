"""Checkpoint files: official `.pth` (SAM-HQ and plain SAM), the transformers layout (a folder with
`config.json` + `model.safetensors` or `pytorch_model.bin`), single `.safetensors` files, hub ids and
the models bundled with the package. State dicts in, state dicts out: building a model from them is
`SamHQModel.from_pretrained` (samhq.modeling), which sits above this module.

Our parameter names are transformers' `SamHQModel` names, so the transformers layout is our state
dict; the official layout is a renaming. Nothing here unpickles code: `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from .config import VARIANTS, SamHQConfig, SamHQTinyViTConfig, SamHQVisionConfig

BUNDLED_DIR = Path(__file__).parent / "weights"
DEMO_MODEL = "samhq-tiny-shapes"  # trained by samhq on synthetic images, shipped in the package
BUNDLED = {DEMO_MODEL: BUNDLED_DIR / DEMO_MODEL}

TIED = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
# Unused TinyViT classifier weights that official vit_tiny checkpoints carry.
IGNORED_OFFICIAL = re.compile(r"^image_encoder\.(norm_head|head)\.")

# The mask decoder's submodules that SAM-HQ adds to SAM (official names: hf_token, hf_mlp,
# compress_vit_feat, embedding_encoder, embedding_maskfeature): what the paper trains, and what a plain
# SAM checkpoint lacks. HQ-SAM 2 adds the first two and the mask-feature convolution (mask_conv1,
# mask_norm, mask_conv2) under the same names, so this one list serves both generations.
HQ_MODULES = ("hq_token", "hq_mask_mlp", "compress_vit_conv1", "compress_vit_norm", "compress_vit_conv2",
              "encoder_conv1", "encoder_norm", "encoder_conv2", "mask_conv1", "mask_norm", "mask_conv2")


def is_hq_parameter(name: str) -> bool:
    """True for a parameter or buffer name (ours) that belongs to SAM-HQ's or HQ-SAM 2's additions
    (`mask_decoder.<HQ module>.`)."""
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "mask_decoder" and parts[1] in HQ_MODULES


# Name prefixes only SAM 2 state dicts have: Meta's official layout, and transformers' Sam2Model layout.
SAM2_OFFICIAL_PREFIXES = ("image_encoder.trunk.", "sam_mask_decoder.", "sam_prompt_encoder.")
SAM2_TRANSFORMERS_PREFIXES = ("vision_encoder.backbone.",)


def sam2_layout(names) -> str | None:
    """"official" or "transformers" for a SAM 2 / HQ-SAM 2 state dict's names, None for anything else (SAM, SAM-HQ)."""
    names = list(names)
    if any(n.startswith(SAM2_OFFICIAL_PREFIXES) for n in names):
        return "official"
    if any(n.startswith(SAM2_TRANSFORMERS_PREFIXES) for n in names):
        return "transformers"
    return None


def is_sam2_checkpoint(names) -> bool:
    """Whether a state dict's names are SAM 2's (official or transformers layout), e.g. to pick the model class."""
    return sam2_layout(names) is not None


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


# (official, ours) name prefixes, tried in order; `#` stands for a number.
_RULES = [
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.blocks.#.norm#.", "vision_encoder.layers.#.layer_norm#."),
    ("image_encoder.blocks.#.attn.", "vision_encoder.layers.#.attn."),
    ("image_encoder.blocks.#.mlp.", "vision_encoder.layers.#.mlp."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("image_encoder.", "vision_encoder."),
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "shared_image_embedding.positional_embedding"),
    ("prompt_encoder.point_embeddings.", "prompt_encoder.point_embed."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("mask_decoder.transformer.layers.#.norm#.", "mask_decoder.transformer.layers.#.layer_norm#."),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    ("mask_decoder.hf_token.", "mask_decoder.hq_token."),
    ("mask_decoder.hf_mlp.", "mask_decoder.hq_mask_mlp."),
    ("mask_decoder.compress_vit_feat.0.", "mask_decoder.compress_vit_conv1."),
    ("mask_decoder.compress_vit_feat.1.", "mask_decoder.compress_vit_norm."),
    ("mask_decoder.compress_vit_feat.3.", "mask_decoder.compress_vit_conv2."),
    ("mask_decoder.embedding_encoder.0.", "mask_decoder.encoder_conv1."),
    ("mask_decoder.embedding_encoder.1.", "mask_decoder.encoder_norm."),
    ("mask_decoder.embedding_encoder.3.", "mask_decoder.encoder_conv2."),
    ("mask_decoder.embedding_maskfeature.0.", "mask_decoder.mask_conv1."),
    ("mask_decoder.embedding_maskfeature.1.", "mask_decoder.mask_norm."),
    ("mask_decoder.embedding_maskfeature.3.", "mask_decoder.mask_conv2."),
]
_MLP = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head|hf_mlp|hq_mask_mlp))\.(.*)$")


def _compile(src: str, dst: str) -> tuple[re.Pattern, str]:
    pattern = "^" + re.escape(src).replace("\\#", "#").replace("#", r"(\d+)")
    groups = iter(range(1, 10))
    return re.compile(pattern), re.sub("#", lambda _: f"\\{next(groups)}", dst)


_FORWARD = [_compile(a, b) for a, b in _RULES]
_REVERSE = [_compile(b, a) for a, b in _RULES]


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, name, count=1)
        if n:
            return new
    return name


def _mlp_depths(names, official: bool) -> dict[str, int]:
    depths: dict[str, int] = {}
    for name in names:
        m = _MLP.match(name)
        if m:
            prefix, rest = m.groups()
            if official:
                i = int(rest.split(".")[1])
                depths[prefix] = max(depths.get(prefix, 0), i + 1)
            elif rest.startswith("layers."):
                depths[prefix] = max(depths.get(prefix, 2), int(rest.split(".")[1]) + 3)
            else:
                depths.setdefault(prefix, 2)
    return depths


def official_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official SAM-HQ / SAM state dict to our (transformers') parameter names."""
    depths = _mlp_depths(state, official=True)
    out = {}
    for name, tensor in state.items():
        if IGNORED_OFFICIAL.match(name):
            continue
        m = _MLP.match(name)
        if m:  # MLP `layers.i` -> proj_in / layers.(i-1) / proj_out
            prefix, rest = m.groups()
            i, tail = rest.split(".", 2)[1:]
            depth = depths[prefix]
            sub = "proj_in" if int(i) == 0 else "proj_out" if int(i) == depth - 1 else f"layers.{int(i) - 1}"
            name = f"{prefix}.{sub}.{tail}"
        out[_rename(name, _FORWARD)] = tensor
    if TIED[0] in out:
        out[TIED[1]] = out[TIED[0]]
    return out


def ours_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename our state dict to the official names (loadable by `segment_anything_hq`)."""
    depths = _mlp_depths(state, official=False)
    out = {}
    for name, tensor in state.items():
        if name == TIED[1]:
            continue
        m = _MLP.match(name)
        if m:
            prefix, rest = m.groups()
            depth = depths[prefix]
            if rest.startswith("proj_in."):
                i, tail = 0, rest[len("proj_in."):]
            elif rest.startswith("proj_out."):
                i, tail = depth - 1, rest[len("proj_out."):]
            else:
                _, j, tail = rest.split(".", 2)
                i = int(j) + 1
            prefix = prefix.replace("hq_mask_mlp", "hf_mlp")
            out[f"{prefix}.layers.{i}.{tail}"] = tensor
            continue
        out[_rename(name, _REVERSE)] = tensor
    return out


# ---------------------------------------------------------------------------------------------
# Reading files


def _torch_load(path: Path) -> dict:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        # torch's weights-only unpickler says "Unsupported global" for a pickled class or function (what could run
        # code); "Weights only load failed" alone also comes with damaged pickle data ("Unsupported operand").
        if "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: refusing to load: the file holds pickled Python objects, not just tensors, and "
                "loading it could run code. Convert it where you trust it, e.g. to safetensors."
            ) from None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith(("Unsupported operand", "WeightsUnpickler error"))),
                      lines[0] if lines else type(e).__name__)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (damaged or truncated?): {detail}") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors, or {{'model': state_dict}})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def _safetensors_load(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (damaged or truncated?): {e}") from None


def read_state_file(path) -> tuple[dict[str, torch.Tensor], dict]:
    """One checkpoint file's tensors by name (any naming) and its safetensors metadata ({} for torch files).

    `.safetensors` files are read with safetensors; `.pth` / `.pt` / `.bin` / `.ckpt` (and zip-format
    files of any name) with `torch.load(weights_only=True)`, memory-mapped where possible; a state dict
    wrapped as {"model": ...}, {"state_dict": ...} or {"module": ...} is unwrapped and a `module.` name
    prefix (DataParallel) dropped. Nothing that could run code is unpickled. Raises CheckpointError with
    one line naming the file: damaged or truncated, pickled Python objects, not a state dict, not a checkpoint.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _safetensors_load(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) == 8 and head[:2] == b"PK" or path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return _torch_load(path), {}
    # safetensors files start with a little-endian header length followed by '{'.
    if len(head) == 8 and 0 < int.from_bytes(head, "little") < 1 << 30:
        return _safetensors_load(path)
    raise CheckpointError(f"{path}: not a checkpoint (expected .pth, .pt, .bin or .safetensors)")


def _is_official(state: dict) -> bool:
    return any(k.startswith(("image_encoder.", "prompt_encoder.pe_layer", "prompt_encoder.point_embeddings")) for k in state)


# ---------------------------------------------------------------------------------------------
# Inferring the configuration from tensor shapes


def infer_config(state: dict[str, torch.Tensor], where: str = "checkpoint") -> SamHQConfig:
    """Build the config that matches the tensors of a state dict in our naming."""
    try:
        if "vision_encoder.patch_embed.seq.0.c.weight" in state:
            vision = _infer_tiny(state)
        else:
            vision = _infer_vit(state)
        return SamHQConfig.from_variant("vit_b") if vision is None else SamHQConfig(
            vision_config=vision,
            mask_decoder_config={"vit_dim": vision.hq_feature_dim},
        )
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"{where}: does not look like a SAM / SAM-HQ checkpoint ({e})") from None


def _count(state, pattern) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    if not idx:
        raise KeyError(f"no tensors match {pattern!r}")
    return max(idx) + 1


def _infer_vit(state) -> SamHQVisionConfig:
    proj = state["vision_encoder.patch_embed.projection.weight"]
    hidden, patch = proj.shape[0], proj.shape[-1]
    depth = _count(state, r"vision_encoder\.layers\.(\d+)\.")
    pos = state.get("vision_encoder.pos_embed")
    grid = pos.shape[1] if pos is not None else 64
    rel = [state.get(f"vision_encoder.layers.{i}.attn.rel_pos_h") for i in range(depth)]
    use_rel = rel[0] is not None
    if use_rel:
        glob = [i for i, r in enumerate(rel) if r.shape[0] == 2 * grid - 1]
        windowed = [r.shape[0] for r in rel if r.shape[0] != 2 * grid - 1]
        window = (windowed[0] + 1) // 2 if windowed else 14
        heads = hidden // rel[0].shape[1]
    else:
        glob, window, heads = [], 14, max(1, hidden // 64)
    mlp = state["vision_encoder.layers.0.mlp.lin1.weight"].shape[0]
    return SamHQVisionConfig(
        hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads, patch_size=patch,
        image_size=grid * patch, global_attn_indexes=glob, window_size=window, use_rel_pos=use_rel,
        use_abs_pos=pos is not None, mlp_dim=mlp, mlp_ratio=mlp / hidden,
        output_channels=state["vision_encoder.neck.conv1.weight"].shape[0],
    )


def _infer_tiny(state) -> SamHQTinyViTConfig:
    dims = [state["vision_encoder.patch_embed.seq.2.c.weight"].shape[0]]
    depths = [_count(state, r"vision_encoder\.layers\.0\.blocks\.(\d+)\.")]
    heads, windows = [1], [7]
    for i in (1, 2, 3):
        dims.append(state[f"vision_encoder.layers.{i}.blocks.0.attn.qkv.weight"].shape[1])
        depths.append(_count(state, rf"vision_encoder\.layers\.{i}\.blocks\.(\d+)\."))
        bias = state[f"vision_encoder.layers.{i}.blocks.0.attn.attention_biases"]
        heads.append(bias.shape[0])
        windows.append(math.isqrt(bias.shape[1]))
    heads[0], windows[0] = {64: (2, 7)}.get(dims[0], (max(1, dims[0] // 32), 7))
    return SamHQTinyViTConfig(embed_dims=dims, depths=depths, num_heads=heads, window_sizes=windows)


# ---------------------------------------------------------------------------------------------
# Checking a checkpoint before a model is built from it


def validate_checkpoint(state: dict[str, torch.Tensor], config: SamHQConfig, where: str = "checkpoint",
                        limits=None, after_each=None) -> None:
    """Refuse weights that cannot be right, before any model is built (state in our naming).

    Raises CheckpointError naming the tensor or config field when
    - a tensor is not floating point (int64, bool, uint8 ... of the right shape; only BatchNorm's
      `num_batches_tracked` counters are integers), or holds NaN or infinite values;
    - a config value disagrees with the tensors present (layer counts, widths, heads, window and
      image sizes: a `config.json` claiming 100000 layers for 12 layers of weights fails here, in
      milliseconds, instead of building the 100000 layers);
    - an integer config value that no tensor confirms is over `limits.max_config_value`
      (`samhq.limits`; default 16384).
    after_each(tensor), when given, is called once each tensor's values have been checked.
    """
    from .limits import HOW_TO_RAISE, get_limits

    check_tensors(state, where, after_each)
    wrong = [f"{field} is {value} but the tensors say {found}"
             for field, value, found in _config_vs_tensors(state, config) if value != found]
    if wrong:
        raise CheckpointError(f"{where}: config does not match the weights: {short_list(wrong, 4)}")
    maximum = (limits or get_limits()).max_config_value
    for field, value in _config_ints(config.to_dict()):
        if value > maximum:
            raise CheckpointError(f"{where}: config value {field} = {value} is over the limit of {maximum} "
                                  f"(max_config_value; raise it with {HOW_TO_RAISE['max_config_value']})")


def check_tensors(state: dict[str, torch.Tensor], where: str = "checkpoint", after_each=None) -> None:
    """Refuse tensors no SAM weights can be (either generation): a non-floating dtype (int64, bool, uint8 ...;
    only BatchNorm's `num_batches_tracked` counters are integers), or NaN / infinite values. Raises
    CheckpointError naming the tensor."""
    for name, t in state.items():
        if not t.is_floating_point() and not (name.endswith("num_batches_tracked") and not t.is_complex()
                                              and t.dtype != torch.bool):
            raise CheckpointError(f"{where}: tensor {name} has dtype {str(t.dtype).replace('torch.', '')}; SAM-HQ weights "
                                  "are floating point, so the file is damaged or not a SAM-HQ checkpoint")
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{where}: tensor {name} holds {bad} NaN or infinite values (of {t.numel()}); "
                                  "the weights are damaged")
        if after_each is not None:
            after_each(t)


def _config_ints(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _config_ints(v, f"{prefix}{k}.")
        elif isinstance(v, (list, tuple)):
            yield from ((f"{prefix}{k}[{i}]", x) for i, x in enumerate(v) if isinstance(x, int) and not isinstance(x, bool))
        elif isinstance(v, int) and not isinstance(v, bool):
            yield f"{prefix}{k}", v


def _config_vs_tensors(state, config: SamHQConfig):
    """(config field, its value, the value the tensors imply) for every config value a tensor pins down."""

    def shape(name, dim):
        t = state.get(name)
        return None if t is None or t.ndim <= dim else int(t.shape[dim])

    def count(pattern):  # None when no tensor matches: the missing keys are named later, once the model is built
        idx = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
        return max(idx) + 1 if idx else None

    def pinned(field, value, found):
        return [] if found is None else [(field, value, found)]

    v, p, d = config.vision_config, config.prompt_encoder_config, config.mask_decoder_config
    out = []
    if config.is_tiny:
        for i in range(4):
            out += pinned(f"vision_config.depths[{i}]", v.depths[i], count(rf"vision_encoder\.layers\.{i}\.blocks\.(\d+)\."))
        out += pinned("vision_config.embed_dims[0]", v.embed_dims[0], shape("vision_encoder.patch_embed.seq.2.c.weight", 0))
        for i in (1, 2, 3):
            block = f"vision_encoder.layers.{i}.blocks.0.attn."
            out += pinned(f"vision_config.embed_dims[{i}]", v.embed_dims[i], shape(block + "qkv.weight", 1))
            out += pinned(f"vision_config.num_heads[{i}]", v.num_heads[i], shape(block + "attention_biases", 0))
            out += pinned(f"vision_config.window_sizes[{i}] squared", v.window_sizes[i] ** 2,
                          shape(block + "attention_biases", 1))
    elif "vision_encoder.patch_embed.projection.weight" in state:
        proj = "vision_encoder.patch_embed.projection.weight"
        out += pinned("vision_config.num_hidden_layers", v.num_hidden_layers, count(r"vision_encoder\.layers\.(\d+)\."))
        out += pinned("vision_config.hidden_size", v.hidden_size, shape(proj, 0))
        out += pinned("vision_config.num_channels", v.num_channels, shape(proj, 1))
        out += pinned("vision_config.patch_size", v.patch_size, shape(proj, 3))
        out += pinned("vision_config.mlp_dim", v.mlp_dim, shape("vision_encoder.layers.0.mlp.lin1.weight", 0))
        out += pinned("vision_config.output_channels", v.output_channels, shape("vision_encoder.neck.conv1.weight", 0))
        grid = v.image_size // v.patch_size
        out.append(("vision_config.use_abs_pos", v.use_abs_pos, "vision_encoder.pos_embed" in state))
        out += pinned("vision_config.image_size / patch_size", grid, shape("vision_encoder.pos_embed", 1))
        out.append(("vision_config.use_rel_pos", v.use_rel_pos, "vision_encoder.layers.0.attn.rel_pos_h" in state))
        if v.use_rel_pos:
            head_dim = v.hidden_size // v.num_attention_heads
            for i in range(min(v.num_hidden_layers, count(r"vision_encoder\.layers\.(\d+)\.") or 0)):
                rel = f"vision_encoder.layers.{i}.attn.rel_pos_h"
                size = grid if i in v.global_attn_indexes else v.window_size
                out += pinned(f"vision_config (layer {i}'s {'global' if size == grid else 'window'} size) * 2 - 1",
                              2 * size - 1, shape(rel, 0))
                out += pinned("vision_config.hidden_size / num_attention_heads", head_dim, shape(rel, 1))
    out += pinned("vision_config.num_pos_feats", v.num_pos_feats, shape("shared_image_embedding.positional_embedding", 1))
    out += pinned("prompt_encoder_config.hidden_size", p.hidden_size, shape("prompt_encoder.no_mask_embed.weight", 1))
    out += pinned("prompt_encoder_config.num_point_embeddings", p.num_point_embeddings,
                  count(r"prompt_encoder\.point_embed\.(\d+)\."))
    out += pinned("prompt_encoder_config.mask_input_channels", p.mask_input_channels,
                  shape("prompt_encoder.mask_embed.conv3.weight", 1))
    out += pinned("mask_decoder_config.hidden_size", d.hidden_size, shape("mask_decoder.iou_token.weight", 1))
    out += pinned("mask_decoder_config.num_hidden_layers", d.num_hidden_layers,
                  count(r"mask_decoder\.transformer\.layers\.(\d+)\."))
    out += pinned("mask_decoder_config.mlp_dim", d.mlp_dim, shape("mask_decoder.transformer.layers.0.mlp.lin1.weight", 0))
    out += pinned("mask_decoder_config.hidden_size / attention_downsample_rate", d.hidden_size // d.attention_downsample_rate,
                  shape("mask_decoder.transformer.final_attn_token_to_image.q_proj.weight", 0))
    out += pinned("mask_decoder_config.num_multimask_outputs + 1", d.num_multimask_outputs + 1,
                  count(r"mask_decoder\.output_hypernetworks_mlps\.(\d+)\."))
    if "mask_decoder.iou_prediction_head.proj_in.weight" in state:
        out.append(("mask_decoder_config.iou_head_depth", d.iou_head_depth,
                    2 + (count(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.") or 0)))
    out += pinned("mask_decoder_config.iou_head_hidden_dim", d.iou_head_hidden_dim,
                  shape("mask_decoder.iou_prediction_head.proj_in.weight", 0))
    out += pinned("mask_decoder_config.vit_dim", d.vit_dim, shape("mask_decoder.compress_vit_conv1.weight", 0))
    return out


class NonFiniteOutputError(ValueError):
    """A model output (score, mask logit) is NaN or infinite: damaged weights, or a dtype that overflows."""


def require_finite(values, what: str) -> None:
    """Raise NonFiniteOutputError unless every value is finite (so no NaN ever reaches a JSON output)."""
    t = torch.as_tensor(values, dtype=torch.float64) if not isinstance(values, torch.Tensor) else values
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteOutputError(
            f"the model produced NaN or infinite {what}: its weights are damaged or its dtype overflows "
            "(load it in float32; checkpoints with such weights are refused when loaded)")


# ---------------------------------------------------------------------------------------------
# Loading


def demo_model_available() -> bool:
    """True when the bundled demo model's files are installed."""
    return BUNDLED[DEMO_MODEL].exists()


def resolve_source(source) -> Path:
    """A local path for `source`: a path, a bundled model name, or a hub id (downloaded)."""
    if isinstance(source, (str, os.PathLike)) and Path(source).exists():
        return Path(source)
    name = str(source)
    if name in BUNDLED:
        if not BUNDLED[name].exists():
            raise CheckpointError(f"bundled model {name!r} is missing from this installation ({BUNDLED[name]})")
        return BUNDLED[name]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.endswith((".pth", ".safetensors", ".bin")):
        return _download(name)
    raise CheckpointError(
        f"{name}: no such file or directory, and not a bundled model ({', '.join(BUNDLED)}) or a hub id (org/name)"
    )


def _download(repo_id: str) -> Path:
    """Download a hub repository's model files: config.json with model.safetensors (or pytorch_model.bin)
    when it has them (transformers' layout, e.g. facebook/sam2.1-hiera-large), else its one official
    `.pth` / `.pt` checkpoint (e.g. a repository holding sam_hq_vit_b.pth). Never both."""
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id} looks like a hub id, but huggingface_hub is not installed: `pip install samhq[hub]`, "
            f"or download the repository's config.json and model.safetensors and pass their folder"
        ) from None
    try:
        files = HfApi().list_repo_files(repo_id)
        weights = [f for f in files if f in ("model.safetensors", "pytorch_model.bin")]
        if not weights:
            weights = [f for f in files if "/" not in f and f.endswith((".safetensors", ".pth", ".pt"))]
        if not weights:
            raise CheckpointError(f"{repo_id}: the hub repository has no model.safetensors, pytorch_model.bin or "
                                  f".pth / .pt checkpoint (files: {short_list(files)})")
        if len(weights) > 1:
            raise CheckpointError(f"{repo_id}: the hub repository holds several checkpoints ({short_list(weights)}); download "
                                  "the one you want (huggingface_hub.hf_hub_download) and pass its path")
        return Path(snapshot_download(repo_id, allow_patterns=["config.json", *weights]))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{repo_id}: could not fetch from the hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "If you are offline, download config.json and model.safetensors elsewhere and pass their folder."
        ) from None


# model_type values of config.json files: SAM 2 (transformers' Sam2Model / Sam2VideoModel, ours), SAM-HQ / SAM.
_SAM2_MODEL_TYPES = ("sam2", "sam2_video", "sam_hq2")
_SAM_MODEL_TYPES = ("sam_hq", "sam")


def checkpoint_family(path) -> str:
    """"sam2" (SAM 2, SAM 2.1, HQ-SAM 2) or "sam" (SAM, SAM-HQ) for a local checkpoint file or folder
    (`resolve_source` turns hub ids and bundled names into one).

    A folder's config.json decides (its model_type); otherwise the tensor names do, read without
    loading the tensors' data. Raises CheckpointError for unreadable files.
    """
    path = Path(path)
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{cfg}: not a readable JSON config ({e})") from None
            kind = data.get("model_type") if isinstance(data, dict) else None
            if kind in _SAM2_MODEL_TYPES or (isinstance(data, dict) and "samhq2_config" in data):
                return "sam2"
            if kind in _SAM_MODEL_TYPES:
                return "sam"
        files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()]
        files = files or [p for ext in ("*.pth", "*.pt", "*.safetensors") for p in sorted(path.glob(ext))]
        if len(files) != 1:
            return "sam"  # the SAM-HQ reader names what is missing
        path = files[0]
    if not path.is_file():
        return "sam"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
        except (SafetensorError, OSError, ValueError):
            return "sam"  # the reader reports the damage
    else:
        import zipfile

        if not zipfile.is_zipfile(path):  # torch's legacy format (no memory map): older than SAM 2, read once by SAM's reader
            return "sam"
        try:
            names = list(read_state_file(path)[0])  # memory-mapped: names without reading the weights
        except CheckpointError:
            return "sam"
    return "sam2" if is_sam2_checkpoint(names) else "sam"


def read_checkpoint(source) -> tuple[dict[str, torch.Tensor], SamHQConfig | None, str]:
    """State dict in our naming, the config if the checkpoint carries one, and "official:PATH" or "transformers:PATH".

    Raises CheckpointError for unreadable files and for SAM 2 checkpoints (read by `checkpoints_sam2`).
    """
    path = resolve_source(source)
    if checkpoint_family(path) == "sam2":
        raise CheckpointError(f"{path}: a SAM 2 / HQ-SAM 2 checkpoint, not SAM-HQ (v1): load it with samhq.load_model "
                              "(or SamHQ2Model.from_pretrained)")
    config = None
    if path.is_dir():
        cfg_file = path / "config.json"
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()), None)
        if weights is None:
            found = sorted(p.name for p in path.glob("*.pth")) + sorted(p.name for p in path.glob("*.safetensors"))
            if len(found) != 1:
                raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin in this directory")
            weights = path / found[0]
        if cfg_file.exists():
            try:
                config = SamHQConfig.from_json_file(cfg_file)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{cfg_file}: {e}") from None
        path = weights
    state, meta = read_state_file(path)
    if config is None and "samhq_config" in meta:
        config = SamHQConfig.from_dict(json.loads(meta["samhq_config"]))
    fmt = "official" if _is_official(state) else "transformers"
    if fmt == "official":
        state = official_to_ours(state)
    elif TIED[0] in state or TIED[1] in state:
        t = state.get(TIED[0], state.get(TIED[1]))
        state[TIED[0]] = state[TIED[1]] = t
    return state, config, f"{fmt}:{path}"


def short_list(items, n: int = 6) -> str:
    items = list(items)
    if not items:
        return "none"
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------
# Writing


def _refuse_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (or --force) to replace it")


def write_replacing(path: Path, write) -> None:
    """`write(tmp)` into a temporary file next to `path`, then rename it over `path`: nobody ever reads a half-written
    checkpoint, a failed write leaves the old file as it was, and a process that has the old file memory-mapped (every
    load maps it; `low_memory` keeps it mapped) goes on reading the old contents."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_pretrained(state: dict[str, torch.Tensor], config, directory, safe_serialization: bool = True,
                     overwrite: bool = True) -> Path:
    """Write the transformers layout: `config.json` + `model.safetensors` (or `pytorch_model.bin`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / ("model.safetensors" if safe_serialization else "pytorch_model.bin")
    _refuse_overwrite(weights, overwrite)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items() if k != TIED[1]}
    if safe_serialization:
        write_replacing(weights, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    else:
        write_replacing(weights, lambda tmp: torch.save(state, tmp))
    with open(directory / "config.json", "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    return directory


def write_official(state: dict[str, torch.Tensor], path, overwrite: bool = False) -> Path:
    """Write an official-format `.pth` state dict (loadable by `segment_anything_hq`)."""
    path = Path(path)
    _refuse_overwrite(path, overwrite)
    official = ours_to_official({k: v.detach().contiguous().cpu() for k, v in state.items()})
    write_replacing(path, lambda tmp: torch.save(official, tmp))
    return path


__all__ = ["CheckpointError", "NonFiniteOutputError", "validate_checkpoint", "require_finite", "read_checkpoint",
           "read_state_file", "checkpoint_family", "check_tensors", "is_sam2_checkpoint", "sam2_layout", "is_hq_parameter",
           "HQ_MODULES",
           "resolve_source", "infer_config", "write_pretrained", "write_official", "official_to_ours", "ours_to_official",
           "BUNDLED", "DEMO_MODEL", "VARIANTS"]
