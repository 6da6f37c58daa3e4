"""Discriminator collapse detection: a pure state machine fed the reduced metrics of each log
step.

Two conditions, on the balanced accuracy ``(d_acc_real + d_acc_fake) / 2`` of D's phase
(``megatron_apt.stages.apt.discriminator_health``):

* **saturated**: balanced accuracy >= ``saturated_acc`` (0.98) and ``loss_d`` (without R1)
  < ``saturated_loss_d`` (0.05) for ``collapse_patience`` (3) consecutive log steps: D tells
  real from fake almost perfectly and G's non-saturating gradient carries little information
  (the collapse the paper reports without R1);
* **blind**: balanced accuracy within ``0.5 +- blind_margin`` (0.03) for ``blind_patience``
  (20) consecutive log steps: D no longer separates anything.

A condition fires once, on the log step where its streak reaches its patience; a log step that
does not meet it resets the streak. A log step without D's metrics (other stages) or with
non-finite ones (a skipped update) leaves the streaks as they are.

Every rank runs its own detector on the values of the trainer's single all-reduce per log step
(the mean over all ranks: every rank receives the same bytes, whatever the TP / CP layout), so
all ranks fire on the same step without another collective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from megatron_apt.config.training import HealthConfig

CONDITIONS = ("saturated", "blind")
# accuracies are shares averaged over micro-batches and ranks: compare the inclusive bounds with
# a slack for their float round-off (0.5 + 0.56 = 1.06 -> 0.53000000000000003 after / 2)
SLACK = 1e-9


@dataclass(frozen=True)
class Detection:
    """A condition that reached its patience at log step ``step``; its streak's first log
    step is ``streak_start`` (checkpoints from before it are candidates for a rollback)."""

    condition: str  # saturated | blind
    step: int
    streak_start: int
    balanced_acc: float
    loss_d: float
    patience: int

    def describe(self) -> str:
        what = {
            "saturated": "D saturated (separates real from fake almost perfectly)",
            "blind": "D blind (balanced accuracy at chance)",
        }[self.condition]
        return (
            f"{what}: balanced accuracy {self.balanced_acc:.3f}, loss_d {self.loss_d:.4f} for "
            f"{self.patience} consecutive log steps (steps {self.streak_start}..{self.step})"
        )

    def record(self) -> dict:
        return asdict(self)


def balanced_accuracy(metrics: Mapping[str, float]) -> float | None:
    """``(d_acc_real + d_acc_fake) / 2``, or None when D's metrics are absent or not finite."""
    try:
        acc = (float(metrics["d_acc_real"]) + float(metrics["d_acc_fake"])) / 2
        loss_d = float(metrics["loss_d"])
    except KeyError:
        return None
    return acc if math.isfinite(acc) and math.isfinite(loss_d) else None


class CollapseDetector:
    """Streaks of the two conditions over log steps; see the module docstring."""

    def __init__(self, cfg: HealthConfig):
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        """Forget every streak (after a rollback: the reloaded state was healthy)."""
        self.streak = dict.fromkeys(CONDITIONS, 0)
        self.start: dict[str, int | None] = dict.fromkeys(CONDITIONS, None)
        self.fired: dict[str, bool] = dict.fromkeys(CONDITIONS, False)

    def _patience(self, condition: str) -> int:
        c = self.cfg
        return c.collapse_patience if condition == "saturated" else c.blind_patience

    def _meets(self, condition: str, acc: float, loss_d: float) -> bool:
        c = self.cfg
        if condition == "saturated":
            return acc >= c.saturated_acc - SLACK and loss_d < c.saturated_loss_d
        return abs(acc - 0.5) <= c.blind_margin + SLACK

    def observe(self, step: int, metrics: Mapping[str, float]) -> Detection | None:
        """Feed one log step's reduced metrics; returns the condition that fires now, if any."""
        acc = balanced_accuracy(metrics)
        if acc is None:
            return None
        loss_d, fired = float(metrics["loss_d"]), None
        for cond in CONDITIONS:
            if not self._meets(cond, acc, loss_d):
                self.streak[cond], self.start[cond], self.fired[cond] = 0, None, False
                continue
            self.streak[cond] += 1
            if self.start[cond] is None:
                self.start[cond] = step
            if self.streak[cond] == self._patience(cond):
                self.fired[cond] = True
                fired = Detection(cond, step, self.start[cond], acc, loss_d, self._patience(cond))
        return fired

    @property
    def healthy(self) -> bool:
        """No condition has fired in a streak that is still going on."""
        return not any(self.fired.values())

    def state_dict(self) -> dict:
        """For trainer_state.json: the streaks, their first steps, and which have fired."""
        return {"healthy": self.healthy, "streak": dict(self.streak), "start": dict(self.start)}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        for cond in CONDITIONS:
            self.streak[cond] = int(state.get("streak", {}).get(cond, 0))
            self.start[cond] = state.get("start", {}).get(cond)
            self.fired[cond] = self.streak[cond] >= self._patience(cond)
