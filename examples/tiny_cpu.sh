#!/usr/bin/env bash
# The paper's chain on a CPU with 2 processes, synthetic latents, 2-layer models (seconds):
# diffusion -> consistency distillation -> image APT (single frames) -> video APT (2-frame
# latents), as section 3.5 runs it: the video stage's generator starts from the image stage's
# EMA, its discriminator again from the diffusion weights (new heads). Each stage exports
# consolidated model files that initialize the next one.
# (tests/distributed/test_training_system.py runs these stages and checks each start bitwise.)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
OUT=${OUT:-runs/tiny}
LAUNCH=${LAUNCH:-"deepspeed --num_gpus 2"}   # or "torchrun --nproc-per-node 2", "mpirun -n 2 python"
$LAUNCH pretrain_apt.py --recipe tiny-diffusion --save "$OUT/diffusion"
$LAUNCH pretrain_apt.py --recipe tiny-consistency --save "$OUT/consistency" \
    --init-generator "$OUT/diffusion/diffusion.safetensors"
$LAUNCH pretrain_apt.py --recipe tiny-image-apt --save "$OUT/image-apt" \
    --init-generator "$OUT/consistency/consistency_ema.safetensors" \
    --init-discriminator "$OUT/diffusion/diffusion.safetensors"
$LAUNCH pretrain_apt.py --recipe tiny-apt --save "$OUT/video-apt" \
    --init-generator "$OUT/image-apt/generator_ema.safetensors" \
    --init-discriminator "$OUT/diffusion/diffusion.safetensors"
echo "generator EMA: $OUT/video-apt/generator_ema.safetensors"
