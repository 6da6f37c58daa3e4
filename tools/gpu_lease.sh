#!/usr/bin/env bash
# The GPU check on a leased CUDA machine that cannot reach a package index (docs/performance.md,
# "The GPU check"), in two halves:
#
#   tools/gpu_lease.sh wheels [DIR]        # here, with a package index: the packages the GPU
#                                          # image lacks, as wheels for its CPython 3.12, in DIR
#                                          # (default .whl, ignored by git; carry it)
#   tools/gpu_lease.sh run [DIR] [ARGS...] # there, as the one device command: install DIR's
#                                          # wheels into $GPU_LEASE_SITE (default /tmp/site),
#                                          # run tools/gpu_check.sh ARGS with its report in
#                                          # $OUT itself, rewritten after every step (7 files:
#                                          # the device returns at most 8), and the bulky
#                                          # runs and plain logs in $GPU_CHECK_DIR (default
#                                          # /tmp/gpu_check): a command killed at its time
#                                          # limit still returns the steps it finished
#
# The image (device README, KINDS.md) has torch, transformers, safetensors, sentencepiece,
# mpi4py, ninja, py-cpuinfo, msgpack, einops, psutil; it lacks deepspeed, megatron-core,
# diffusers and deepspeed's hjson / pydantic. Versions: setup.py's pins, and pydantic's of this
# project's environment.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    "megatron-core==0.16.1"     # setup.py
    "diffusers==0.42.1"         # setup.py; the bench-compile / bench-wan twins
    "hjson==3.1.0"              # deepspeed's requirements from here on
    "pydantic==2.14.4"
    "pydantic-core==2.50.5"     # the exact version pydantic 2.14.4 requires
    "annotated-types==0.8.0"
    "typing-inspection==0.4.5"
    "typing-extensions==4.16.0"
)
DEEPSPEED="deepspeed==0.19.8"   # an sdist: built here as a pure-Python wheel (ops JIT-compiled)

usage() { sed -n '2,/^# The image/{/^# The image/!p}' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift

case "$cmd" in
wheels)
    dir="${1:-.whl}"
    py="${PYTHON:-}"
    if [[ -z "$py" ]]; then
        if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
    fi
    mkdir -p "$dir"
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$dir" "${WHEELS[@]}"
    "$py" -m pip wheel --quiet --no-deps -w "$dir" "$DEEPSPEED"
    n=$(find "$dir" -maxdepth 1 -name '*.whl' | wc -l)
    if [[ "$n" -ne $(( ${#WHEELS[@]} + 1 )) ]]; then
        echo "gpu_lease: $dir holds $n wheels, expected $(( ${#WHEELS[@]} + 1 )): keep one" \
             "version of each (two stop the install there)" >&2
        ls "$dir" >&2
        exit 1
    fi
    echo "gpu_lease: $n wheels in $dir ($(du -sh "$dir" | cut -f1)); carry \"$dir\" with the run"
    ;;
run)
    dir=.whl
    if [[ $# -gt 0 && "$1" != -* ]]; then dir="$1"; shift; fi
    out="${OUT:?gpu_lease run: OUT is not set (the device machine sets it; elsewhere set it)}"
    work="${GPU_CHECK_DIR:-/tmp/gpu_check}"
    site="${GPU_LEASE_SITE:-/tmp/site}"
    if compgen -G "$dir/*.whl" > /dev/null; then
        "${PYTHON:-python3}" -m pip install --quiet --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target "$site" "$dir"/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        export PATH="$site/bin:$PATH"  # the deepspeed launcher script
    else
        echo "gpu_lease: no wheels in $dir: running with the machine's own packages" >&2
    fi
    # in the background, so that a SIGTERM to this shell (the device command's time limit)
    # reaches the check, which then stops its running step and writes its report
    PYTHON="${PYTHON:-python3}" tools/gpu_check.sh "$out" --work "$work" "$@" &
    check=$!
    trap 'kill -TERM "$check" 2> /dev/null' TERM INT HUP
    rc=0
    wait "$check" || rc=$?
    if kill -0 "$check" 2> /dev/null; then  # the trap interrupted the wait: let it finish
        rc=0
        wait "$check" || rc=$?
    fi
    n=$(find "$out" -type f | wc -l)
    echo "gpu_lease: report in $out ($n files: $(ls "$out" | tr '\n' ' ')), gpu_check exit $rc"
    if [[ "$n" -gt 8 ]]; then
        echo "gpu_lease: $out holds $n files; the device returns at most 8" >&2
    fi
    exit "$rc"
    ;;
*)
    usage
    ;;
esac
