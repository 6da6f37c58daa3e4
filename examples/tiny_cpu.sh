#!/usr/bin/env bash
# The three stages on a CPU with 2 processes, synthetic latents, 2-layer models (seconds).
# Each stage exports consolidated model files that initialize the next one.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
OUT=${OUT:-runs/tiny}
LAUNCH=${LAUNCH:-"deepspeed --num_gpus 2"}   # or "torchrun --nproc-per-node 2", "mpirun -n 2 python"
$LAUNCH pretrain_apt.py --recipe tiny-diffusion --save "$OUT/diffusion"
$LAUNCH pretrain_apt.py --recipe tiny-consistency --save "$OUT/consistency" \
    --init-generator "$OUT/diffusion/diffusion.safetensors"
$LAUNCH pretrain_apt.py --recipe tiny-apt --save "$OUT/apt" \
    --init-generator "$OUT/consistency/consistency_ema.safetensors" \
    --init-discriminator "$OUT/diffusion/diffusion.safetensors"
echo "generator EMA: $OUT/apt/generator_ema.safetensors"
