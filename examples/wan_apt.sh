#!/usr/bin/env bash
# Wan2.1 T2V (1.3B or 14B) -> a one-step video generator that diffusers users can run: the
# paper's whole chain (section 3.5: consistency distillation, APT on images, then on videos):
#   1. import the transformer          tools/convert_checkpoint.py import-diffusers
#   2. preprocess captioned videos     tools/preprocess_data.py (Wan's VAE, umT5 512 tokens)
#      and single frames               (IMAGES, or the first frame of each clip: --first-frame)
#   3. consistency distillation        pretrain_apt.py --recipe wan2.1-t2v-$SIZE-consistency
#   4. image APT                       pretrain_apt.py --recipe wan2.1-t2v-$SIZE-image-apt
#      G from the consistency EMA, D's backbone from the imported (diffusion) weights
#   5. video APT                       pretrain_apt.py --recipe wan2.1-t2v-$SIZE-video-apt
#      G from the image stage's EMA, D restarted from the diffusion weights (as the paper)
#   6. export a diffusers pipeline     tools/convert_checkpoint.py export-diffusers-pipeline
# Then:  WanPipeline.from_pretrained("$OUT/pipeline")(prompt, num_inference_steps=1,
#            guidance_scale=1.0)   (num_inference_steps=2: the zero-shot two steps at t_mid 0.5)
#
# Inputs (environment):
#   BASE    a LOCAL Wan2.1 T2V Diffusers pipeline directory (e.g. a download of
#           Wan-AI/Wan2.1-T2V-1.3B-Diffusers or -14B-Diffusers: model_index.json, transformer/,
#           vae/, text_encoder/, tokenizer/, scheduler/; safetensors weights; nothing is fetched)
#   MEDIA   captioned videos (a folder of clips + same-stem .txt, or a .jsonl manifest); the
#           video bucket takes the first 81 frames at 16 fps (5 s), shorter clips are skipped
#           and listed in $OUT/video-shards/report.json
#   IMAGES  optional: captioned images for the image stage; without it the image stage trains
#           on the first frame of each clip in MEDIA
#   SIZE    1.3b (default: 832x480, TP 1) or 14b (1280x720, TP 4 + SP, CP 2): the recipes
#   OUT     output folder (default runs/wan-$SIZE); every step resumes or skips when re-run
#
# Memory (tools/plan_memory.py --recipe wan2.1-t2v-$SIZE-{image,video}-apt --gpus N; docs/wan.md,
# "Memory plan"; per 80 GiB H100, G and D with ZeRO-3, fp32 EMA, RMSprop and masters, bf16):
#   14B video (720p x 81 frames, 75,600 tokens): TP 8 + SP, every block recomputed: 30.5 GiB
#     per GPU on 256 GPUs (36.9 on 64); without recompute 486 GiB. ~2640 s per update of
#     2048 clips on 256 GPUs at 40 % MFU (the paper's 300 updates: ~9 days).
#   14B images (720p): TP 1, recompute all: 12.9 GiB on 256 GPUs.
#   1.3B video (480p x 81 frames, 32,760 tokens): TP 1, recompute all: 25.7 GiB on 64 GPUs.
#   1.3B images: TP 1, no recompute: 21.8 GiB on 64 GPUs.
# Not counted: CUDA context, NCCL buffers, fragmentation (keep 10-15 % free), umT5 and the VAE.
#
# Knobs (environment): LAUNCH (trainer launcher; default deepspeed over $HOSTFILE),
# PREPROCESS_LAUNCH (default: torchrun over this node's 8 GPUs), PREPROCESS_DEVICE (cuda),
# PYTHON, VIDEO_BUCKET (832x480x81@16 for 1.3b, 1280x720x81@16 for 14b), IMAGE_BUCKET
# (832x480 / 1280x720), TEXT_LEN (umT5 tokens, 512 as WanPipeline), NEGATIVE_PROMPT (the
# consistency teacher's; unset: the repository's fixed one; WanPipeline's default is ""),
# PREPROCESS_ARGS, TRAIN_ARGS (all three stages), CONSISTENCY_ARGS, IMAGE_ARGS, VIDEO_ARGS,
# EXPORT_ARGS. The image recipe's global batch (9062 rounded up to 9088 = 142 x 64) must divide
# by micro x DP: on other layouts pass IMAGE_ARGS="--global-batch-size N". A finished training
# stage is skipped when its folder's chain-done.txt holds the same pretrain_apt.py arguments
# (other arguments: the stage resumes from its last checkpoint; delete the file to re-enter).
# tests/distributed/test_wan_chain.py runs this script on a tiny random Wan pipeline on 2 CPU
# processes with such overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BASE:?set BASE to a local Wan2.1 T2V Diffusers pipeline directory}"
: "${MEDIA:?set MEDIA to a folder of captioned videos}"
SIZE=${SIZE:-1.3b}
case "$SIZE" in
    1.3b) RES=832x480 ;;
    14b) RES=1280x720 ;;
    *) echo "SIZE must be 1.3b or 14b, got $SIZE" >&2; exit 2 ;;
esac
RECIPE=wan2.1-t2v-$SIZE
OUT=${OUT:-runs/wan-$SIZE}
PY=${PYTHON:-python}
LAUNCH=${LAUNCH:-"deepspeed --hostfile ${HOSTFILE:-examples/hostfile}"}
PREPROCESS_LAUNCH=${PREPROCESS_LAUNCH:-"torchrun --nproc-per-node 8"}
VIDEO_BUCKET=${VIDEO_BUCKET:-${RES}x81@16}
IMAGE_BUCKET=${IMAGE_BUCKET:-$RES}
TEXT_LEN=${TEXT_LEN:-512}
NEGATIVE=()
if [ -n "${NEGATIVE_PROMPT+set}" ]; then NEGATIVE=(--negative-prompt "$NEGATIVE_PROMPT"); fi
mkdir -p "$OUT"

step() { echo; echo "=== wan_apt.sh: $* ==="; }

# train DIR FILE pretrain_apt.py ARGS...: skipped when DIR/FILE exists and DIR/chain-done.txt
# holds the same arguments (a finished stage); otherwise launched with --save DIR --load DIR,
# which resumes from DIR's last checkpoint. The stage is finished when the run wrote FILE (its
# end-of-run export): a run stopped early exits 0 too (preemption, --exit-duration-in-mins;
# a checkpoint is saved, nothing exported), and the chain must not go on from older files.
train() {
    local dir=$1 file=$2
    shift 2
    local args="$* --save $dir --load $dir"
    if [ -f "$dir/$file" ] && [ "$(cat "$dir/chain-done.txt" 2>/dev/null)" = "$args" ]; then
        echo "done, skipped ($dir/chain-done.txt holds these arguments; delete it to re-enter)"
        return
    fi
    mkdir -p "$dir"
    rm -f "$dir/chain-done.txt"
    touch "$dir/.chain-started"
    # shellcheck disable=SC2086
    $LAUNCH "$@" --save "$dir" --load "$dir"
    if [ ! "$dir/$file" -nt "$dir/.chain-started" ]; then
        echo "wan_apt.sh: $dir: the run stopped before its end (no new $file); run this" \
            "script again to resume it" >&2
        exit 3
    fi
    echo "$args" >"$dir/chain-done.txt"
}

# preprocess INPUT OUTPUT BUCKET ARGS...: resumes (finished shards are kept)
preprocess() {
    local input=$1 output=$2 bucket=$3
    shift 3
    # shellcheck disable=SC2086
    $PREPROCESS_LAUNCH tools/preprocess_data.py --input "$input" --output "$output" \
        --bucket "$bucket" --vae "$BASE" --text-encoder "$BASE" --max-text-length "$TEXT_LEN" \
        --device "${PREPROCESS_DEVICE:-cuda}" ${NEGATIVE[@]+"${NEGATIVE[@]}"} "$@" \
        ${PREPROCESS_ARGS:-}
}

step "1/6 import the Wan2.1 transformer -> $OUT/wan.safetensors"
if [ ! -f "$OUT/wan.safetensors" ]; then
    $PY tools/convert_checkpoint.py import-diffusers --input "$BASE" --output "$OUT/wan.safetensors"
else
    echo "exists, kept"
fi

step "2/6 preprocess $MEDIA -> $OUT/video-shards ($VIDEO_BUCKET), stills -> $OUT/image-shards"
preprocess "$MEDIA" "$OUT/video-shards" "$VIDEO_BUCKET"
if [ -n "${IMAGES:-}" ]; then
    preprocess "$IMAGES" "$OUT/image-shards" "$IMAGE_BUCKET"
else  # the first frame of each clip, as an image
    preprocess "$MEDIA" "$OUT/image-shards" "$IMAGE_BUCKET" --first-frame
fi

step "3/6 consistency distillation (videos) -> $OUT/consistency"
# shellcheck disable=SC2086
train "$OUT/consistency" consistency_ema.safetensors \
    pretrain_apt.py --recipe "$RECIPE-consistency" --data-path "$OUT/video-shards" \
    --init-generator "$OUT/wan.safetensors" ${TRAIN_ARGS:-} ${CONSISTENCY_ARGS:-}

step "4/6 image APT (single frames) -> $OUT/image-apt"
# shellcheck disable=SC2086
train "$OUT/image-apt" generator_ema.safetensors \
    pretrain_apt.py --recipe "$RECIPE-image-apt" --data-path "$OUT/image-shards" \
    --init-generator "$OUT/consistency/consistency_ema.safetensors" \
    --init-discriminator "$OUT/wan.safetensors" ${TRAIN_ARGS:-} ${IMAGE_ARGS:-}

step "5/6 video APT (G from the image EMA, D from the diffusion weights) -> $OUT/video-apt"
# shellcheck disable=SC2086
train "$OUT/video-apt" generator_ema.safetensors \
    pretrain_apt.py --recipe "$RECIPE-video-apt" --data-path "$OUT/video-shards" \
    --init-generator "$OUT/image-apt/generator_ema.safetensors" \
    --init-discriminator "$OUT/wan.safetensors" ${TRAIN_ARGS:-} ${VIDEO_ARGS:-}

step "6/6 export the video stage's EMA generator as a WanPipeline -> $OUT/pipeline"
GENERATOR="$OUT/video-apt/generator_ema.safetensors"
if [ ! "$OUT/pipeline/model_index.json" -nt "$GENERATOR" ]; then
    # shellcheck disable=SC2086
    $PY tools/convert_checkpoint.py export-diffusers-pipeline \
        --input "$GENERATOR" --base "$BASE" --output "$OUT/pipeline" --overwrite ${EXPORT_ARGS:-}
else
    echo "exists (newer than $GENERATOR), kept"
fi
echo
echo "one-step pipeline: $OUT/pipeline (see its README.md); sample with our tools:"
echo "  $PY tools/generate.py --checkpoint $GENERATOR --text-encoder $BASE --vae $BASE \\"
echo "      --frames 81 --height ${RES#*x} --width ${RES%x*} --prompt '...' --output out/"
