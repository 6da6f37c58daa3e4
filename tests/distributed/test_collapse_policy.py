"""``--on-collapse rollback`` and ``stop`` in real runs (2 gloo processes, ``torchrun``, fp32).

D is made to saturate for real: G barely learns (lr 1e-7) while D trains with Adam at lr 1e-3
and no R1 against G's near-noise samples, so D's loss falls below 0.05 at full accuracy after
about 20 updates of the tiny recipe.

* rollback: the detector fires on every rank at the same log step, the newest checkpoint
  saved before the streak began is reloaded in-process (the step counter goes back to it and
  D's metrics of the next update equal those logged the first time: same D state, same data),
  every learning rate is multiplied by the factor, the abandoned checkpoint is moved aside,
  training finishes; the lr scale survives a ``--load``.
* stop (TP 2 + SP; with a loose threshold, so that it fires within a few updates): both
  tensor-parallel ranks stop at the same step and exit with code 3 (torchrun reports the
  first one and tears the other down) after the message naming the condition and the last
  healthy checkpoint; nothing is saved after the detection.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from megatron_apt.engine.checkpointing import latest_checkpoint
from megatron_apt.testing.launch import REPO_ROOT, launcher_command, launcher_env, run_launcher

PRETRAIN = REPO_ROOT / "pretrain_apt.py"
SATURATE = (
    "--recipe", "tiny-apt", "--fp32", "--zero-stage", "2", "--optimizer", "adam",
    "--lr", "1e-7", "--lr-d", "1e-3", "--r1-lambda", "0",
)  # fmt: skip
D_PHASE = ("loss_d", "loss_r1", "d_real", "d_fake", "d_acc_real", "d_acc_fake", "logit_gap")


def read(save: Path) -> list[dict]:
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def rollback_run(tmp_path_factory):
    save = tmp_path_factory.mktemp("collapse") / "rollback"
    args = [*SATURATE, "--train-iters", "24", "--save-interval", "7", "--save", save]
    args += ["--on-collapse", "rollback", "--rollback-lr-factor", "0.1"]
    proc = run_launcher(PRETRAIN, args, nproc=2, marker="TRAINING-DONE", timeout=300)
    return save, proc


def test_rollback_reloads_the_last_healthy_checkpoint_and_finishes(rollback_run):
    save, proc = rollback_run
    for rank in (0, 1):
        assert f"TRAINING-DONE rank={rank} stage=apt steps=24" in proc.stdout
    records = read(save)
    events = [r for r in records if "event" in r]
    assert events, "D never saturated: no collapse event (see the module docstring)"
    collapse, rollback = events[0], events[1]
    assert collapse["event"] == "collapse" and collapse["condition"] == "saturated"
    assert collapse["action"] == "rollback" and collapse["loss_d"] < 0.05
    a, start = collapse["step"], collapse["streak_start"]
    assert a - start + 1 == 3  # --collapse-patience 3
    b = max(s for s in range(7, a + 1, 7) if s < start)  # newest save step before the streak
    assert rollback["event"] == "rollback" and rollback["step"] == a
    assert rollback["to_step"] == b and rollback["checkpoint"].endswith(f"iter_{b:07d}")
    assert rollback["lr_scale"] == pytest.approx(0.1)
    assert rollback["lr"] == pytest.approx({"generator": 1e-8, "discriminator": 1e-4})
    assert f"ROLLBACK 1/3: step {a}: D saturated" in proc.stdout
    # the step counter went back: after the event the log continues at b + 1
    i = records.index(rollback)
    first, again = records[b], records[i + 1]  # records[k] is step k + 1 before any event
    assert first["step"] == again["step"] == b + 1
    assert {k: again[k] for k in D_PHASE} == {k: first[k] for k in D_PHASE}  # same D, same data
    assert first["lr"] == pytest.approx(1e-7) and again["lr"] == pytest.approx(1e-8)
    # the checkpoint saved inside the streak was moved aside; latest is the final one
    rolled = save / "rolled_back" / "1"
    assert [p.name for p in rolled.iterdir()] == [
        f"iter_{s:07d}" for s in range(7, a + 1, 7) if s >= start
    ]
    assert latest_checkpoint(save) == save / "iter_0000024"
    state = json.loads((save / "iter_0000024" / "trainer_state.json").read_text())
    n = sum(e["event"] == "rollback" for e in events)
    assert state["rollbacks"] == n and state["lr_scale"] == pytest.approx(0.1**n)
    marks = json.loads((save / f"iter_{b:07d}" / "trainer_state.json").read_text())["health"]
    assert marks["healthy"] is True


def test_lr_scale_survives_resume(rollback_run):
    save, _ = rollback_run
    args = [*SATURATE, "--train-iters", "26", "--save-interval", "7", "--save", save]
    args += ["--load", save, "--on-collapse", "rollback", "--rollback-lr-factor", "0.1"]
    proc = run_launcher(PRETRAIN, args, nproc=2, marker="TRAINING-DONE", timeout=300)
    assert f"resumed from {save / 'iter_0000024'} at step 24" in proc.stdout
    state = json.loads((save / "iter_0000024" / "trainer_state.json").read_text())
    scale = state["lr_scale"]
    last = [r for r in read(save) if "event" not in r][-2:]
    assert [r["step"] for r in last] == [25, 26]
    assert all(r["lr"] == pytest.approx(1e-7 * scale) for r in last), last


def test_stop_exits_3_on_every_rank_and_names_the_checkpoint(tmp_path):
    save = tmp_path / "stop"
    args = [*SATURATE, "--train-iters", "10", "--save-interval", "2", "--save", save]
    # TP 2 + SP: both ranks reach the same decision from the one reduce per log step
    args += ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    # a loose threshold: balanced accuracy >= 0.51 with any loss, twice in a row
    args += ["--on-collapse", "stop", "--saturated-acc", "0.51", "--saturated-loss-d", "10"]
    args += ["--collapse-patience", "2"]
    env = launcher_env()  # gloo, no visible GPU: NCCL would get the CPU tensors otherwise
    cmd = launcher_command("torchrun", 2, str(PRETRAIN), [str(a) for a in args])
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "TRAINING-DONE" not in proc.stdout, proc.stdout[-3000:]
    stops = re.findall(r"TRAINING-STOPPED rank=(\d) step=(\d+)", proc.stdout)
    assert sorted(r for r, _ in stops) == ["0", "1"] and len({s for _, s in stops}) == 1
    a = int(stops[0][1])
    # torchrun reports the first rank to exit (code 3) and SIGTERMs the others, which have
    # printed their marker and are on their way out with the same code
    assert re.search(r"exitcode\s*:\s*3 ", proc.stderr), proc.stderr[-3000:]
    events = [r for r in read(save) if "event" in r]
    assert [e["event"] for e in events] == ["collapse", "stop"]
    start = events[0]["streak_start"]
    b = max(s for s in range(2, a + 1, 2) if s < start)
    want = f"the last healthy checkpoint is {save / f'iter_{b:07d}'}"
    assert "stopped: " in proc.stderr and want in proc.stderr, proc.stderr[-3000:]
    assert "D saturated" in proc.stderr and "on_collapse=stop" in proc.stderr
    assert events[1]["last_healthy_checkpoint"] == str(save / f"iter_{b:07d}")
    # nothing saved at or after the detection, no export
    assert latest_checkpoint(save) == save / f"iter_{(a - 1) // 2 * 2:07d}"
    assert not (save / "generator.safetensors").exists()
    assert max(int(r["step"]) for r in read(save)) == a
