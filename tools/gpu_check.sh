#!/usr/bin/env bash
# The GPU check (docs/performance.md): one prepared run of what a CUDA machine can show, with a
# JSON + Markdown report, logs.tgz and the benchmarks' JSON in OUT (<= 8 files, rewritten after
# every step); runs and plain logs in --work (default OUT/work). See tools/gpu_check.py.
#
#   tools/gpu_check.sh OUT              # one CUDA GPU; <= 9 minutes (--budget-s 540)
#   tools/gpu_check.sh --dry-run OUT    # the same steps on CPU (gloo, fp32, small presets)
#   tools/gpu_check.sh OUT --work DIR   # the bulky part elsewhere (tools/gpu_lease.sh run)
#
# Set PYTHON to the interpreter that has torch (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" tools/gpu_check.py "$@"
