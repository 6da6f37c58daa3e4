"""Verdicts of the ablation study (examples/apt_study.py): per seed, an arm against its reference
arm from disjoint 95 % FD intervals only (``lower`` / ``higher`` / ``overlap``) or
``collapsed``; per arm, the outcome word against the paper's prediction (``reproduced``,
``partly``, ``opposite``, ``not reproduced``, ``no prediction``); and when D counts as
saturated. :mod:`megatron_apt.evaluation.study_report` writes them into docs/study.md."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from megatron_apt.evaluation.checks import fd_separated

COLLAPSE_FACTOR = 2.0
# D saturated (the report's criterion, on a run's second-half means): accuracy on real and on
# fake samples both at least SATURATED_ACC, or loss_D below SATURATED_LOSS_D (the collapse
# detector's loss_d threshold, HealthConfig.saturated_loss_d; the detector itself also needs
# it for 3 consecutive log steps with balanced accuracy >= 0.98).
SATURATED_ACC = 0.95
SATURATED_LOSS_D = 0.05

# outcome words, in the order the narrative groups them
OUTCOMES = ("reproduced", "partly", "opposite", "not reproduced", "no prediction")
# the direction of a verdict: better (-1), not distinguishable (0), worse (+1)
DIRECTION = {"lower": -1, "overlap": 0, "higher": 1, "collapsed": 1}
VERDICT_WORDS = ("lower", "overlap", "higher", "collapsed")


def separated(better: Mapping, worse: Mapping) -> bool:
    """``better``'s whole FD interval lies below ``worse``'s; False when either row has no
    interval (a point estimate decides nothing)."""
    if not better.get("fd_ci") or not worse.get("fd_ci"):
        return False
    return fd_separated(better, worse)


def interval_verdict(row: Mapping, ref: Mapping) -> str:
    """``lower`` / ``higher`` (disjoint FD intervals) or ``overlap``: ``row`` against ``ref``."""
    return "lower" if separated(row, ref) else "higher" if separated(ref, row) else "overlap"


def collapse_reasons(row: Mapping, start: Mapping, events: Sequence[str]) -> tuple[bool, bool]:
    """(a collapse event in the run, FD above COLLAPSE_FACTOR x the start's FD)."""
    return (
        any(e.startswith("collapse") for e in events),
        row["fd"] > COLLAPSE_FACTOR * start["fd"],
    )


def seed_verdict(row: Mapping, ref: Mapping, start: Mapping, events: Sequence[str]) -> str:
    """One arm-seed row against the reference row of the same seed (see module docstring)."""
    if any(collapse_reasons(row, start, events)):
        return "collapsed"
    return interval_verdict(row, ref)


def is_opposite(verdict: str, expect: frozenset) -> bool:
    """A seed's verdict is the contrary of the prediction: it is not predicted, it has a
    direction (``lower``: better; ``higher`` / ``collapsed``: worse; ``overlap`` has none), and
    every direction the prediction names is the other one. So: predicted ``higher`` and/or
    ``collapsed`` (worse) but measured ``lower``; predicted ``lower`` (with or without
    ``overlap``: better, or not worse) but measured ``higher`` or ``collapsed``. A prediction
    of ``overlap`` alone (equivalent) has no direction: no verdict is opposite to it (a
    ``lower`` or ``higher`` seed only fails to reproduce it)."""
    d = DIRECTION[verdict]
    predicted = {DIRECTION[e] for e in expect} - {0}
    return d != 0 and verdict not in expect and predicted == {-d}


@dataclass(frozen=True)
class Outcome:
    """An arm's outcome over its seeds: ``word`` (one of OUTCOMES), the seeds whose verdict is
    predicted (``matched``), contrary to the prediction (``opposite``), of ``seeds``."""

    word: str
    matched: int
    opposite: int
    seeds: int

    @property
    def label(self) -> str:
        n = self.seeds
        if self.word == "partly":
            return f"partly ({self.matched} of {n} {seeds_word(n)})"
        if self.word == "opposite":
            also = f"; as predicted in {self.matched} of {n}" if self.matched else ""
            return f"opposite ({self.opposite} of {n} {seeds_word(n)}{also})"
        return self.word


def outcome(verdicts: Sequence[str], expect: frozenset) -> Outcome:
    """The outcome word of an arm from its per-seed verdicts and the predicted set:

    * ``no prediction``: ``expect`` is empty;
    * ``reproduced``: every seed's verdict is in ``expect``;
    * ``opposite``: any seed's verdict is the contrary of the prediction (:func:`is_opposite`),
      even when other seeds reproduce it (the label gives both counts);
    * ``partly``: some seeds' verdicts, not all, are in ``expect`` and none is opposite;
    * ``not reproduced``: no seed's verdict is in ``expect`` and none is opposite.
    """
    n = len(verdicts)
    if not expect:
        return Outcome("no prediction", 0, 0, n)
    k = sum(v in expect for v in verdicts)
    o = sum(is_opposite(v, expect) for v in verdicts)
    word = (
        "reproduced" if k == n
        else "opposite" if o
        else "partly" if k
        else "not reproduced"
    )  # fmt: skip
    return Outcome(word, k, o, n)


def d_saturated(health: Mapping) -> bool | None:
    """D saturated over a run's second half: mean accuracy on real and on fake samples both
    >= SATURATED_ACC, or mean loss_D < SATURATED_LOSS_D. None when D logged nothing."""
    real, fake, loss = health.get("d_acc_real"), health.get("d_acc_fake"), health.get("loss_d")
    if real is None or fake is None:
        return None
    return (real >= SATURATED_ACC and fake >= SATURATED_ACC) or (
        loss is not None and loss < SATURATED_LOSS_D
    )


SATURATION_CRITERION = (
    f"mean accuracy over the run's second half >= {SATURATED_ACC:g} on both real and fake, or "
    f"mean loss_D there < {SATURATED_LOSS_D:g} (the collapse detector's loss_D threshold)"
)


def seeds_word(n: int) -> str:
    return "seed" if n == 1 else "seeds"
