"""What an APT run does when the collapse detector fires (``--on-collapse``).

* ``warn`` (default): one WARNING line and a ``collapse`` event; training goes on.
* ``stop``: a ``collapse`` and a ``stop`` event, a message naming the condition and the last
  healthy checkpoint, nothing more saved; every rank raises :class:`TrainingStopped` on the
  same log step and ``pretrain_apt.py`` exits with :data:`EXIT_COLLAPSE` (3).
* ``rollback``: reload, in-process, the newest checkpoint that was healthy when saved and
  saved before the unhealthy streak began (engines with their optimizer states, the EMA, the
  data stream position and the counters), multiply every engine's learning rate by
  ``rollback_lr_factor`` (cumulative over rollbacks; recorded in trainer_state.json as
  ``lr_scale`` and re-applied to the LambdaLR base lrs on resume), and go on. The checkpoints
  of the abandoned steps move to ``SAVE/rolled_back/<n>/`` and ``latest`` points at the
  reloaded one, so a later ``--load`` resumes the surviving branch. After ``max_rollbacks``
  rollbacks, or without a healthy checkpoint, the run stops as with ``stop``.

Every event goes to metrics.jsonl as a record with an ``"event"`` key, and to the console.
The decision to act is taken by every rank from the identically reduced metrics; the choice of
checkpoint is made by rank 0 and broadcast (file systems may show new files to ranks late).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from megatron_apt.engine.checkpointing import LATEST, list_checkpoints
from megatron_apt.engine.health import CollapseDetector, Detection

EXIT_COLLAPSE = 3  # exit code of a run stopped by the collapse detector
ROLLED_BACK = "rolled_back"


class TrainingStopped(RuntimeError):
    """Raised on every rank when the collapse policy ends the run; ``exit_code`` for the CLI."""

    def __init__(self, message: str, exit_code: int = EXIT_COLLAPSE):
        super().__init__(message)
        self.exit_code = exit_code


def set_lr_scale(engines: dict, base_lrs: dict[str, float], scale: float) -> None:
    """Every engine's LambdaLR base lr = its configured lr x ``scale``; the current lr (base x
    the schedule's factor at the current step) follows at once."""
    for name, engine in engines.items():
        sched = engine.lr_scheduler
        sched.base_lrs = [base_lrs[name] * scale for _ in sched.base_lrs]
        for group, base, factor in zip(
            sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
        ):
            group["initial_lr"] = base
            group["lr"] = base * factor(sched.last_epoch)


def healthy_checkpoint_before(root: str | Path | None, step: int) -> Path | None:
    """The newest complete checkpoint under ``root`` saved at a step < ``step`` that was
    healthy when saved (``trainer_state.json`` ``health.healthy``; checkpoints written before
    the detector existed count as healthy), or None."""
    if not root:
        return None
    for s, d in reversed(list_checkpoints(root)):
        if s < step:
            state = json.loads((d / "trainer_state.json").read_text())
            if state.get("health", {}).get("healthy", True):
                return d
    return None


def retire_checkpoints_after(root: str | Path, step: int, label: str) -> None:
    """Move the checkpoints of steps > ``step`` to ``root/rolled_back/label/`` and point
    ``latest`` at ``step`` (rank 0 only; the caller synchronizes)."""
    root = Path(root)
    for s, d in list_checkpoints(root):
        if s > step:
            dest = root / ROLLED_BACK / label
            dest.mkdir(parents=True, exist_ok=True)
            shutil.move(str(d), str(dest / d.name))
    tmp = root / f"{LATEST}.tmp-rollback"
    tmp.write_text(str(step))
    tmp.replace(root / LATEST)


class CollapseGuard:
    """The trainer's collapse policy: feeds the detector at each log step and acts on it.

    ``trainer`` provides ``cfg``, ``rank``, ``step``, ``engines``, ``base_lrs``, ``metrics``
    (the rank-0 logger) and ``restore(dir) -> trainer_state`` (loads a checkpoint in place)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg = trainer.cfg.health
        self.detector = CollapseDetector(self.cfg)
        self.lr_scale, self.rollbacks = 1.0, 0

    # -- state in trainer_state.json -----------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "health": self.detector.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """On ``--load``: the cumulative lr scale and rollback count, the detector's streaks."""
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.detector.load_state_dict(state.get("health", {}))
        t = self.trainer
        set_lr_scale(t.engines, t.base_lrs, self.lr_scale)

    # -- the policy ------------------------------------------------------------------------
    def after_log(self, step: int, values: dict[str, float]) -> bool:
        """Feed one log step's reduced metrics; returns True when the run was rolled back (the
        trainer's step counter then holds the reloaded checkpoint's step). Raises
        :class:`TrainingStopped` on every rank when the policy stops the run."""
        det = self.detector.observe(step, values)
        if det is None:
            return False
        action = self.cfg.on_collapse
        self._event(step, "collapse", {**det.record(), "action": action})
        if action == "warn":
            self._say(
                f"WARNING: step {step}: {det.describe()}. on_collapse=warn: training goes on. "
                "Look at samples; consider --on-collapse rollback, a lower lr, a larger "
                "r1_lambda/r1_sigma or an earlier (EMA) checkpoint."
            )
            return False
        if action == "stop":
            self._stop(det, "on_collapse=stop")
        if self.rollbacks >= self.cfg.max_rollbacks:
            self._stop(det, f"on_collapse=rollback, and {self.rollbacks} rollbacks were allowed")
        target = self._choose(det)
        if target is None:
            self._stop(
                det,
                f"on_collapse=rollback, but no checkpoint in {self.trainer.cfg.save} was "
                f"healthy and saved before step {det.streak_start}",
            )
        self._rollback(det, target)
        return True

    def _choose(self, det: Detection) -> Path | None:
        choice = [None]
        if self.trainer.rank == 0:
            d = healthy_checkpoint_before(self.trainer.cfg.save, det.streak_start)
            choice = [None if d is None else str(d)]
        dist.broadcast_object_list(choice, src=0)
        return None if choice[0] is None else Path(choice[0])

    def _rollback(self, det: Detection, target: Path) -> None:
        t, from_step = self.trainer, self.trainer.step
        state = t.restore(target)
        self.rollbacks += 1
        self.lr_scale *= self.cfg.rollback_lr_factor
        set_lr_scale(t.engines, t.base_lrs, self.lr_scale)
        self.detector.reset()
        if t.rank == 0:
            retire_checkpoints_after(t.cfg.save, state["step"], f"{self.rollbacks}")
        dist.barrier()
        lrs = {n: e.optimizer.param_groups[0]["lr"] for n, e in t.engines.items()}
        self._event(
            from_step,
            "rollback",
            {
                "condition": det.condition,
                "to_step": state["step"],
                "checkpoint": str(target),
                "lr_scale": self.lr_scale,
                "lr": lrs,
                "rollbacks": self.rollbacks,
            },
        )
        self._say(
            f"ROLLBACK {self.rollbacks}/{self.cfg.max_rollbacks}: step {from_step}: "
            f"{det.describe()}; reloaded {target} (step {state['step']}), learning rates x"
            f"{self.cfg.rollback_lr_factor} -> scale {self.lr_scale:g} ({lrs})"
        )

    def _stop(self, det: Detection, why: str) -> None:
        last = healthy_checkpoint_before(self.trainer.cfg.save, det.streak_start)
        where = (
            f"the last healthy checkpoint is {last}"
            if last
            else "there is no healthy checkpoint"
            + ("" if self.trainer.cfg.save else " (no --save)")
        )
        message = (
            f"step {det.step}: {det.describe()}. {why}: stopping, nothing more is saved; {where}"
        )
        self._event(
            det.step,
            "stop",
            {
                "condition": det.condition,
                "reason": why,
                "last_healthy_checkpoint": last and str(last),
            },
        )
        self._say(f"STOP: {message}")
        raise TrainingStopped(message)

    # -- output -----------------------------------------------------------------------------
    def _event(self, step: int, name: str, fields: dict) -> None:
        if self.trainer.metrics is not None:
            self.trainer.metrics.event(step, name, fields)

    def _say(self, line: str) -> None:
        if self.trainer.rank == 0:
            print(line, flush=True)
