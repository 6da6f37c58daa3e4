#!/usr/bin/env bash
# Stable Diffusion 3.5 Large -> a one-step generator that diffusers users can run:
#   1. import the transformer          tools/convert_checkpoint.py import-diffusers
#   2. preprocess captioned images     tools/preprocess_data.py (SD3's VAE, CLIP-L + CLIP-G + T5)
#   3. consistency distillation        pretrain_apt.py --recipe sd35-large-image-consistency
#   4. adversarial post-training       pretrain_apt.py --recipe sd35-large-image-apt
#   5. export a diffusers pipeline     tools/convert_checkpoint.py export-diffusers-pipeline
# Then:  StableDiffusion3Pipeline.from_pretrained("$OUT/pipeline")(prompt,
#            num_inference_steps=1, guidance_scale=1.0)
#
# Inputs (environment):
#   BASE   a LOCAL SD3.5 Large pipeline directory (e.g. a download of
#          stabilityai/stable-diffusion-3.5-large: model_index.json, transformer/, vae/,
#          text_encoder{,_2,_3}/, tokenizer{,_2,_3}/; safetensors weights; nothing is fetched)
#   MEDIA  captioned 1024px images (a folder of image + same-stem .txt, or a .jsonl manifest)
#   OUT    output folder (default runs/sd35); every step resumes or skips when re-run
#
# Memory (tools/plan_memory.py --recipe sd35-large-image-apt --gpus 256): the 8.1B G and D with
# ZeRO-3 over 256 GPUs take ~1 GiB per GPU for weights, gradients, EMA and RMSprop state; the
# activations of one 1024px image (4096 + 333 tokens) take 65 GiB without recomputation:
# 67 GiB per GPU, fits an 80 GiB H100; TRAIN_ARGS="--recompute-layers all" brings it to ~6 GiB
# at ~1.3x the compute. The consistency stage holds unsharded teacher and target copies
# (30 GiB): ~33 GiB per GPU with recomputation.
#
# Knobs (environment): LAUNCH (trainer launcher; default deepspeed over $HOSTFILE),
# PREPROCESS_LAUNCH (default: torchrun over this node's 8 GPUs), PYTHON, BUCKET (image-1024),
# TEXT_LEN (T5 tokens, 256 as SD3), PREPROCESS_ARGS, TRAIN_ARGS (both stages),
# CONSISTENCY_ARGS, APT_ARGS. tests/distributed/test_sd35_chain.py runs this script on a tiny
# random SD3 pipeline on 2 CPU processes with such overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BASE:?set BASE to a local SD3.5 Large pipeline directory}"
: "${MEDIA:?set MEDIA to a folder of captioned 1024px images}"
OUT=${OUT:-runs/sd35}
PY=${PYTHON:-python}
LAUNCH=${LAUNCH:-"deepspeed --hostfile ${HOSTFILE:-examples/hostfile}"}
PREPROCESS_LAUNCH=${PREPROCESS_LAUNCH:-"torchrun --nproc-per-node 8"}
BUCKET=${BUCKET:-image-1024}
TEXT_LEN=${TEXT_LEN:-256}
mkdir -p "$OUT"

step() { echo; echo "=== sd35_apt.sh: $* ==="; }

step "1/5 import the SD3.5 transformer -> $OUT/sd35.safetensors"
if [ ! -f "$OUT/sd35.safetensors" ]; then
    $PY tools/convert_checkpoint.py import-diffusers --input "$BASE" --output "$OUT/sd35.safetensors"
else
    echo "exists, kept"
fi

step "2/5 preprocess $MEDIA -> $OUT/shards (resumes)"
# shellcheck disable=SC2086
$PREPROCESS_LAUNCH tools/preprocess_data.py --input "$MEDIA" --output "$OUT/shards" \
    --bucket "$BUCKET" --vae "$BASE" --text-encoder "$BASE" --max-text-length "$TEXT_LEN" \
    ${PREPROCESS_ARGS:-}

step "3/5 consistency distillation -> $OUT/consistency (resumes)"
# shellcheck disable=SC2086
$LAUNCH pretrain_apt.py --recipe sd35-large-image-consistency --data-path "$OUT/shards" \
    --init-generator "$OUT/sd35.safetensors" \
    --save "$OUT/consistency" --load "$OUT/consistency" ${TRAIN_ARGS:-} ${CONSISTENCY_ARGS:-}

step "4/5 adversarial post-training -> $OUT/apt (resumes)"
# shellcheck disable=SC2086
$LAUNCH pretrain_apt.py --recipe sd35-large-image-apt --data-path "$OUT/shards" \
    --init-generator "$OUT/consistency/consistency_ema.safetensors" \
    --init-discriminator "$OUT/sd35.safetensors" \
    --save "$OUT/apt" --load "$OUT/apt" ${TRAIN_ARGS:-} ${APT_ARGS:-}

step "5/5 export the EMA generator as a diffusers pipeline -> $OUT/pipeline"
$PY tools/convert_checkpoint.py export-diffusers-pipeline \
    --input "$OUT/apt/generator_ema.safetensors" --base "$BASE" --output "$OUT/pipeline" \
    --overwrite ${EXPORT_ARGS:-}
echo
echo "one-step pipeline: $OUT/pipeline (see its README.md); sample with our tools:"
echo "  $PY tools/generate.py --checkpoint $OUT/apt/generator_ema.safetensors \\"
echo "      --text-encoder $BASE --vae $BASE --height 1024 --width 1024 --prompt '...' --output out/"
