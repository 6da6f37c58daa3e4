"""The training system end to end under the real launchers (2 gloo processes, fp32, CPU).

* all three stages chained (diffusion -> consistency -> apt) under ``torchrun``, ``deepspeed``
  and ``mpirun``: success marker on every rank, metrics keys, TensorBoard, model files;
* the three launchers train the same numbers;
* resume after step 2 equals an uninterrupted 4-step run (metrics, exported weights, EMA, the
  consistency target network), apt at ZeRO-2 and ZeRO-3, consistency at ZeRO-2;
* a rank SIGKILLed while a checkpoint is written leaves the previous one as the latest and
  ``--load`` resumes from it exactly;
* ``--load`` of another model's checkpoint fails naming keys and path, and writes nothing;
* a NaN loss on one rank skips the update of both engines on every rank and is counted.

Runs are shared through one module-scoped cache (about 20 launches of ~15 s on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_apt.checkpoint.io import read_model_file
from megatron_apt.engine.checkpointing import latest_checkpoint
from megatron_apt.models.mmdit.config import get_preset
from megatron_apt.testing.hooks import (
    VIDEO_START_SAME,
    read_weights_dump,
    video_stage_start_diffs,
)
from megatron_apt.testing.launch import REPO_ROOT, launcher_command, launcher_env, run_launcher
from megatron_apt.utils.metrics import PERF_KEYS

PRETRAIN = REPO_ROOT / "pretrain_apt.py"
MARKER = "TRAINING-DONE"
LAUNCHERS = ("torchrun", "deepspeed", "mpirun")
ZERO = {"torchrun": 2, "deepspeed": 3, "mpirun": 2}  # ZeRO stage of each launcher's chain
KEYS = {
    "diffusion": {"step", "samples", "loss", "lr", "step_time_s", "skipped", "grad_norm"},
    "consistency": {"step", "samples", "loss", "lr", "step_time_s", "skipped", "grad_norm"},
    "apt": {"step", "samples", "loss_g", "loss_d", "loss_r1", "d_real", "d_fake", "lr"}
    | {"step_time_s", "skipped", "d_acc_real", "d_acc_fake", "logit_gap"}
    | {"grad_norm_g", "grad_norm_d"},
}
KEYS = {stage: keys | set(PERF_KEYS) for stage, keys in KEYS.items()}  # TFLOP/s, MFU, ...
EXPORTS = {
    "diffusion": ("diffusion", "diffusion_ema"),
    "consistency": ("consistency", "consistency_ema"),
    "apt": ("generator", "generator_ema"),
}
# the only metrics allowed to differ between equal runs: time, throughput, memory
TIMING = set(PERF_KEYS)


def _have(launcher: str) -> bool:
    return shutil.which(launcher, path=str(Path(sys.executable).parent)) is not None


def train(launcher: str, recipe: str, save: Path, *args, env: dict | None = None):
    """One ``pretrain_apt.py`` run; asserts the marker of every rank."""
    cli = ["--recipe", recipe, "--fp32", "--save", save, *args]
    return run_launcher(
        PRETRAIN, cli, nproc=2, launcher=launcher, marker=MARKER, timeout=420, env=env
    )


def train_fails(launcher: str, recipe: str, save: Path, *args, env: dict | None = None):
    """A run that must fail: returns the completed process (full output, no truncation)."""
    cli = [str(a) for a in ["--recipe", recipe, "--fp32", "--save", save, *args]]
    full_env = launcher_env(env)  # gloo, no visible GPU, as run_launcher's workers
    cmd = launcher_command(launcher, 2, str(PRETRAIN), cli)
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=420
    )
    assert proc.returncode != 0, f"{' '.join(cmd)} succeeded:\n{proc.stdout[-3000:]}"
    assert MARKER not in proc.stdout, proc.stdout[-3000:]
    return proc


def metrics(save: Path) -> dict[int, dict]:
    """step -> the last record logged for it (a resumed run appends); events left out."""
    out = {}
    for line in (save / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "event" not in r:
            out[int(r["step"])] = r
    return out


def same_metrics(a: dict, b: dict, steps, rtol: float = 0.0) -> None:
    for s in steps:
        ra, rb = a[s], b[s]
        assert set(ra) == set(rb), (s, set(ra) ^ set(rb))
        for k in set(ra) - TIMING:
            assert math.isclose(ra[k], rb[k], rel_tol=rtol, abs_tol=rtol * 1e-3), (s, k, ra, rb)


def max_diff(f1: Path, f2: Path) -> float:
    a, b = load_file(str(f1)), load_file(str(f2))
    assert a.keys() == b.keys(), (f1, f2)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "tensorboard" not in p.parts
    }


class Runs:
    """Launches shared by the tests of this module, run on first use (failures are cached
    too, so that a broken run fails its dependants at once instead of re-running)."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict = {}

    def get(self, key, fn):
        if key not in self.cache:
            try:
                self.cache[key] = ("ok", fn())
            except BaseException as e:  # noqa: B036 - re-raised below and for dependants
                self.cache[key] = ("err", e)
        status, value = self.cache[key]
        if status == "err":
            raise value
        return value

    # -- the three stages chained, 2 updates each ------------------------------------
    def chain(self, launcher: str) -> Path:
        if not _have(launcher):
            pytest.skip(f"{launcher} is not installed in this environment")
        return self.get(("chain", launcher), lambda: self._chain(launcher))

    def _chain(self, launcher: str) -> Path:
        base = self.root / launcher
        z = ["--zero-stage", ZERO[launcher], "--train-iters", 2]
        out = {}
        out["diffusion"] = train(launcher, "tiny-diffusion", base / "diffusion", *z)
        out["consistency"] = train(
            launcher, "tiny-consistency", base / "consistency", *z, *self.inits(base, "cons")
        )
        out["apt"] = train(launcher, "tiny-apt", base / "apt", *z, *self.inits(base, "apt"))
        for stage, proc in out.items():
            (base / f"{stage}.stdout").write_text(proc.stdout)
        return base

    @staticmethod
    def inits(base: Path, stage: str) -> list:
        if stage == "cons":
            return ["--init-generator", base / "diffusion" / "diffusion.safetensors"]
        return [
            "--init-generator",
            base / "consistency" / "consistency.safetensors",
            "--init-discriminator",
            base / "diffusion" / "diffusion.safetensors",
        ]

    # -- uninterrupted 4-update runs, same inits as the chains -----------------------
    def full(self, case: str) -> Path:
        stage, launcher, zero = CASES[case]
        base = self.chain(launcher)

        def run() -> Path:
            save = self.root / f"full-{case}"
            recipe = f"tiny-{stage}"
            inits = self.inits(base, "cons" if stage == "consistency" else "apt")
            train("torchrun", recipe, save, "--zero-stage", zero, "--train-iters", 4, *inits)
            return save

        return self.get(("full", case), run)


# case -> (stage, the chain whose checkpoint is resumed and whose inits are used, ZeRO stage)
CASES = {
    "apt-zero2": ("apt", "torchrun", 2),
    "consistency-zero2": ("consistency", "torchrun", 2),
    "apt-zero3": ("apt", "deepspeed", 3),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("training-system"))


# ------------------------------------------------------------------------------------------
# 5. Integration: the three stages under each launcher
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_three_stages_under_launcher(runs, launcher):
    base = runs.chain(launcher)
    tiny = get_preset("tiny")
    for stage in ("diffusion", "consistency", "apt"):
        save, stdout = base / stage, (base / f"{stage}.stdout").read_text()
        for rank in (0, 1):
            assert f"{MARKER} rank={rank} stage={stage} steps=2 skipped=0" in stdout
        log = metrics(save)
        assert sorted(log) == [1, 2], log
        for r in log.values():
            assert KEYS[stage] <= set(r), (stage, KEYS[stage] - set(r))
            assert all(math.isfinite(v) for v in r.values()), r
        assert log[2]["samples"] == (16 if stage == "apt" else 8)  # global batch 4 per phase
        assert log[1]["lr"] == pytest.approx(1e-3)
        _check_tensorboard(save / "tensorboard", stage)
        for name in EXPORTS[stage]:
            state, cfg, meta = read_model_file(save / f"{name}.safetensors")
            assert cfg == tiny and meta["role"] == (stage if stage != "apt" else "generator")
            assert state and all(torch.isfinite(t).all() for t in state.values())
        ckpt = latest_checkpoint(save)
        assert ckpt == save / "iter_0000002" and (ckpt / "COMPLETE").exists()
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    # EMA export carries its decay and step; the distilled model moved off the diffusion one
    _, _, meta = read_model_file(base / "apt" / "generator_ema.safetensors")
    assert json.loads(meta["extra"]) == {"ema_decay": 0.9, "step": 2}
    assert max_diff(base / "apt/generator.safetensors", base / "apt/generator_ema.safetensors")
    assert (base / "apt" / "discriminator.safetensors").exists()


def _check_tensorboard(tb_dir: Path, stage: str) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(tb_dir.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {tb_dir}"
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"Loss/loss_g", "Loss/loss_d", "Loss/loss_r1", "D/d_real"} if stage == "apt" else set()
    want |= {"Health/d_acc_real", "Health/grad_norm_d"} if stage == "apt" else set()
    assert {"Train/lr", "Train/samples"} | want <= tags, tags
    loss = "Loss/loss_g" if stage == "apt" else "Loss/loss"
    assert [e.step for e in acc.Scalars(loss)] == [1, 2]


def test_launchers_train_the_same_numbers(runs):
    """Same recipe, seed and ZeRO stage: another launcher logs the same metrics and exports the
    same weights bit for bit (mpirun vs torchrun at ZeRO-2 for all stages; deepspeed vs
    torchrun at ZeRO-3 for apt). Catches rank discovery and data-sharding differences between
    launchers, and metrics reduced in a rank-dependent order (each rank iterating a set of
    names in its own hash order). ZeRO-3 vs ZeRO-2 (another reduction order) agree to fp32
    round-off: RMSprop divides by sqrt(E[g^2]), so a gradient that cancels to ~0 can turn
    round-off into a sizeable part of one lr step (1e-3), hence 1e-3 on weights there."""
    ref = runs.chain("torchrun")
    other = runs.chain("mpirun")
    for stage in ("diffusion", "consistency", "apt"):
        same_metrics(metrics(ref / stage), metrics(other / stage), (1, 2))
        for name in EXPORTS[stage]:
            f = f"{stage}/{name}.safetensors"
            assert max_diff(ref / f, other / f) == 0.0, ("mpirun", f)
    ds, full3 = runs.chain("deepspeed"), runs.full("apt-zero3")  # full3: torchrun, ZeRO-3
    same_metrics(metrics(ds / "apt"), metrics(full3), (1, 2))
    for stage in ("diffusion", "consistency", "apt"):
        same_metrics(metrics(ref / stage), metrics(ds / stage), (1, 2), rtol=1e-4)
        for name in EXPORTS[stage]:
            f = f"{stage}/{name}.safetensors"
            assert max_diff(ref / f, ds / f) <= 1e-3, ("deepspeed", f)


# ------------------------------------------------------------------------------------------
# The paper's image-then-video chain on the MMDiT (examples/tiny_cpu.sh's last two stages)
# ------------------------------------------------------------------------------------------


def _weights_at(dumps: Path, step: int) -> dict[str, torch.Tensor]:
    history = read_weights_dump(dumps)
    assert sorted(history) == [0, 1, 2], sorted(history)
    return history[step]


# slow (make test-all): the same init flags and trainer code are in CI through
# tests/distributed/test_wan_chain.py (image -> video APT on the Wan family, same asserts)
@pytest.mark.slow
def test_image_then_video_chain_starts_each_stage_from_the_right_files(runs):
    """Section 3.5 on the MMDiT: ``tiny-image-apt`` (single frames) from the consistency EMA,
    then ``tiny-apt`` (2 frames) with G from the image stage's EMA and D again from the
    diffusion weights. Seen through the trainer's weights dump (megatron_apt/testing/hooks.py)
    just before the video stage's first update, bitwise: G(0) = the image EMA (not its raw G,
    not the consistency EMA); D's backbone(0) = the diffusion weights (not the image stage's
    trained D); D's heads(0) = the image stage's heads(0) (same fresh init) and not its
    trained heads. --ema-decay 0.5 so that the EMAs move visibly in 2 updates."""
    base = runs.chain("torchrun")
    root = runs.root / "image-video"
    diffusion = base / "diffusion" / "diffusion.safetensors"
    common = ["--zero-stage", 2, "--train-iters", 2, "--ema-decay", 0.5]
    inits = {
        "image": ["--init-generator", base / "consistency" / "consistency_ema.safetensors"],
        "video": ["--init-generator", root / "image-apt" / "generator_ema.safetensors"],
    }
    for stage, recipe in (("image", "tiny-image-apt"), ("video", "tiny-apt")):
        env = {"MEGATRON_APT_TEST_WEIGHTS_DIR": str(root / f"dumps-{stage}")}
        args = [*common, *inits[stage], "--init-discriminator", diffusion]
        proc = train("torchrun", recipe, root / f"{stage}-apt", *args, env=env)
        assert "holds role" not in proc.stderr, proc.stderr[-3000:]
    state = json.loads((root / "image-apt" / "iter_0000002" / "trainer_state.json").read_text())
    image_cfg = state["config"]
    assert image_cfg["data"]["frames"] == 1 and image_cfg["shift"] == 1.0, image_cfg
    start = _weights_at(root / "dumps-video", 0)
    image_start = _weights_at(root / "dumps-image", 0)
    consistency = load_file(str(inits["image"][1]))
    diffs = video_stage_start_diffs(
        start, image_start, root / "image-apt", consistency, load_file(str(diffusion))
    )
    print(json.dumps(diffs, indent=1))
    for name, value in diffs.items():
        if name in VIDEO_START_SAME:
            assert value == 0.0, (name, diffs)
        else:
            assert value > 1e-6, (name, diffs)


# ------------------------------------------------------------------------------------------
# 1. Resume is exact
# ------------------------------------------------------------------------------------------


def assert_same_end_state(full: Path, resumed: Path, first: Path, stage: str) -> None:
    """Metrics of every step, exported weights, per-rank EMA shadows and the consistency target
    network of a resumed run equal the uninterrupted run's, bit for bit (fp32, same ZeRO)."""
    same_metrics(metrics(full), metrics(resumed), (1, 2, 3, 4))
    names = [*EXPORTS[stage], "discriminator"] if stage == "apt" else EXPORTS[stage]
    for name in names:
        f = f"{name}.safetensors"
        assert max_diff(full / f, resumed / f) == 0.0, (resumed, f)
        assert max_diff(first / f, resumed / f) > 1e-6, f"{f}: the later updates changed nothing?"
    last_full, last_res = full / "iter_0000004", resumed / "iter_0000004"
    # EMA shadows per engine (and the consistency target's fp32 shadow, ema/target), and the
    # target network itself: one file per rank each
    dirs = ["ema/model", "ema/target", "modules/target"] if stage == "consistency" else []
    for rel in dirs or ["ema/generator"]:
        files = sorted((last_full / rel).rglob("rank*.safetensors"))
        assert len(files) == 2, (rel, files)
        for f in files:
            assert max_diff(f, last_res / f.relative_to(last_full)) == 0.0, (resumed, f)


# consistency-zero2 is slow (make test-all, not CI): the APT resume (two engines, ZeRO-3) stays
@pytest.mark.parametrize(
    "case", [pytest.param("consistency-zero2", marks=pytest.mark.slow), "apt-zero3"]
)
def test_resume_equals_uninterrupted_run(runs, case):
    """The chain's 2-update run resumed to 4 updates == a 4-update run. (apt at ZeRO-2: see the
    killed-rank test, which resumes from update 1.)"""
    stage, launcher, zero = CASES[case]
    full = runs.full(case)
    first = runs.chain(launcher) / stage  # the same command stopped after 2 updates
    resumed = runs.root / f"resumed-{case}"
    shutil.copytree(first, resumed)
    inits = runs.inits(runs.chain(launcher), "cons" if stage == "consistency" else "apt")
    args = ["--zero-stage", zero, "--train-iters", 4, "--load", resumed, *inits]
    proc = train("torchrun", f"tiny-{stage}", resumed, *args)
    assert f"resumed from {resumed / 'iter_0000002'} at step 2" in proc.stdout
    assert_same_end_state(full, resumed, first, stage)
    if stage == "consistency":  # the target network really moves (EMA of the student)
        rel = Path("modules/target/rank00000.safetensors")
        assert max_diff(full / "iter_0000004" / rel, first / "iter_0000002" / rel) > 0.0


# ------------------------------------------------------------------------------------------
# 2. A rank killed while a checkpoint is written (and apt ZeRO-2 resume)
# ------------------------------------------------------------------------------------------


def test_rank_killed_during_checkpoint_keeps_previous(runs):
    """Rank 1 dies (SIGKILL) inside checkpoint 2 after the engines wrote their files: update 1
    stays the latest, ``--load`` resumes from it and ends where a 4-update run ends."""
    base, full = runs.chain("torchrun"), runs.full("apt-zero2")
    save = runs.root / "killed"
    args = ["--zero-stage", 2, "--save-interval", 1, *runs.inits(base, "apt")]
    env = {"MEGATRON_APT_TEST_KILL_IN_SAVE": "2"}
    proc = train_fails("torchrun", "tiny-apt", save, *args, "--train-iters", 2, env=env)
    assert "rank 1 kills itself in save 2" in proc.stdout
    partial = save / ".iter_0000002.tmp"
    assert (partial / "generator" / "state").is_dir()  # the kill came mid-checkpoint
    assert not (partial / "COMPLETE").exists() and not (save / "iter_0000002").exists()
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert latest_checkpoint(save) == save / "iter_0000001"
    proc = train("torchrun", "tiny-apt", save, *args, "--train-iters", 4, "--load", save)
    assert f"resumed from {save / 'iter_0000001'} at step 1" in proc.stdout
    assert not list(save.glob(".iter_*.tmp")), "stale partial checkpoint left behind"
    assert latest_checkpoint(save) == save / "iter_0000004"
    assert_same_end_state(full, save, base / "apt", "apt")


# ------------------------------------------------------------------------------------------
# 3. --load of another model's checkpoint
# ------------------------------------------------------------------------------------------


def test_load_of_other_model_names_keys_and_writes_nothing(runs):
    save = runs.root / "mismatch"
    shutil.copytree(runs.chain("torchrun") / "apt", save)
    before = digest(save)
    # tiny-sd3 has pooled-text embeddings and no QK norm
    proc = train_fails("torchrun", "tiny-apt", save, "--model", "tiny-sd3", "--load", save)
    err = proc.stderr
    assert f"error: checkpoint {save / 'iter_0000002'} does not fit this run's generator" in err
    assert "model.pooled_embed.linear_1.weight" in err  # in the checkpoint, not the model
    assert "model.blocks.0.visual.q_norm.weight" in err  # in the model, not the checkpoint
    assert 'checkpointing.py", line' not in err, "a traceback instead of a clean error"
    assert digest(save) == before, "a failed --load modified the checkpoint directory"


def test_load_with_another_parallel_layout_is_refused(runs):
    """Same world size, another split (DP 2 -> CP 2): ZeRO shards would not line up."""
    save = runs.root / "layout"
    shutil.copytree(runs.chain("torchrun") / "apt", save)
    before = digest(save)
    proc = train_fails("torchrun", "tiny-apt", save, "--context-parallel-size", 2, "--load", save)
    want = (
        f"checkpoint {save / 'iter_0000002'} was written with context_parallel=1, this run has "
        "context_parallel=2"
    )
    assert want in proc.stderr, proc.stderr[-3000:]
    assert 'checkpointing.py", line' not in proc.stderr, "a traceback instead of a clean error"
    assert digest(save) == before, "a failed --load modified the checkpoint directory"


# ------------------------------------------------------------------------------------------
# 6. Non-finite losses
# ------------------------------------------------------------------------------------------


def test_nan_loss_skips_both_engines_on_every_rank(runs):
    base = runs.chain("torchrun")
    save, weights = runs.root / "nan", runs.root / "nan-weights"
    env = {"MEGATRON_APT_TEST_NAN_AT_STEP": "2", "MEGATRON_APT_TEST_WEIGHTS_DIR": str(weights)}
    args = ["--zero-stage", 2, "--train-iters", 3, *runs.inits(base, "apt")]
    proc = train("torchrun", "tiny-apt", save, *args, env=env)
    assert "NaN loss on rank 1 in update 2" in proc.stdout
    for rank in (0, 1):
        assert f"{MARKER} rank={rank} stage=apt steps=3 skipped=1" in proc.stdout
        hist = torch.load(weights / f"rank{rank}.pt", weights_only=True)
        assert sorted(hist) == [0, 1, 2, 3]
        for group in ("generator/", "discriminator/", "ema/generator/"):
            assert any(k.startswith(group) for k in hist[0]), group
            d01, d12, d23 = (_delta(hist[a], hist[a + 1], group) for a in (0, 1, 2))
            assert d01 > 0, (rank, group, "update 1 changed nothing")
            assert d12 == 0.0, (rank, group, "the poisoned update 2 changed weights")
            assert d23 > 0, (rank, group, "training did not go on after the skip")
    log = metrics(save)
    assert [log[s]["skipped"] for s in (1, 2, 3)] == [0, 1, 1]
    assert all(math.isfinite(log[3][k]) for k in KEYS["apt"])
    same_metrics(metrics(runs.full("apt-zero2")), log, (1,))  # same run until the NaN


def _delta(a: dict, b: dict, prefix: str) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if k.startswith(prefix))


# ------------------------------------------------------------------------------------------
# 4. Config errors through the CLI under a launcher
# ------------------------------------------------------------------------------------------


def test_impossible_batch_fails_before_start_under_torchrun(tmp_path):
    # micro 2 x DP 2 does not divide 6
    proc = train_fails("torchrun", "tiny-apt", tmp_path / "x", "--global-batch-size", 6)
    want = "error: global_batch_size=6 is not a multiple of micro_batch_size=2 x data_parallel=2"
    # Every rank validates the config before any collective and prints the same line, but
    # torchrun tears down the other rank as soon as the first one exits non-zero: one or two.
    assert proc.returncode != 0
    assert proc.stderr.count(want) in (1, 2), proc.stderr[-3000:]
    assert 'pretrain_apt.py", line' not in proc.stderr, "a traceback from the ranks"
    assert not (tmp_path / "x").exists()


def test_log_step_is_the_mean_of_its_interval(runs, tmp_path):
    """With --log-interval 2 a log step reports the mean of its two updates' metrics (not the
    last update's alone: one micro-batch is a noisy sample of D's accuracy), and the same
    cumulative counters as the every-update log of the same run."""
    every = metrics(runs.full("apt-zero2"))
    base = runs.chain("torchrun")
    save = tmp_path / "interval2"
    inits = Runs.inits(base, "apt")
    train("torchrun", "tiny-apt", save, "--zero-stage", 2, "--train-iters", 4, *inits,
          "--log-interval", 2)  # fmt: skip
    pairs = metrics(save)
    assert sorted(pairs) == [2, 4], pairs
    for step in (2, 4):
        for k in KEYS["apt"] - TIMING - {"step", "samples", "skipped", "lr"}:
            want = (every[step - 1][k] + every[step][k]) / 2
            assert math.isclose(pairs[step][k], want, rel_tol=1e-6, abs_tol=1e-7), (step, k)
        for k in ("samples", "skipped", "lr"):
            assert pairs[step][k] == every[step][k], (step, k)
