"""The claims a demo run must show, checked from its outputs (``results.json`` of
tools/evaluate.py and the APT run's ``metrics.jsonl``), each as a :class:`Check`.

The claims (the paper's, at toy scale):

* the one-step APT generator is closer to the real data than the consistency model it starts
  from: FD lower with disjoint 95 % bootstrap intervals;
* it is not "sharper" by speckle: its background noise is no higher than the 25-step teacher's;
* the teacher it all starts from follows its captions ("all" caption accuracy >= 0.5);
* the run stayed healthy: no collapse event, and over the second half of the run D's accuracy
  on real and on fake samples stays inside (0.55, 0.95) at every log step (D discriminates
  without saturating), unless APT's FD interval overlaps the real-vs-real one (then D at
  chance is the equilibrium, not a failure).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass


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


def d_accuracy_band(
    records: Sequence[Mapping], band: tuple[float, float] = (0.55, 0.95)
) -> tuple[bool, str]:
    """Whether ``d_acc_real`` and ``d_acc_fake`` stay inside ``band`` at every log step of the
    second half of the run (``step > last_step / 2``), and a one-line summary."""
    steps = [r for r in records if "event" not in r and "d_acc_real" in r]
    if not steps:
        return False, "no d_acc_real/d_acc_fake logged"
    half = [r for r in steps if r["step"] > steps[-1]["step"] / 2]
    lo, hi = band
    parts, ok = [], True
    for key in ("d_acc_real", "d_acc_fake"):
        vals = [float(r[key]) for r in half]
        inside = all(lo < v < hi for v in vals)
        ok &= inside
        parts.append(f"{key} {min(vals):.2f}..{max(vals):.2f}")
    return ok, f"{', '.join(parts)} over {len(half)} log steps (band {lo}..{hi})"


def demo_checks(
    results: Mapping,
    apt_records: Sequence[Mapping],
    teacher: str = "diffusion 25 steps (CFG)",
    baseline: str = "consistency 1 step",
    apt: str = "APT 1 step",
    min_teacher_all: float = 0.5,
    band: tuple[float, float] = (0.55, 0.95),
) -> list[Check]:
    """The demo's claims (module docstring) from ``results`` (tools/evaluate.py JSON: ``real``
    and ``rows``) and the APT run's metrics records (events included)."""
    rows, real = results["rows"], results["real"]
    t, b, a = rows[teacher], rows[baseline], rows[apt]
    (alo, ahi), (blo, bhi) = _ci(a), _ci(b)
    checks = [
        Check(
            f"{apt} FD below {baseline}, 95 % intervals disjoint",
            fd_separated(a, b),
            f"{a['fd']:.1f} [{alo:.1f}, {ahi:.1f}] vs {b['fd']:.1f} [{blo:.1f}, {bhi:.1f}]",
        ),
    ]
    an, tn = a.get("background_noise"), t.get("background_noise")
    checks.append(
        Check(
            f"{apt} background noise no higher than the 25-step teacher's",
            an is not None and tn is not None and an <= tn,
            f"{_noise(a)} vs {_noise(t)} (0-255 units, 95 % bootstrap intervals)",
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
    ok, detail = d_accuracy_band(apt_records, band)
    at_floor = not fd_separated(real, a)
    if not ok and at_floor:
        detail += "; APT's FD interval overlaps real-vs-real: D at chance is the equilibrium"
    checks.append(Check("D discriminates without saturating (second half)", ok or at_floor, detail))
    return checks


def checks_to_json(checks: Sequence[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
