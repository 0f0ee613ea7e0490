"""Training SAM-HQ and HQ-SAM 2: recipes, the training step, exact checkpoint/resume and torch.distributed.

The same trainer takes a `SamHQModel` (SAM-HQ, SAM) or a `SamHQ2Model` (HQ-SAM 2, SAM 2.1). What the
family changes is the image frame (SAM-HQ: longest side resized and padded; SAM 2: a square resize)
and the per-image features the decoder takes (SAM-HQ: the embedding and the early ViT features fused
by the HQ branch; SAM 2: the FPN levels, from which the embedding and the high-resolution features
are derived inside the step, so `conv_s0` / `conv_s1` train with the decoder recipe).

Recipes (which parameters train):
  "hq"      the paper's: everything frozen except the HQ token, its MLP and the fusion convolutions
            (official `hf_token`, `hf_mlp`, `compress_vit_feat`, `embedding_encoder`, `embedding_maskfeature`;
            HQ-SAM 2 has the first two and `embedding_maskfeature`): `samhq.checkpoints.is_hq_parameter`;
  "decoder" the whole mask decoder (SAM tokens and HQ parts), encoders frozen;
  "full"    everything (small models from scratch).
Outputs (which masks get a loss): "hq" the HQ mask alone (as the official training), "sam" the SAM
tokens (the single-mask token, the best of the three multimask tokens, and the IoU head), "both".

Each step is a pure function of (seed, step): the images of a step come from a per-epoch seeded
permutation and the prompts from a generator seeded by (seed, step, position), so a resumed run
repeats an uninterrupted one bit for bit. With several processes (torchrun) each rank takes its
share of the global batch and gradients are averaged with all-reduce before the optimizer step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import distributed as dist
from torch import nn

from ..checkpoints import HQ_MODULES, is_hq_parameter
from ..data.synthetic import coarsen
from ..modeling.common import FeedForward
from ..modeling.losses import iou_prediction_loss, mask_losses
from ..modeling.sam2.model import SamHQ2Model
from .data import labels_at, preprocess_image, preprocess_masks
from .prompts import KINDS, sample_prompts

RECIPES = ("hq", "decoder", "full")
OUTPUTS = ("hq", "sam", "both")


@dataclass
class TrainConfig:
    recipe: str = "hq"
    outputs: str | None = None  # default: "hq" for the hq recipe, "both" otherwise
    targets: str = "fine"  # "fine" or "coarse" (masks passed through `coarsen`, SA-1B-like)
    steps: int = 1000
    batch_size: int = 4  # images per optimizer step, over all processes
    masks_per_image: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    bf16: bool = False  # autocast to bfloat16 (CPU or CUDA)
    point_loss: bool = False  # BCE + dice at uncertainty-sampled points instead of every pixel
    num_points: int | None = None
    iou_loss_weight: float = 1.0
    prompt_mix: tuple[float, float, float] = (0.4, 0.4, 0.2)  # box, point, mask
    max_points: int = 5
    box_noise: float = 0.1
    label_size: int | None = None  # default: twice the low-resolution mask size
    coarse_radius: int | None = None  # `coarsen`'s radius and factor; scale them with the image size
    coarse_factor: int = 4
    cache_embeddings: bool = True  # frozen encoder: embed each image once and keep it
    seed: int = 0
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.outputs is None:
            self.outputs = "hq" if self.recipe == "hq" else "both"
        if self.outputs not in OUTPUTS:
            raise ValueError(f"outputs must be one of {OUTPUTS}, got {self.outputs!r}")
        if self.recipe == "hq" and self.outputs != "hq":
            raise ValueError("the hq recipe trains only the HQ parts: use outputs='hq' (or the decoder/full recipe)")
        if self.targets not in ("fine", "coarse"):
            raise ValueError(f"targets must be 'fine' or 'coarse', got {self.targets!r}")
        if self.coarse_factor < 1 or (self.coarse_radius is not None and self.coarse_radius < 1):
            raise ValueError(f"coarse_radius and coarse_factor must be at least 1, "
                             f"got {self.coarse_radius} and {self.coarse_factor}")
        for name in ("steps", "batch_size", "masks_per_image", "save_every", "log_every", "max_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.prompt_mix = tuple(float(p) for p in self.prompt_mix)
        if len(self.prompt_mix) != 3 or min(self.prompt_mix) < 0 or sum(self.prompt_mix) <= 0:
            raise ValueError(f"prompt_mix must be 3 non-negative weights (box, point, mask), got {self.prompt_mix}")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown training options {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def set_trainable(model: nn.Module, recipe: str) -> list[str]:
    """Freeze the model except the recipe's parameters; returns the trainable parameter names."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if recipe == "full" and getattr(model, "low_memory", False):
        raise ValueError("recipe 'full' trains the image encoder, whose weights a low_memory model reads from the file; "
                         "load the model without low_memory to train it")
    names = []
    for name, p in model.named_parameters():
        if recipe == "full":
            train = True
        elif recipe == "decoder":
            train = name.startswith("mask_decoder.")
        else:
            train = is_hq_parameter(name)
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names


def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Initialise a model for training from scratch, reproducibly for `seed`.

    Linear layers of the transformer blocks (which have layer norms) and position embeddings get a
    truncated normal with std 0.02, biases zero. The norm-free MLP heads (mask hypernetworks, IoU
    head) and convolutions get fan-in uniform weights: with std 0.02 a 3-layer head would shrink
    its signal ~100x and the masks would barely start to learn.
    """
    g = torch.Generator().manual_seed(seed)
    heads = tuple(n + "." for n, m in model.named_modules() if isinstance(m, FeedForward))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.startswith(heads):
                bound = 1 / math.sqrt(module.in_features)
                module.weight.copy_((torch.rand(module.weight.shape, generator=g) * 2 - 1) * bound)
                if module.bias is not None:
                    module.bias.copy_((torch.rand(module.bias.shape, generator=g) * 2 - 1) * bound)
            elif isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g).clamp_(-2, 2) * 0.02)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = module.weight[0].numel() if isinstance(module, nn.Conv2d) else module.weight[:, 0].numel()
                bound = 1 / math.sqrt(fan_in)
                module.weight.copy_((torch.rand(module.weight.shape, generator=g) * 2 - 1) * bound)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif "rel_pos" in name:
                p.zero_()
    return model


def init_hq_parameters(model: nn.Module, seed: int = 0) -> nn.Module:
    """Initialise the HQ parts (`samhq.checkpoints.HQ_MODULES` of the mask decoder) as `init_weights` does,
    norms to weight 1 and bias 0; everything else is left as it is. For training HQ parts from a plain
    SAM / SAM 2 checkpoint, whose loader leaves them zero."""
    parts = nn.ModuleDict({n: m for n, m in model.mask_decoder.named_children() if n in HQ_MODULES})
    init_weights(parts, seed)
    with torch.no_grad():
        for name, p in parts.named_parameters():
            if "norm" in name.split(".")[0]:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return model


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to `min_ratio` at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return _world()


class Trainer:
    """Train `model` on `dataset` (items with "image" and "masks") as `config` says, in `output_dir`.

    output_dir/checkpoints/step-XXXXXXX.pt (resumable state), output_dir/metrics.jsonl and, at the
    end, output_dir/model (save_pretrained: config.json + model.safetensors).
    """

    def __init__(self, model: nn.Module, dataset, config: TrainConfig, output_dir, device=None):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.model, self.dataset, self.config = model, dataset, config
        self.output_dir = Path(output_dir)
        self.rank, self.world = _world()
        if config.batch_size % self.world:
            raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the number of processes ({self.world})")
        self.device = torch.device(device) if device is not None else model.device
        self.model.to(self.device)
        if config.outputs in ("hq", "both") and not getattr(model, "hq_enabled", True):
            # a plain SAM / SAM 2 checkpoint: train its HQ parts, as the paper starts from SAM (the loader left
            # them zero, where no gradient would reach the inner layers: initialise them first)
            model.hq_enabled = True
            if all(not p.any() for n, p in model.named_parameters() if is_hq_parameter(n)):
                init_hq_parameters(model, config.seed)
        self.trainable = set_trainable(model, config.recipe)
        if not self.trainable:
            raise ValueError(f"recipe {config.recipe!r} leaves nothing to train in this model")
        self.params = [p for n, p in model.named_parameters() if n in self.trainable]
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.steps, config.warmup_steps, config.min_lr_ratio)
        )
        self.step = 0
        cfg = model.config
        self.sam2 = isinstance(model, SamHQ2Model)
        self.image_size = cfg.image_size if self.sam2 else cfg.vision_config.image_size
        self.mask_size = 4 * cfg.prompt_encoder_config.image_embedding_size
        self.label_size = config.label_size or min(self.image_size, 2 * self.mask_size)
        self.frozen_encoder = config.recipe != "full"
        self.cache: dict[int, tuple] = {}
        if self.world > 1:  # every rank starts from rank 0's weights
            for p in model.parameters():
                dist.broadcast(p.data, 0)

    # ---- data -------------------------------------------------------------------------------
    def batch_indices(self, step: int) -> list[int]:
        """Dataset indices of this rank's share of the global batch at `step`."""
        n, b = len(self.dataset), self.config.batch_size
        out, perms = [], {}
        for k in range(self.rank, b, self.world):
            j = step * b + k
            epoch = j // n
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 100003 + epoch))
            out.append(int(perms[epoch][j % n]))
        return out

    def _sample(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel values (3, S, S) and input-frame masks (P, S, S) of item `index`, at most masks_per_image."""
        item = self.dataset[index]
        masks = [np.asarray(m, dtype=bool) for m in item["masks"] if np.asarray(m).any()]
        if not masks:
            raise ValueError(f"dataset item {index} has no non-empty mask")
        if len(masks) > self.config.masks_per_image:
            keep = np.sort(rng.choice(len(masks), self.config.masks_per_image, replace=False))
            masks = [masks[i] for i in keep]
        if self.config.targets == "coarse":
            masks = [coarsen(m, self.config.coarse_radius, self.config.coarse_factor) for m in masks]
        square = self.sam2  # SAM 2's frame: the image resized to a square, aspect ratio not kept
        return (preprocess_image(item["image"], self.image_size, square=square),
                preprocess_masks(masks, self.image_size, square=square))

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The image encoder's outputs the decoder side starts from, batch first: SAM-HQ's image embeddings
        (B, C, h, w) and early features (B, h, w, Cv); SAM 2's three FPN levels."""
        if self.sam2:
            return tuple(self.model.encode(pixels))
        emb, inter = self.model.vision_encoder(pixels)
        return emb, inter[0]

    def _embed(self, indices, pixels) -> tuple[torch.Tensor, ...]:
        """`_encode` for a batch: with grad for the full recipe; otherwise without grad, one image at a time (so
        the result never depends on the batch's make-up) and kept in a cache when `cache_embeddings` is set."""
        if not self.frozen_encoder:
            return self._encode(pixels.to(self.device))
        out = []
        for idx, x in zip(indices, pixels):
            value = self.cache.get(idx)
            if value is None:
                with torch.no_grad():
                    value = tuple(t[0].float() for t in self._encode(x[None].to(self.device)))
                if self.config.cache_embeddings:
                    self.cache[idx] = value
            out.append(value)
        return tuple(torch.stack(parts) for parts in zip(*out))

    def _image_inputs(self, encoded: tuple[torch.Tensor, ...], want_hq: bool):
        """The per-image half of decoding, with autograd (what trains there does get gradients): a function
        i -> the image arguments of the model's `predict_all` for image i of the batch."""
        if self.sam2:
            emb, high_res = self.model.embeddings_from_features(list(encoded))
            return lambda i: (emb[i:i + 1], [h[i:i + 1] for h in high_res])
        emb, early = encoded
        hq_feat = self.model.mask_decoder.hq_features(emb, early) if want_hq else None
        return lambda i: (emb[i:i + 1], None if hq_feat is None else hq_feat[i:i + 1])

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    # ---- one step ---------------------------------------------------------------------------
    def compute_loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """This rank's loss at `step` (mean over its prompts) and loss parts for logging."""
        c = self.config
        indices = self.batch_indices(step)
        # keyed by the position in the global batch, so the split over processes does not change the prompts
        rngs = [np.random.default_rng((c.seed, step, self.rank + self.world * k)) for k in range(len(indices))]
        samples = [self._sample(i, r) for i, r in zip(indices, rngs)]
        pixels = torch.stack([s[0] for s in samples])
        gen = torch.Generator(device=self.device).manual_seed(c.seed * 1000003 + step * 1009 + self.rank)
        want_hq, want_sam = c.outputs in ("hq", "both"), c.outputs in ("sam", "both")
        mask_terms, iou_terms = [], []
        with self._autocast():
            image_inputs = self._image_inputs(self._embed(indices, pixels), want_hq)
            for i, (rng, (_, frame_masks)) in enumerate(zip(rngs, samples)):
                kind = KINDS[int(rng.choice(3, p=np.asarray(c.prompt_mix) / sum(c.prompt_mix)))]
                prompts = sample_prompts(frame_masks, kind, rng, self.mask_size, c.max_points, c.box_noise)
                prompts = {k: v.to(self.device) for k, v in prompts.items()}
                masks, iou = self.model.predict_all(*image_inputs(i), **prompts)[:2]
                masks, iou = masks[0].float(), iou[0].float()  # (P, K, h, w), (P, 4)
                labels = labels_at(frame_masks, self.label_size).to(self.device)
                p = labels.shape[0]
                if want_hq:
                    mask_terms.append(self._mask_loss(masks[:, -1], labels, gen))
                if want_sam:
                    single = self._mask_loss(masks[:, 0], labels, gen)
                    multi = self._mask_loss(masks[:, 1:4].flatten(0, 1), labels.repeat_interleave(3, 0), gen)
                    mask_terms.append(single + multi.view(p, 3).min(1).values)
                    if c.iou_loss_weight:
                        iou_terms.append(iou_prediction_loss(iou, masks[:, :4], labels > 0.5))
        mask_loss = torch.cat(mask_terms).mean()
        iou_loss = torch.stack(iou_terms).mean() if iou_terms else mask_loss.new_zeros(())
        loss = mask_loss + c.iou_loss_weight * iou_loss
        return loss, {"mask_loss": float(mask_loss.detach()), "iou_loss": float(iou_loss.detach())}

    def _mask_loss(self, logits, labels, gen):
        return mask_losses(logits, labels, self.config.point_loss, self.config.num_points, generator=gen)

    def train_step(self) -> dict[str, float]:
        """One optimizer step (all ranks); returns logged values."""
        self.model.train()  # train mode: autograd runs through the plain forms (see samhq.modeling.fast_paths)
        if self.frozen_encoder:  # frozen: eval mode, so batch norms (TinyViT) keep their statistics and no grad is needed
            self.model.vision_encoder.eval()
        self.optimizer.zero_grad(set_to_none=True)
        loss, parts = self.compute_loss(self.step)
        loss.backward()
        if self.world > 1:
            self._all_reduce_grads()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip) if self.config.grad_clip else None
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        out = {"loss": float(loss.detach()), **parts, "lr": self.optimizer.param_groups[0]["lr"]}
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        if self.world > 1:
            t = torch.tensor([out["loss"]], device=self.device)
            dist.all_reduce(t)
            out["loss"] = float(t) / self.world
        return out

    def _all_reduce_grads(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    # ---- checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def state_dict(self) -> dict:
        params = dict(self.model.named_parameters())
        return {
            "step": self.step,
            "model": {n: params[n].detach().clone() for n in self.trainable},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "train_config": self.config.to_dict(),
        }

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step-XXXXXXX.pt (rank 0) and keep the newest `keep_checkpoints`."""
        if self.rank != 0:
            return None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"step-{self.step:07d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        for old in sorted(self.checkpoint_dir.glob("step-*.pt"))[: -self.config.keep_checkpoints]:
            old.unlink()
        return path

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoint_dir.glob("step-*.pt"))
        return found[-1] if found else None

    def load_checkpoint(self, path) -> None:
        """Restore model (trainable part), optimizer, scheduler, RNG and step from a checkpoint."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        missing = set(self.trainable) - set(state["model"])
        if missing:
            raise ValueError(f"{path} does not hold the trainable parameters {sorted(missing)[:3]}...: "
                             "was it written with another recipe or model?")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n in self.trainable:
                params[n].copy_(state["model"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.step = int(state["step"])

    # ---- loop -------------------------------------------------------------------------------
    def train(self, steps: int | None = None, resume: bool = False, save_final: bool = True) -> nn.Module:
        """Run until `steps` (default config.steps) optimizer steps are done; resume from the latest checkpoint."""
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional: train without a progress bar
            tqdm = _NoBar
        total = steps if steps is not None else self.config.steps
        if resume and self.latest_checkpoint() is not None:
            self.load_checkpoint(self.latest_checkpoint())
        log = self.output_dir / "metrics.jsonl"
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=total, initial=self.step, disable=self.rank != 0 or not self.config.progress,
                   desc=f"train ({self.config.recipe})", dynamic_ncols=True)
        t0, step0 = time.time(), self.step
        while self.step < total:
            out = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}")
            if self.rank == 0 and (self.step % self.config.log_every == 0 or self.step == total):
                rate = (self.step - step0) / max(time.time() - t0, 1e-9)
                rec = {"step": self.step, **{k: round(v, 6) for k, v in out.items()}, "steps_per_s": round(rate, 4),
                       "elapsed_s": round(time.time() - t0, 1)}
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
            if self.step % self.config.save_every == 0 or self.step == total:
                self.save_checkpoint()
        bar.close()
        if save_final and self.rank == 0:
            self.model.save_pretrained(self.output_dir / "model")
        if self.world > 1:
            dist.barrier()
        return self.model


class _NoBar:
    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass
