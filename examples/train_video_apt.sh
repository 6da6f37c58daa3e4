#!/usr/bin/env bash
# Paper section 3.5, video stage: 1280x720, 24 fps, 2 s (49 frames), 1024 H100s (128 nodes x 8).
# G from the image stage's EMA; D re-initialized from the diffusion weights; lr 3e-6, 300 G
# updates, sigma 0.1, s 12, batch 2048 by gradient accumulation (TP 4 + sequence parallel:
# DP 256 x micro 1 x accumulation 8), BF16, ZeRO-3.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA (latent shards of the video-720p bucket)}" "${DIFFUSION:?set DIFFUSION}"
IMAGE_EMA=${IMAGE_EMA:-/checkpoints/apt-image/generator_ema.safetensors}
SAVE=${SAVE:-/checkpoints/apt-video}
deepspeed --hostfile "${HOSTFILE:-examples/hostfile}" pretrain_apt.py \
    --recipe mmdit-8b-video-apt \
    --data-path "$DATA" \
    --init-generator "$IMAGE_EMA" \
    --init-discriminator "$DIFFUSION" \
    --save "$SAVE" --load "$SAVE" --save-interval 25 --log-interval 1 \
    "$@"
