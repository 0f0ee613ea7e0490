#!/usr/bin/env bash
# Reproduces the bundled demo model samhq/weights/samhq-tiny-shapes on a 2-core CPU, two processes
# (torchrun, gloo) of one thread each.
#
# The paper's recipe in miniature:
#   stage 1: a small SAM-HQ (ViT 192 wide, 6 layers, 256x256 input, 64x64 low-res masks) trained
#            from scratch, all weights, on SA-1B-like *coarse* masks (fine masks passed through
#            samhq.data.coarsen), loss on the SAM tokens (+ IoU head) only;
#   stage 2: that model frozen, only the HQ parts (HQ token, its MLP, fusion convolutions) trained
#            on the *fine* masks, image embeddings computed once per image.
#
# Data: SyntheticShapes drawn at 64x64 (upsampled to the model's 256 input, so one low-res mask
# cell is one image pixel). Training seeds 0 (stage 1) and 1 (stage 2). The held-out set is
# SyntheticShapes(num_images=250, image_size=64, seed=1000): never trained on.
#
# Usage: bash examples/train_demo.sh   (RUN=folder to choose the run folder; rerun to resume)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/samhq-tiny-shapes}
STEPS1=${STEPS1:-10000}
STEPS2=${STEPS2:-5000}
TRAIN="$PY -m torch.distributed.run --standalone --nproc_per_node 2 -m samhq.cli train --threads 1"
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

# Stage 1: SAM tokens on coarse masks, whole model from scratch. Coarsening is scaled to the 64-px
# images (radius 1, no simplification): coarsen's defaults (radius 2, factor 4) turn a 64-px object
# into little more than its box (IoU 0.39 with the fine mask, filling the box scores 0.38), and a
# stage 1 trained on them learns box-shaped blobs.
$TRAIN --model-config "$RUN/model_config.json" --data synthetic:200000:64:0 \
  --recipe full --outputs sam --targets coarse --coarse-radius 1 --coarse-factor 1 --steps "$STEPS1" --batch-size 8 --masks-per-image 3 \
  --lr 3e-4 --warmup-steps 100 --save-every 100 --log-every 20 --seed 0 \
  --output "$RUN/stage1" --resume

# Stage 2: freeze it; train only the HQ parts on the fine masks.
$TRAIN --model "$RUN/stage1/model" --data synthetic:10000:64:1 \
  --recipe hq --targets fine --steps "$STEPS2" --batch-size 8 --masks-per-image 4 \
  --lr 1e-3 --warmup-steps 50 --save-every 250 --log-every 50 --seed 1 \
  --output "$RUN/stage2" --resume

mkdir -p samhq/weights/samhq-tiny-shapes
cp "$RUN/stage2/model/config.json" "$RUN/stage2/model/model.safetensors" samhq/weights/samhq-tiny-shapes/
chmod 644 samhq/weights/samhq-tiny-shapes/*
echo "demo model written to samhq/weights/samhq-tiny-shapes"
