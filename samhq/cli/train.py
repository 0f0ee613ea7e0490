"""`samhq train`: fine-tune (or train from scratch) a SAM-HQ or HQ-SAM 2 model; launch with torchrun for several processes."""
from __future__ import annotations

import json
from pathlib import Path

from ._common import add_image_args, new_command

# command-line flag -> TrainConfig field: (type, help, choices); flags left unset keep the config file's / default value
_FLAGS = {
    "recipe": (str, "what trains: hq (the paper: HQ token, its MLP, fusion convs; default), decoder, full",
               ("hq", "decoder", "full")),
    "outputs": (str, "which masks get a loss: hq, sam (SAM tokens + IoU head) or both (default: hq for the hq "
                "recipe, both otherwise)", ("hq", "sam", "both")),
    "targets": (str, "fine masks as given, or coarse (SA-1B-like, via samhq.data.coarsen)", ("fine", "coarse")),
    "coarse_radius": (int, "--targets coarse: opening/closing radius in pixels (default ~1.2%% of the short side, "
                      "at least 2)", None),
    "coarse_factor": (int, "--targets coarse: polygon-like simplification factor, 1 for none (default 4)", None),
    "steps": (int, "optimizer steps (default 1000)", None),
    "batch_size": (int, "images per step over all processes (default 4)", None),
    "masks_per_image": (int, "at most this many masks (prompts) per image (default 4)", None),
    "lr": (float, "peak learning rate of AdamW (default 1e-3)", None),
    "weight_decay": (float, "AdamW weight decay of matrices (default 0.01)", None),
    "warmup_steps": (int, "linear warm-up steps before the cosine decay (default 50)", None),
    "grad_clip": (float, "gradient norm clip, 0 for none (default 1.0)", None),
    "label_size": (int, "side of the loss's label maps (default twice the low-res mask size)", None),
    "num_points": (int, "points per mask for --point-loss (default min(112^2, H*W/4))", None),
    "seed": (int, "seed of data order, prompts and initialisation (default 0)", None),
    "save_every": (int, "checkpoint every N steps (default 200)", None),
    "log_every": (int, "append metrics to metrics.jsonl every N steps (default 10)", None),
}


def register(sub) -> None:
    p = new_command(
        sub, "train", "Train SAM-HQ or HQ-SAM 2: the paper's HQ-only recipe by default, or the decoder / the whole model.",
        "samhq train --model sam_hq_vit_b.pth --data DIS5K/DIS-TR --output runs/hq --steps 2000\n"
        "  samhq train --model sam2.1_hq_hiera_large.pt --data DIS5K/DIS-TR --output runs/hq2   # HQ-SAM 2\n"
        "  torchrun --nproc_per_node 2 -m samhq.cli train --config train.yaml   # several processes",
    )
    p.add_argument("--config", metavar="FILE", help="JSON or YAML file with training options (any flag below, "
                   "using underscores) and optionally model, model_config, data, output")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", "-m", metavar="SRC", help="checkpoint to start from, either generation (official .pth / .pt, "
                     "folder, hub id, bundled name)")
    src.add_argument("--model-config", metavar="JSON", help="config.json of a new model trained from scratch (recipe full)")
    p.add_argument("--data", metavar="SPEC", help="a folder of im/ + gt/ images and masks, a COCO instances .json, "
                   "or synthetic:NUM[:SIZE[:SEED]]")
    p.add_argument("--image-dir", help="image folder for a COCO .json (default: next to the json)")
    p.add_argument("--output", "-o", metavar="DIR", help="run folder: checkpoints/, metrics.jsonl, model/")
    for name, (kind, text, choices) in _FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text, choices=choices)
    p.add_argument("--prompt-mix", metavar="BOX,POINT,MASK", help="weights of the prompt kinds (default 0.4,0.4,0.2)")
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    p.add_argument("--point-loss", action="store_true", default=None, help="uncertainty point-sampled BCE + dice")
    p.add_argument("--no-cache", dest="cache_embeddings", action="store_false", default=None,
                   help="do not keep image embeddings in memory when the encoder is frozen")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    add_image_args(p, bit_depth=False)  # --max-pixels for the dataset's images
    p.add_argument("--force", action="store_true", help="train into an existing --output folder from scratch")
    p.set_defaults(func=run)


def read_config_file(path) -> dict:
    """Options from a .json / .yaml / .yml file, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"{path}: YAML configs need PyYAML (pip install pyyaml); or write the config as JSON") from None

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise ValueError(f"{path}: cannot parse the config file ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config file must hold a mapping of option names to values")
    return data


def build_dataset(spec: str, image_dir=None):
    """A dataset from --data: synthetic:NUM[:SIZE[:SEED]], a COCO .json, or an im/ + gt/ folder."""
    if spec.startswith("synthetic:"):
        from ..data.synthetic import SyntheticShapes

        parts = spec.split(":")[1:]
        try:
            num, size, seed = (int(parts[i]) if i < len(parts) else d for i, d in enumerate((None, 256, 0)))
            if num is None or len(parts) > 3:
                raise ValueError
        except ValueError:
            raise ValueError(f"--data {spec!r}: expected synthetic:NUM[:SIZE[:SEED]], e.g. synthetic:10000:128:0") from None
        return SyntheticShapes(num, size, seed=seed)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--data {spec}: no such file or folder (or use synthetic:NUM[:SIZE[:SEED]])")
    from ..data import datasets

    if path.suffix.lower() == ".json":
        return datasets.CocoInstances(path, image_dir)
    return datasets.MaskFolder(path)


def new_model(config_path):
    """An untrained model from a config.json: ours for SAM-HQ (model_type "sam_hq") or for SAM 2 / HQ-SAM 2
    ("sam_hq2"), or transformers' Sam2Config ("sam2")."""
    from ..checkpoints_sam2 import read_config
    from ..config import SamHQConfig
    from ..modeling.model import SamHQModel
    from ..modeling.sam2.model import SamHQ2Model

    path = Path(config_path)
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"--model-config {path}: not a readable JSON config ({e})") from None
    if kind in ("sam_hq2", "sam2", "sam2_video"):
        return SamHQ2Model(read_config(path))
    return SamHQModel(SamHQConfig.from_json_file(path))


def run(args) -> int:
    import torch

    from ..modeling.auto import load_model
    from ..train.trainer import TrainConfig, Trainer, init_distributed, init_weights

    opts = read_config_file(args.config) if args.config else {}
    run_opts = {k: opts.pop(k, None) for k in ("model", "model_config", "data", "image_dir", "output", "threads", "device")}
    for k in run_opts:
        if getattr(args, k, None) is not None:
            run_opts[k] = getattr(args, k)
    for k in list(_FLAGS) + ["bf16", "point_loss", "cache_embeddings", "progress"]:
        if getattr(args, k) is not None:
            opts[k] = getattr(args, k)
    if args.prompt_mix:
        try:
            opts["prompt_mix"] = [float(v) for v in args.prompt_mix.split(",")]
        except ValueError:
            raise ValueError(f"--prompt-mix {args.prompt_mix!r}: expected three numbers BOX,POINT,MASK") from None
    if not run_opts["data"]:
        raise ValueError("no training data: pass --data (a folder, a COCO .json or synthetic:NUM[:SIZE[:SEED]])")
    if not run_opts["output"]:
        raise ValueError("pass --output DIR for checkpoints, metrics and the trained model")
    if not run_opts["model"] and not run_opts["model_config"]:
        raise ValueError("pass --model SRC to fine-tune a checkpoint, or --model-config config.json to train from scratch")
    config = TrainConfig.from_dict(opts)
    output = Path(run_opts["output"])
    if output.exists() and any(output.iterdir()) and not (args.resume or args.force):
        raise FileExistsError(f"{output} already exists and is not empty; pass --resume to continue it or --force to start over")
    if run_opts["threads"]:
        torch.set_num_threads(int(run_opts["threads"]))

    rank, world = init_distributed()
    device = run_opts["device"]
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(config.seed)
    if run_opts["model_config"]:
        model = init_weights(new_model(run_opts["model_config"]), seed=config.seed)
    else:
        model = load_model(run_opts["model"])
    dataset = build_dataset(str(run_opts["data"]), run_opts["image_dir"])
    trainer = Trainer(model, dataset, config, output, device=device)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / "train_config.json").write_text(json.dumps({**config.to_dict(), **run_opts}, indent=2) + "\n")
        n = sum(p.numel() for p in trainer.params)
        print(f"training {n:,} parameters ({config.recipe} recipe) on {len(dataset)} items, {world} process(es)")
    trainer.train(resume=args.resume)
    if rank == 0:
        print(f"wrote {output / 'model'}")
    return 0
