#!/usr/bin/env bash
# Paper section 3.5, image stage: 1024px images, 256 H100s (32 nodes x 8), BF16, ZeRO-3.
# lr 5e-6 for G and D, RMSprop(alpha 0.9), EMA 0.995, 350 generator updates, sigma 0.01, s 1.
# The paper's batch of 9062 does not split over 256 GPUs; the recipe rounds it up to 9216
# (36 x 256, micro batch 1 x accumulation 36): see config/training.py paper_image_global_batch.
#
# Inputs: DATA  latent shards of 1024px images (tools/preprocess_data.py --bucket image-1024)
#         DIFFUSION  the diffusion model (model file; tools/convert_checkpoint.py import-diffusers
#                    turns SD3/SD3.5 weights into one)
#         DISTILLED  the consistency-distilled model (pretrain_apt.py --stage consistency)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA}" "${DIFFUSION:?set DIFFUSION}" "${DISTILLED:?set DISTILLED}"
SAVE=${SAVE:-/checkpoints/apt-image}
deepspeed --hostfile "${HOSTFILE:-examples/hostfile}" pretrain_apt.py \
    --recipe mmdit-8b-image-apt \
    --data-path "$DATA" \
    --init-generator "$DISTILLED" \
    --init-discriminator "$DIFFUSION" \
    --save "$SAVE" --load "$SAVE" --save-interval 25 --log-interval 1 \
    "$@"
# The EMA generator for the video stage: $SAVE/generator_ema.safetensors
