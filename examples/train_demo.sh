#!/usr/bin/env bash
# Reproduces the bundled demo model samhq/weights/samhq-tiny-shapes on a CPU: 65 minutes of training
# on a (shared) 2-core machine with 1 thread: stage 1 21 min, 1b 8.5 min, 1c 28 min, stage 2 8 min.
#
# The paper's recipe in miniature:
#   stage 1: a small SAM-HQ (ViT 192 wide, 6 layers, 256x256 input, 64x64 low-res masks) trained
#            from scratch, all weights, on SA-1B-like *coarse* masks (fine masks passed through
#            samhq.data.coarsen), loss on the SAM tokens (+ IoU head) only; 1200 + 500 + 1500 steps of
#            8 images (stages 1b and 1c continue stage 1 on new images with a lower learning rate);
#   stage 2: that model frozen, only the HQ parts (HQ token, its MLP, fusion convolutions) trained
#            on the *fine* masks, image embeddings computed once per image.
#
# Data: SyntheticShapes drawn at 128x128 (upsampled to the model's 256 input, so a low-res mask
# cell is 2 image pixels). Training seeds 0 (stage 1), 3 (1b), 4 (1c) and 1 (stage 2). The held-out set
# is SyntheticShapes(num_images=250, image_size=128, seed=1000): never trained on.
#
# Usage: bash examples/train_demo.sh   (RUN=folder to choose the run folder; rerun to resume)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/samhq-tiny-shapes}
# 1 thread: on a busy 2-core machine, 2 threads were ~10x slower than 1.
THREADS=${THREADS:-1}
mkdir -p "$RUN"

cat > "$RUN/model_config.json" <<'JSON'
{
  "model_type": "sam_hq",
  "vision_config": {"model_type": "sam_hq_vision_model", "hidden_size": 192, "num_hidden_layers": 6,
                    "num_attention_heads": 3, "image_size": 256, "patch_size": 16, "window_size": 8,
                    "global_attn_indexes": [2, 5], "output_channels": 128, "num_pos_feats": 64},
  "prompt_encoder_config": {"hidden_size": 128, "image_size": 256, "patch_size": 16},
  "mask_decoder_config": {"hidden_size": 128, "mlp_dim": 512, "num_attention_heads": 4,
                          "iou_head_hidden_dim": 128, "vit_dim": 192}
}
JSON

# Stage 1: SAM tokens on coarse masks, whole model from scratch.
$PY -m samhq.cli train --model-config "$RUN/model_config.json" --data synthetic:200000:128:0 \
  --recipe full --outputs sam --targets coarse --steps 1200 --batch-size 8 --masks-per-image 3 \
  --lr 1e-3 --warmup-steps 50 --save-every 50 --log-every 10 --seed 0 --threads "$THREADS" \
  --output "$RUN/stage1" --resume

# Stage 1b: the same, continued from stage 1 with a fresh, lower warm-up + cosine schedule.
$PY -m samhq.cli train --model "$RUN/stage1/model" --data synthetic:200000:128:3 \
  --recipe full --outputs sam --targets coarse --steps 500 --batch-size 8 --masks-per-image 3 \
  --lr 5e-4 --warmup-steps 20 --save-every 50 --log-every 10 --seed 3 --threads "$THREADS" \
  --output "$RUN/stage1b" --resume

# Stage 1c: continued again on fresh images (stage 1 was still improving when its schedule ended).
$PY -m samhq.cli train --model "$RUN/stage1b/model" --data synthetic:200000:128:4 \
  --recipe full --outputs sam --targets coarse --steps 1500 --batch-size 8 --masks-per-image 3 \
  --lr 5e-4 --warmup-steps 20 --save-every 100 --log-every 10 --seed 4 --threads "$THREADS" \
  --output "$RUN/stage1c" --resume

# Stage 2: freeze it; train only the HQ parts on the fine masks.
$PY -m samhq.cli train --model "$RUN/stage1c/model" --data synthetic:3000:128:1 \
  --recipe hq --targets fine --steps 900 --batch-size 8 --masks-per-image 4 \
  --lr 1e-3 --warmup-steps 30 --save-every 100 --log-every 10 --seed 1 --threads "$THREADS" \
  --output "$RUN/stage2c" --resume

mkdir -p samhq/weights/samhq-tiny-shapes
cp "$RUN/stage2c/model/config.json" "$RUN/stage2c/model/model.safetensors" samhq/weights/samhq-tiny-shapes/
chmod 644 samhq/weights/samhq-tiny-shapes/*
echo "demo model written to samhq/weights/samhq-tiny-shapes"
