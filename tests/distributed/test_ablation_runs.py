"""The ablation options in real training runs (2 gloo processes, ``torchrun``, fp32).

The frozen-D control with every other ablation switched on (Adam(0, 0.9), t = 0 for D, one
head on the last block, R1 noise of std sqrt(sigma)) at ZeRO-3: D's weights never change on
any rank while G's do, D's phase still logs its metrics, the config is recorded in the
checkpoint, and a resume from update 2 ends exactly where the uninterrupted 3-update run ends
(a never-stepped discriminator engine checkpoints and reloads).

The D warm-up (``--d-warmup-iters``): during the first updates D trains, G and its EMA keep
their initial weights bit for bit and no G metrics are logged; then both train.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_apt.testing.launch import REPO_ROOT, run_launcher
from megatron_apt.utils.metrics import PERF_KEYS

PRETRAIN = REPO_ROOT / "pretrain_apt.py"
MARKER = "TRAINING-DONE"
ABLATIONS = (
    "--freeze-discriminator", "--optimizer", "adam", "--adam-betas", "0", "0.9",
    "--d-timesteps", "zero", "--d-head-layers", "last", "--r1-noise-std", "sqrt-sigma",
)  # fmt: skip


def train(save: Path, *args, env: dict | None = None):
    cli = ["--recipe", "tiny-apt", "--fp32", "--zero-stage", "3", "--save", save, *args]
    return run_launcher(PRETRAIN, cli, nproc=2, marker=MARKER, timeout=420, env=env)


def records(save: Path) -> dict[int, dict]:
    out = {}
    for line in (save / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "event" not in r:
            out[r["step"]] = r
    return out


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ablation")
    save, weights = root / "frozen", root / "weights"
    env = {"MEGATRON_APT_TEST_WEIGHTS_DIR": str(weights)}
    proc = train(save, *ABLATIONS, "--train-iters", "3", "--save-interval", "2", env=env)
    for rank in (0, 1):
        assert f"{MARKER} rank={rank} stage=apt steps=3 skipped=0" in proc.stdout
    return save, weights


def test_frozen_discriminator_keeps_its_init_and_g_trains(frozen_run):
    save, weights = frozen_run
    for rank in (0, 1):
        hist = torch.load(weights / f"rank{rank}.pt", weights_only=True)
        assert sorted(hist) == [0, 1, 2, 3]
        d_keys = [k for k in hist[0] if k.startswith("discriminator/")]
        g_keys = [k for k in hist[0] if k.startswith("generator/")]
        assert d_keys and g_keys
        assert not any(".heads.1." in k for k in d_keys)  # one head: --d-head-layers last
        for step in (1, 2, 3):
            assert all(torch.equal(hist[0][k], hist[step][k]) for k in d_keys), (rank, step)
            moved = max((hist[step][k] - hist[step - 1][k]).abs().max().item() for k in g_keys)
            assert moved > 0, (rank, step, "G did not train")
    log = records(save)
    for r in log.values():  # D's phase still measured; no D optimizer step, so no D norm
        assert {"loss_d", "loss_r1", "d_acc_real", "d_acc_fake", "logit_gap", "grad_norm_g"} <= set(
            r
        )
        assert "grad_norm_d" not in r
    state = json.loads((save / "iter_0000002" / "trainer_state.json").read_text())
    cfg = state["config"]
    assert cfg["freeze_discriminator"] is True and cfg["d_timesteps"] == "zero"
    assert (cfg["d_head_layers"], cfg["r1_noise_std"]) == ("last", "sqrt-sigma")
    assert cfg["optim"]["name"] == "adam" and cfg["optim"]["adam_betas"] == [0.0, 0.9]
    disc = load_file(str(save / "discriminator.safetensors"))
    assert "heads.0.query" in disc and "heads.1.query" not in disc


# slow (make test-all, not CI): resume exactness is tested in CI for the APT run itself
# (test_training_system::test_resume_equals_uninterrupted_run[apt-zero3])
@pytest.mark.slow
def test_frozen_discriminator_run_resumes_exactly(frozen_run):
    save, _ = frozen_run
    resumed = save.parent / "resumed"
    shutil.copytree(save, resumed)
    (resumed / "latest_checkpointed_iteration.txt").write_text("2")
    shutil.rmtree(resumed / "iter_0000003")
    proc = train(resumed, *ABLATIONS, "--train-iters", "3", "--load", resumed)
    assert f"resumed from {resumed / 'iter_0000002'} at step 2" in proc.stdout
    a, b = records(save), records(resumed)
    timing = set(PERF_KEYS)  # time, throughput and memory may differ
    assert {k: v for k, v in a[3].items() if k not in timing} == {
        k: v for k, v in b[3].items() if k not in timing
    }
    for name in ("generator", "generator_ema", "discriminator"):
        x, y = (load_file(str(d / f"{name}.safetensors")) for d in (save, resumed))
        assert all(torch.equal(x[k], y[k]) for k in x), name


def _moved(hist: dict, keys: list[str], a: int, b: int) -> float:
    return max((hist[b][k] - hist[a][k]).abs().max().item() for k in keys)


def test_d_warmup_trains_d_only_then_both(tmp_path):
    save, weights = tmp_path / "warmup", tmp_path / "weights"
    env = {"MEGATRON_APT_TEST_WEIGHTS_DIR": str(weights)}
    train(save, "--d-warmup-iters", "2", "--train-iters", "3", env=env)
    for rank in (0, 1):
        hist = torch.load(weights / f"rank{rank}.pt", weights_only=True)
        g_keys = [k for k in hist[0] if k.startswith(("generator/", "ema/generator/"))]
        d_keys = [k for k in hist[0] if k.startswith("discriminator/")]
        assert g_keys and d_keys
        for step in (1, 2):  # warm-up: D moves, G and EMA stay
            assert _moved(hist, d_keys, step - 1, step) > 0, (rank, step)
            assert _moved(hist, g_keys, 0, step) == 0, (rank, step)
        assert _moved(hist, g_keys, 2, 3) > 0 and _moved(hist, d_keys, 2, 3) > 0
    log = records(save)
    assert "loss_g" not in log[1] and "loss_g" not in log[2] and "loss_g" in log[3]
    assert log[2]["samples"] == 2 * 4 and log[3]["samples"] == 2 * 4 + 2 * 4  # D, then D + G
