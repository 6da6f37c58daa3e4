"""The collapse detector on scripted metric sequences, the checkpoint choice and lr scaling of a
rollback, and the --on-collapse config checks (the policy in a real run:
tests/distributed/test_collapse_policy.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_apt.config.recipes import get_recipe
from megatron_apt.config.training import HealthConfig, validate
from megatron_apt.engine.checkpointing import LATEST, latest_checkpoint
from megatron_apt.engine.health import CollapseDetector, balanced_accuracy
from megatron_apt.engine.recovery import (
    healthy_checkpoint_before,
    retire_checkpoints_after,
    set_lr_scale,
)
from megatron_apt.testing.launch import REPO_ROOT

OK = {"d_acc_real": 0.8, "d_acc_fake": 0.7, "loss_d": 1.0}  # balanced 0.75: healthy
SAT = {"d_acc_real": 1.0, "d_acc_fake": 0.97, "loss_d": 0.02}  # balanced 0.985
BLIND = {"d_acc_real": 0.9, "d_acc_fake": 0.12, "loss_d": 1.38}  # balanced 0.51


def run(detector: CollapseDetector, seq: list[dict], first: int = 1) -> dict[int, str]:
    """Feed ``seq`` as log steps ``first, first + 1, ...``; returns {step: condition fired}."""
    fired = {}
    for i, m in enumerate(seq):
        det = detector.observe(first + i, m)
        if det is not None:
            fired[first + i] = det.condition
    return fired


def test_saturated_fires_at_the_patience_step_once_and_resets_on_recovery():
    d = CollapseDetector(HealthConfig())  # patience 3
    seq = [OK, SAT, SAT, SAT, SAT, SAT, OK, SAT, SAT, OK, SAT, SAT, SAT]
    assert run(d, seq) == {4: "saturated", 13: "saturated"}  # streaks 2-6 and 11-13
    d = CollapseDetector(HealthConfig())
    dets = [d.observe(s, m) for s, m in enumerate([OK, SAT, SAT, SAT], start=10)]
    det = dets[-1]
    assert det.step == 13 and det.streak_start == 11 and det.patience == 3
    assert det.balanced_acc == pytest.approx(0.985) and det.loss_d == 0.02
    assert "D saturated" in det.describe() and "(steps 11..13)" in det.describe()


def test_healthy_until_a_condition_fires_and_again_after_recovery():
    d = CollapseDetector(HealthConfig(collapse_patience=2))
    states = []
    for m in (OK, SAT, SAT, SAT, OK):
        d.observe(0, m)
        states.append(d.healthy)
    assert states == [True, True, False, False, True]  # a streak below patience is healthy


def test_blind_needs_its_own_patience_and_differs_from_saturated():
    d = CollapseDetector(HealthConfig(blind_patience=20))
    assert run(d, [BLIND] * 19) == {}
    assert run(d, [BLIND], first=20) == {20: "blind"}
    d = CollapseDetector(HealthConfig(blind_patience=4, collapse_patience=4))
    # alternating saturated / blind never builds a streak of either
    assert run(d, [SAT, BLIND] * 6) == {}
    assert run(d, [SAT] * 4, first=13) == {16: "saturated"}


def test_thresholds_are_inclusive_where_documented():
    cfg = HealthConfig(collapse_patience=1, blind_patience=1)
    edge_acc = {"d_acc_real": 0.98, "d_acc_fake": 0.98, "loss_d": 0.0499}  # acc >= 0.98
    assert run(CollapseDetector(cfg), [edge_acc]) == {1: "saturated"}
    edge_loss = {"d_acc_real": 1.0, "d_acc_fake": 1.0, "loss_d": 0.05}  # loss_d < 0.05 only
    assert run(CollapseDetector(cfg), [edge_loss]) == {}
    # 0.5 +- 0.03 inclusive, despite (0.5 + 0.56) / 2 - 0.5 = 0.030000000000000027 in floats
    assert run(CollapseDetector(cfg), [{"d_acc_real": 0.5, "d_acc_fake": 0.56, "loss_d": 1}])
    assert not run(CollapseDetector(cfg), [{"d_acc_real": 0.5, "d_acc_fake": 0.58, "loss_d": 1}])


def test_missing_or_non_finite_metrics_leave_the_streaks_alone():
    d = CollapseDetector(HealthConfig())
    nan = {**SAT, "loss_d": math.nan}
    # a skipped update (NaN) and a stage without D between saturated steps: no reset, no count
    assert run(d, [SAT, nan, SAT, {"loss": 1.0}, SAT]) == {5: "saturated"}
    assert balanced_accuracy({"loss": 1.0}) is None and balanced_accuracy(nan) is None


def test_state_round_trip_keeps_streaks_and_fired_flags():
    d = CollapseDetector(HealthConfig())
    run(d, [SAT, SAT, SAT, SAT])
    state = json.loads(json.dumps(d.state_dict()))  # as in trainer_state.json
    assert state == {
        "healthy": False,
        "streak": {"saturated": 4, "blind": 0},
        "start": {"saturated": 1, "blind": None},
    }
    e = CollapseDetector(HealthConfig())
    e.load_state_dict(state)
    assert not e.healthy and run(e, [SAT], first=5) == {}  # already fired in this streak
    e.reset()
    assert e.healthy and run(e, [SAT, SAT, SAT], first=6) == {8: "saturated"}


# ------------------------------------------------------------------------------------------
# Rollback: which checkpoint, what happens to the others, the learning rates
# ------------------------------------------------------------------------------------------


def _checkpoint(root, step: int, healthy: bool | None) -> None:
    d = root / f"iter_{step:07d}"
    d.mkdir(parents=True)
    state = {"step": step} if healthy is None else {"step": step, "health": {"healthy": healthy}}
    (d / "trainer_state.json").write_text(json.dumps(state))
    (d / "COMPLETE").write_text(str(step))


def test_rollback_target_is_the_newest_healthy_checkpoint_before_the_streak(tmp_path):
    for step, healthy in ((2, None), (4, True), (6, False), (8, True), (10, True)):
        _checkpoint(tmp_path, step, healthy)
    (tmp_path / "iter_0000009").mkdir()  # incomplete: never a candidate
    (tmp_path / LATEST).write_text("10")
    assert healthy_checkpoint_before(tmp_path, 10) == tmp_path / "iter_0000008"
    assert healthy_checkpoint_before(tmp_path, 8) == tmp_path / "iter_0000004"  # 6 unhealthy
    assert healthy_checkpoint_before(tmp_path, 4) == tmp_path / "iter_0000002"  # no record: ok
    assert healthy_checkpoint_before(tmp_path, 2) is None
    assert healthy_checkpoint_before(None, 10) is None
    retire_checkpoints_after(tmp_path, 4, "1")
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_0000004"
    kept = sorted(p.name for p in tmp_path.glob("iter_*"))
    assert kept == ["iter_0000002", "iter_0000004", "iter_0000009"]
    moved = sorted(p.name for p in (tmp_path / "rolled_back" / "1").iterdir())
    assert moved == ["iter_0000006", "iter_0000008", "iter_0000010"]


def test_lr_scale_sets_base_and_current_lr_of_every_engine():
    def engine(lr: float):
        opt = torch.optim.RMSprop([torch.nn.Parameter(torch.zeros(2))], lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        for _ in range(3):  # three optimizer steps: factor 1/4 now
            opt.step()
            sched.step()
        return SimpleNamespace(lr_scheduler=sched, optimizer=opt)

    engines = {"generator": engine(1e-3), "discriminator": engine(4e-3)}
    base = {"generator": 1e-3, "discriminator": 4e-3}
    set_lr_scale(engines, base, 0.25)
    for name, e in engines.items():
        assert e.lr_scheduler.base_lrs == [base[name] * 0.25]
        assert e.optimizer.param_groups[0]["lr"] == pytest.approx(base[name] * 0.25 / 4)
        e.optimizer.step()
        e.lr_scheduler.step()  # the schedule goes on from the scaled base
        assert e.optimizer.param_groups[0]["lr"] == pytest.approx(base[name] * 0.25 / 5)
        sd = e.lr_scheduler.state_dict()  # what a DeepSpeed checkpoint stores
        assert sd["base_lrs"] == [base[name] * 0.25]


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "health", "message"),
    [
        ({}, {"on_collapse": "rollback"}, "on_collapse='rollback' reloads a healthy checkpoint"),
        ({"save": "x"}, {"on_collapse": "rollback"}, r"save='x', save_interval=0\)"),
        ({"stage": "diffusion"}, {"on_collapse": "stop"}, "stage='diffusion' has none"),
        ({}, {"on_collapse": "retry"}, "on_collapse='retry': choose one of"),
        ({}, {"collapse_patience": 0}, "collapse_patience=0 must be >= 1"),
        ({}, {"blind_patience": 0}, "blind_patience=0 must be >= 1"),
        ({}, {"saturated_acc": 0.5}, r"saturated_acc=0.5 must lie in \(0.5, 1\]"),
        ({}, {"blind_margin": 0.5}, r"blind_margin=0.5 must lie in \[0, 0.5\)"),
        ({}, {"rollback_lr_factor": 0.0}, r"rollback_lr_factor=0.0 must lie in \(0, 1\]"),
        ({}, {"max_rollbacks": -1}, "max_rollbacks=-1 must be >= 0"),
    ],
)
def test_health_config_errors_are_named(changes, health, message):
    cfg = get_recipe("tiny-apt").replace(**changes)
    with pytest.raises(ValueError, match=message):
        validate(cfg.replace(health=HealthConfig(**health)))


def test_rollback_with_save_interval_validates():
    cfg = get_recipe("tiny-apt").replace(save="x", save_interval=5)
    validate(cfg.replace(health=HealthConfig(on_collapse="rollback")))
    validate(get_recipe("tiny-diffusion").replace(health=HealthConfig(on_collapse="warn")))
    assert get_recipe("tiny-apt").to_dict()["health"]["on_collapse"] == "warn"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, str(REPO_ROOT / "pretrain_apt.py"), *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_cli_health_flags(tmp_path):
    proc = _cli(
        "--on-collapse", "rollback", "--save", str(tmp_path / "r"), "--save-interval", "5",
        "--collapse-patience", "4", "--blind-patience", "7", "--saturated-acc", "0.99",
        "--saturated-loss-d", "0.02", "--blind-margin", "0.05", "--rollback-lr-factor", "0.25",
        "--max-rollbacks", "2", "--print-config",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["health"] == {
        "on_collapse": "rollback",
        "saturated_acc": 0.99,
        "saturated_loss_d": 0.02,
        "collapse_patience": 4,
        "blind_margin": 0.05,
        "blind_patience": 7,
        "rollback_lr_factor": 0.25,
        "max_rollbacks": 2,
    }
    proc = _cli("--on-collapse", "rollback", "--save", str(tmp_path / "r"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: on_collapse='rollback' reloads a healthy checkpoint")
    assert not (tmp_path / "r").exists()
