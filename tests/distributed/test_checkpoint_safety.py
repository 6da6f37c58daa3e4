"""A good checkpoint is never overwritten by a run that did not come from it (issue 16, item 3);
2-rank torchrun runs of tiny-apt.

* ``--load`` of a directory whose ``latest`` file is missing takes the newest complete
  checkpoint, loudly (before: a silent start from step 0 that then replaced ``iter_0000002``);
* ``--load`` of a path with no checkpoint (elsewhere than ``--save``) is an error naming it
  (before: a silent fresh start); ``--load`` = ``--save`` on an empty directory, the idiom of
  requeued jobs, still starts afresh;
* ``--save`` holding complete checkpoints newer than the run's start step is refused before
  training, and nothing in it changes.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_apt.testing.launch import REPO_ROOT, launcher_command, launcher_env, run_launcher

TRAIN = REPO_ROOT / "pretrain_apt.py"


def train(*args, marker="TRAINING-DONE"):
    return run_launcher(TRAIN, ["--recipe", "tiny-apt", *args], nproc=2, marker=marker)


def train_fails(*args) -> subprocess.CompletedProcess:
    cmd = launcher_command(
        "torchrun", 2, str(TRAIN), [str(a) for a in ["--recipe", "tiny-apt", *args]]
    )
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=launcher_env(), capture_output=True, text=True, timeout=420
    )
    assert proc.returncode != 0, proc.stdout[-3000:]
    return proc


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "tensorboard" not in p.parts and p.name != "metrics.jsonl"
    }


# a garbage `latest` is slow (make test-all, not CI): the same fallback as a missing one
@pytest.mark.parametrize("latest", ["missing", pytest.param("garbage", marks=pytest.mark.slow)])
def test_missing_latest_resumes_from_the_newest_complete(tmp_path, latest):
    save = tmp_path / "run"
    train("--train-iters", 2, "--save", save, "--save-interval", 1)
    marker = save / "latest_checkpointed_iteration.txt"
    marker.unlink() if latest == "missing" else marker.write_text("\x00garbage")
    kept = digest(save / "iter_0000002")
    proc = train("--train-iters", 3, "--save", save, "--load", save)
    why = "is missing" if latest == "missing" else "not an iteration number"
    assert f"{why}; taking the newest complete checkpoint" in proc.stdout, proc.stdout[-2000:]
    assert f"resumed from {save / 'iter_0000002'} at step 2" in proc.stdout
    assert digest(save / "iter_0000002") == kept
    assert (save / "iter_0000003" / "COMPLETE").is_file()


# slow (make test-all, not CI): a 2-process launch for an argument check
@pytest.mark.slow
def test_load_of_an_empty_path_is_an_error_unless_it_is_save(tmp_path):
    proc = train_fails("--train-iters", 1, "--save", tmp_path / "new", "--load", tmp_path / "typo")
    assert f"--load {tmp_path / 'typo'}: no checkpoint there" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "new" / "iter_0000001").exists()
    fresh = tmp_path / "requeued"  # --load = --save: a job's first start
    proc = train("--train-iters", 1, "--save", fresh, "--load", fresh)
    assert f"no checkpoint in {fresh}: starting from step 0" in proc.stdout


def test_save_with_newer_checkpoints_is_refused(tmp_path):
    other = tmp_path / "other"
    train("--train-iters", 2, "--save", other)
    before = digest(other)
    proc = train_fails("--train-iters", 4, "--save", other)  # no --load: would start at 0
    assert f"--save {other} holds a complete checkpoint at step 2" in proc.stderr, proc.stderr[
        -2000:
    ]
    assert "but this run starts at step 0" in proc.stderr
    assert digest(other) == before


def test_unusable_save_is_refused_before_training(tmp_path):
    """Issue 16, item 2: before, an unwritable --save failed at the first save, after the
    training (with save-at-end, after the whole run)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = train_fails("--train-iters", 2, "--save", blocker / "run")
    assert f"error: --save {blocker / 'run'}: cannot write there" in proc.stderr, proc.stderr[
        -2000:
    ]
    assert "step 1/" not in proc.stdout


def test_a_rank_local_load_error_stops_every_rank(tmp_path):
    """Issue 16, items 12 and 8: rank 1's EMA file is truncated; rank 1 names it, and rank 0 does
    not go on into training (where it would wait in a collective until the timeout) but says
    that rank 1 could not start."""
    save = tmp_path / "run"
    train("--train-iters", 2, "--save", save)
    f = save / "iter_0000002" / "ema" / "generator" / "rank00001.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    proc = train_fails("--train-iters", 3, "--save", save, "--load", save,
                       "--distributed-timeout-minutes", 2)  # fmt: skip
    assert f"{f} is not a readable safetensors file" in proc.stderr, proc.stderr[-3000:]
    assert "rank 1 could not start (its error is in its output); no rank trains" in proc.stderr
    assert "step 3/" not in proc.stdout


# slow (make test-all, not CI): another layout's refusal stays in CI
# (test_training_system::test_load_with_another_parallel_layout_is_refused)
@pytest.mark.slow
def test_resume_with_another_zero_stage_is_refused(tmp_path):
    """Issue 16, item 7: a ZeRO-2 checkpoint resumed at ZeRO-3 died with a bare AssertionError."""
    save = tmp_path / "run"
    train("--train-iters", 2, "--save", save, "--zero-stage", 2)
    before = digest(save)
    proc = train_fails("--train-iters", 3, "--save", save, "--load", save, "--zero-stage", 3)
    ckpt = save / "iter_0000002"
    want = f"checkpoint {ckpt} was written with zero_stage=2, this run has zero_stage=3"
    assert want in proc.stderr, proc.stderr[-3000:]
    assert digest(save) == before


def test_an_incomplete_engine_checkpoint_is_named(tmp_path):
    """Issue 16, item 8: a missing generator/state/ gave DeepSpeed's bare AssertionError."""
    save = tmp_path / "run"
    train("--train-iters", 2, "--save", save)
    shutil.rmtree(save / "iter_0000002" / "generator" / "state")
    proc = train_fails("--train-iters", 3, "--save", save, "--load", save)
    state = save / "iter_0000002" / "generator" / "state"
    assert f"{state} is missing: the generator's checkpoint is incomplete" in proc.stderr


def test_fault_hooks_are_test_only(tmp_path):
    """Issue 16, item 13: the fault-injection variables acted in any run; outside the test
    suite (MEGATRON_APT_TESTING unset) they are ignored, with a warning."""
    env = {"MEGATRON_APT_TESTING": "0", "MEGATRON_APT_TEST_NAN_AT_STEP": "1"}
    args = ["--recipe", "tiny-apt", "--train-iters", 2, "--save", tmp_path / "run"]
    proc = run_launcher(TRAIN, args, nproc=2, marker="TRAINING-DONE", env=env)
    assert "['MEGATRON_APT_TEST_NAN_AT_STEP'] ignored: test-only hooks" in proc.stdout
    assert "skipped=0" in proc.stdout


PAYLOAD = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
for f in sys.argv[1].split(","):
    torch.save({"module": {}, "payload": Payload()}, f)
"""


# slow (make test-all, not CI): the refusal itself is tested on one process in
# tests/unit/test_safe_checkpoint.py
@pytest.mark.slow
def test_no_pickle_payload_runs_through_load_or_convert(tmp_path):
    """Issue 16, item 4: every DeepSpeed file of a checkpoint replaced by one whose unpickling
    would run code; neither --load nor tools/convert_checkpoint.py export runs it."""
    save = tmp_path / "run"
    train("--train-iters", 2, "--save", save, "--zero-stage", 2)
    files = sorted((save / "iter_0000002").rglob("*.pt"))
    assert files
    marker = tmp_path / "payload-ran"
    subprocess.run(
        [sys.executable, "-c", PAYLOAD, ",".join(map(str, files)), str(marker)],
        check=True, env=launcher_env(),
    )  # fmt: skip
    assert not marker.exists()
    proc = train_fails("--train-iters", 3, "--save", save, "--load", save)
    assert "outside the allow-list" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists(), "a pickled payload ran through --load"
    tool = REPO_ROOT / "tools" / "convert_checkpoint.py"
    out = tmp_path / "g.safetensors"
    conv = subprocess.run(
        [sys.executable, str(tool), "export", "--input", str(save), "--output", str(out)],
        cwd=REPO_ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert conv.returncode != 0 and "weights-only" in conv.stderr, conv.stderr[-2000:]
    assert not marker.exists(), "a pickled payload ran through convert_checkpoint.py"
    # control: the files are real payloads (unpickling one with weights_only=False runs it)
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(files[0])!r}, weights_only=False)"],
        env=launcher_env(), check=False,
    )  # fmt: skip
    assert marker.exists()
