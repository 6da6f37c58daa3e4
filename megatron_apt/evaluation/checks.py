"""The claims a demo run must show, checked from its outputs (``results.json`` of
tools/evaluate.py and the APT run's ``metrics.jsonl``), each as a :class:`Check`.

The claims (the paper's, at toy scale):

* the one-step APT generator is closer to the real data than the consistency model it starts
  from: whole-clip video FD lower with disjoint 95 % bootstrap intervals;
* it is not "sharper" by speckle: its background noise is not above the 25-step teacher's,
  on intervals (APT's interval does not lie wholly above the teacher's) and at the teacher's
  sample count (APT's first N clips, the teacher's prompts);
* the teacher it all starts from follows its captions ("all" caption accuracy >= 0.5);
* the run stayed healthy: no collapse event, and over the second half of the run D's accuracy
  on real and on fake samples stays inside (0.55, 0.95) at every log step (D discriminates
  without saturating). One excuse, and only for a D *at chance* (no value at or above the
  band's top): when APT's FD interval overlaps the real-vs-real one, D at chance is the
  equilibrium, not a failure. A saturated D is never excused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"[{'PASS' if self.passed else 'FAIL'}] {self.name}: {self.detail}"


def _ci(row: Mapping) -> tuple[float, float]:
    lo, hi = row.get("fd_ci") or (row["fd"], row["fd"])
    return float(lo), float(hi)


def _noise(row: Mapping) -> str:
    """``background_noise`` with its interval, when the row has them."""
    v, ci = row.get("background_noise"), row.get("background_noise_ci")
    if v is None:
        return "None"
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def fd_separated(better: Mapping, worse: Mapping) -> bool:
    """``better``'s whole FD interval lies below ``worse``'s."""
    return _ci(better)[1] < _ci(worse)[0]


class BandResult(NamedTuple):
    """:func:`d_accuracy_band`'s answer: ``ok`` (every value inside the band), a one-line
    ``detail``, and whether any value was at or above the band's top (``saturated``) or at or
    below its bottom (``at_chance``)."""

    ok: bool
    detail: str
    saturated: bool = False
    at_chance: bool = False


def d_accuracy_band(
    records: Sequence[Mapping], band: tuple[float, float] = (0.55, 0.95)
) -> BandResult:
    """Whether ``d_acc_real`` and ``d_acc_fake`` stay inside ``band`` at every log step of the
    second half of the run (``step > last_step / 2``), with a one-line summary."""
    steps = [r for r in records if "event" not in r and "d_acc_real" in r]
    if not steps:
        return BandResult(False, "no d_acc_real/d_acc_fake logged")
    half = [r for r in steps if r["step"] > steps[-1]["step"] / 2]
    lo, hi = band
    parts, ok, saturated, at_chance = [], True, False, False
    for key in ("d_acc_real", "d_acc_fake"):
        vals = [float(r[key]) for r in half]
        ok &= all(lo < v < hi for v in vals)
        saturated |= any(v >= hi for v in vals)
        at_chance |= any(v <= lo for v in vals)
        parts.append(f"{key} {min(vals):.2f}..{max(vals):.2f}")
    detail = f"{', '.join(parts)} over {len(half)} log steps (band {lo}..{hi})"
    return BandResult(ok, detail, saturated, at_chance)


def interval_not_above(row: Mapping, other: Mapping, key: str) -> bool | None:
    """Whether ``row``'s ``key`` interval does not lie wholly above ``other``'s (its low end
    is at or below ``other``'s high end); None when either interval is missing."""
    a, b = row.get(f"{key}_ci"), other.get(f"{key}_ci")
    if not a or not b:
        return None
    return a[0] <= b[1]


def demo_checks(
    results: Mapping,
    apt_records: Sequence[Mapping],
    teacher: str = "diffusion 25 steps (CFG)",
    baseline: str = "consistency 1 step",
    apt: str = "APT 1 step",
    apt_at_teacher_n: str | None = "APT 1 step (teacher's N)",
    min_teacher_all: float = 0.5,
    band: tuple[float, float] = (0.55, 0.95),
) -> list[Check]:
    """The demo's claims (module docstring) from ``results`` (tools/evaluate.py JSON: ``real``
    and ``rows``) and the APT run's metrics records (events included). ``apt_at_teacher_n``:
    the row of APT's first clips at the teacher's sample count (the background-noise claim
    compares that one with the teacher; ``apt`` itself when None or absent, which must then
    have the teacher's N)."""
    rows, real = results["rows"], results["real"]
    t, b, a = rows[teacher], rows[baseline], rows[apt]
    (alo, ahi), (blo, bhi) = _ci(a), _ci(b)
    checks = [
        Check(
            f"{apt} video FD below {baseline}, 95 % intervals disjoint",
            fd_separated(a, b),
            f"{a['fd']:.2f} [{alo:.2f}, {ahi:.2f}] vs {b['fd']:.2f} [{blo:.2f}, {bhi:.2f}]",
        ),
    ]
    an = rows.get(apt_at_teacher_n) if apt_at_teacher_n else None
    an = an if an is not None else a
    same_n = an.get("num_samples") == t.get("num_samples")
    not_above = interval_not_above(an, t, "background_noise")
    detail = (
        f"{_noise(an)} vs {_noise(t)} (0-255 units, 95 % bootstrap intervals, N "
        f"{an.get('num_samples')} vs {t.get('num_samples')})"
    )
    if not same_n:
        detail += "; the sample counts differ: not compared"
    checks.append(
        Check(
            f"{apt} background noise not above the 25-step teacher's (intervals, equal N)",
            bool(not_above) and same_n,
            detail,
        )
    )
    checks.append(
        Check(
            f"teacher ({teacher}) caption accuracy 'all' >= {min_teacher_all}",
            t["caption_all"] >= min_teacher_all,
            f"{t['caption_all']:.3f} (colour {t['caption_color']:.2f}, shape "
            f"{t['caption_shape']:.2f}, motion {t['caption_motion']:.2f})",
        )
    )
    events = [r for r in apt_records if "event" in r]
    checks.append(
        Check(
            "no collapse event in the APT run",
            not events,
            ", ".join(f"{e['event']} at step {e['step']}" for e in events) or "none",
        )
    )
    health = d_accuracy_band(apt_records, band)
    detail, ok = health.detail, health.ok
    at_floor = not fd_separated(real, a)
    if not ok and health.saturated:
        detail += "; D saturated (a value at or above the band's top): never excused"
    elif not ok and health.at_chance and at_floor:
        ok = True
        detail += "; D at chance and APT's FD interval overlaps real-vs-real: the equilibrium"
    checks.append(Check("D discriminates without saturating (second half)", ok, detail))
    return checks


def checks_to_json(checks: Sequence[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
