"""Preemption leaves a complete checkpoint (issue 16, item 1): 2-rank torchrun runs of tiny-apt.

* SIGTERM to the whole job (launcher and both ranks, as SLURM preemption sends it) mid-run:
  the ranks agree at the next update, save a complete checkpoint at or past the step reached,
  say so, and end within seconds; before, the job died within a second with no checkpoint.
* ``--exit-duration-in-mins``: the run stops itself the same way, exit code 0; resuming from
  its checkpoint finishes the run.
* a run whose every update is skipped for non-finite losses stops with exit code 4 after
  ``--max-consecutive-skips`` and exports nothing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from megatron_apt.testing.launch import REPO_ROOT, launcher_command, launcher_env, run_launcher

TRAIN = REPO_ROOT / "pretrain_apt.py"
MANY = 100_000  # updates: the runs below end by being told to


def _complete(save: Path) -> int:
    """The step of the checkpoint ``latest`` names; it must be complete."""
    step = int((save / "latest_checkpointed_iteration.txt").read_text())
    d = save / f"iter_{step:07d}"
    assert (d / "COMPLETE").is_file() and (d / "trainer_state.json").is_file(), d
    return step


def test_sigterm_saves_a_complete_checkpoint(tmp_path):
    save = tmp_path / "run"
    args = ["--recipe", "tiny-apt", "--train-iters", MANY, "--save", save]
    cmd = launcher_command("torchrun", 2, str(TRAIN), [str(a) for a in args])
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=launcher_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    seen, reached = [], 0
    try:
        for line in proc.stdout:
            seen.append(line)
            m = re.search(r"step (\d+)/", line)
            if m and int(m.group(1)) >= 3:
                reached = int(m.group(1))
                break
        assert reached, "".join(seen[-40:])
        os.killpg(proc.pid, signal.SIGTERM)  # launcher and ranks, like SLURM
        t0 = time.monotonic()
        rest, _ = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(seen) + rest
    assert "SIGTERM received: stopping after update" in out, out[-3000:]
    assert out.count("TRAINING-STOPPED") == 2, out[-3000:]
    step = _complete(save)
    assert reached <= step < MANY, (reached, step)
    assert took < 60, took


def test_exit_duration_saves_and_resumes(tmp_path):
    save = tmp_path / "run"
    args = ["--recipe", "tiny-apt", "--train-iters", MANY, "--save", save,
            "--exit-duration-in-mins", "0.02"]  # fmt: skip
    proc = run_launcher(TRAIN, args, nproc=2, marker="TRAINING-STOPPED")
    assert proc.returncode == 0
    assert "--exit-duration-in-mins 0.02 reached: stopping after update" in proc.stdout
    step = _complete(save)
    assert 1 <= step < MANY
    more = ["--recipe", "tiny-apt", "--train-iters", step + 1, "--save", save, "--load", save]
    proc = run_launcher(TRAIN, more, nproc=2, marker="TRAINING-DONE")
    assert f"resumed from {save / f'iter_{step:07d}'} at step {step}" in proc.stdout
    assert _complete(save) == step + 1


def test_a_run_that_only_skips_stops_and_exports_nothing(tmp_path):
    """--lr 1e30: the first step blows the weights up, every later loss is non-finite and
    skipped (issue 16, item 11); before, the run went on to the end, exited 0 and exported."""
    save = tmp_path / "run"
    args = ["--recipe", "tiny-apt", "--train-iters", 50, "--save", save, "--lr", "1e30",
            "--max-consecutive-skips", 3]  # fmt: skip
    cmd = launcher_command("torchrun", 2, str(TRAIN), [str(a) for a in args])
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=launcher_env(), capture_output=True, text=True, timeout=420
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert re.search(r"exitcode\s*:\s*4 ", proc.stderr), proc.stderr[-3000:]  # the ranks' code
    assert "3 consecutive updates had non-finite losses and were skipped" in proc.stderr
    assert proc.stdout.count("TRAINING-STOPPED") == 2
    assert not list(save.glob("*.safetensors")), "a broken run exported model files"
