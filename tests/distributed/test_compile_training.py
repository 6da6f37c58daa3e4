"""``pretrain_apt.py --compile`` (torch.compile per MMDiT block, models/compile.py) logs the
same APT losses, D health metrics and gradient norms as the eager run: tiny-apt, fp32, ZeRO-2,
2 ranks (torchrun, gloo) as TP = 2 + SP (megatron's sequence-parallel
all-gathers and reduce-scatters run inside the compiled blocks), 2 updates, RMSprop eps 1e-3
as in the equivalence tests (through the same worker: with 1e-8 RMSprop turns the round-off
sign of near-zero gradients into full steps).

Tolerances (relative): update 1, every metric to 1e-5 (measured ~2e-7: compiled kernels
reorder fp32 reductions); update 2, the metrics of its D phase to 1e-5, the rest to 1e-2. The
approximated R1 is a finite difference ``D(x + sigma eps) - D(x)`` that turns the 1e-7 forward
round-off into a 1e-4 difference of D's gradient (measured: ``grad_norm_d`` 1e-4), and
RMSprop's normalized step carries that into D's weights: the G phase after it differs by
~3e-3 (``d_fake_g``, ``loss_g``).

Cost: a cold inductor cache compiles the G- and D-phase block graphs on 2 cores, ~1.5 min for
DP 2 and ~3 min for TP 2 + SP (measured 2026-11-29); the forward and every gradient of the
compiled model are compared exactly in tests/unit/test_compile.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_apt.testing.launch import run_launcher

# slow (make test-all, not CI): ~4 min of cold inductor compiles; the compiled blocks' forward and
# gradients are compared exactly in tests/unit/test_compile.py
pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "train_equivalence_worker.py"

TIGHT, LOOSE = 1e-5, 1e-2
D_PHASE = ("loss_d", "loss_r1", "d_real", "d_fake", "d_acc_real", "d_acc_fake", "logit_gap")


def _run(save: Path, *flags: str) -> tuple[list[dict], str]:
    """The run's logged updates and its console (stdout + stderr)."""
    args = ["--recipe", "tiny-apt", "--fp32", "--zero-stage", "2", "--train-iters", "2"]
    args += ["--optim-eps", "1e-3", "--save", save, *flags]
    proc = run_launcher(WORKER, args, marker="EQUIVALENCE-WORKER-DONE")
    lines = (save / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r], proc.stdout + proc.stderr


# TP = 2 + SP only: it holds everything the DP = 2 run did (the compiled G and D phases through
# the ZeRO-2 engines, RMSprop, R1) plus megatron's collectives inside the compiled blocks; the DP
# run was dropped from CI for time (2026-12-07: the two took 247 s of a 45-minute CI run), and
# the compiled forward and every gradient on one process are compared exactly in
# tests/unit/test_compile.py. To run the DP = 2 case again: add `"dp2": ()` here.
LAYOUTS = {"tp2-sp": ("--tensor-model-parallel-size", "2", "--sequence-parallel")}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_compiled_training_logs_the_eager_losses(tmp_path, layout):
    eager, _ = _run(tmp_path / "eager", *LAYOUTS[layout])
    compiled, out = _run(tmp_path / "compiled", "--compile", *LAYOUTS[layout])
    assert re.search(r"--compile: \d+ MMDiT blocks compiled", out), out[-2000:]
    assert "torch.compile of the MMDiT blocks failed" not in out  # no eager fallback
    assert len(eager) == len(compiled) == 2
    keys = [k for k in eager[0] if k.startswith(("loss", "d_", "grad_norm", "logit"))]
    assert "loss_g" in keys and "grad_norm_d" in keys
    for step, (e, c) in enumerate(zip(eager, compiled, strict=True), start=1):
        for k in keys:
            tol = TIGHT if step == 1 or k in D_PHASE else LOOSE
            assert abs(c[k] - e[k]) <= tol * max(1.0, abs(e[k])), (step, k, e[k], c[k])
