"""The ablation study's report (examples/apt_study.py -> docs/study.md): per arm and seed the
evaluation row (FD with its 95 % interval, background noise, sharpness, saturation, caption
accuracy) and the APT run's health, and a verdict per arm against the demo recipe's APT run
of the same seed, decided by disjoint FD intervals only (never by a point estimate).
An arm may name another reference (the longer runs: APT of the same length) or none (APT
itself: against the consistency model it starts from). Rows of the raw generators (the
weights D trains against, beside the EMA the demo ships) form a second table.

Verdict words, per seed: ``lower`` / ``higher`` (FD intervals disjoint), ``overlap``
(within the noise of the measurement), ``collapsed`` (a collapse event, or FD more than twice
the consistency model's it started from). An arm's line counts them over the seeds.

What the paper predicts for an arm (``expect``) is a set of verdicts: ``{"lower"}`` for APT
against its start, ``{"higher", "collapsed"}`` for an ablation the paper says hurts,
``{"overlap"}`` for a change it calls equivalent, ``{"lower", "overlap"}`` for one it says
does not hurt; the claims table says per arm in how many seeds the measurement matched.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_apt.evaluation.checks import fd_separated

START = "consistency 1 step (start)"
REFERENCE = "apt"
COLLAPSE_FACTOR = 2.0


def row_name(arm: str, seed: int) -> str:
    return f"{arm} / seed {seed}"


def raw_key(arm: str) -> str:
    """The report's key of an arm's raw-generator rows."""
    return f"{arm}-raw"


@dataclass(frozen=True)
class ReportArm:
    """One arm of the report: its title, the paper's claim, the verdicts the paper predicts,
    the arm it is compared against (None: the starting consistency model) and whether its
    rows are raw-generator rows (the second table)."""

    title: str
    paper: str = ""
    expect: frozenset = frozenset()
    reference: str | None = REFERENCE
    raw: bool = False


def seed_verdict(row: Mapping, ref: Mapping, start: Mapping, events: Sequence[str]) -> str:
    """One arm-seed row against the reference row of the same seed (see module docstring)."""
    if any(e.startswith("collapse") for e in events) or row["fd"] > COLLAPSE_FACTOR * start["fd"]:
        return "collapsed"
    if fd_separated(row, ref):
        return "lower"
    if fd_separated(ref, row):
        return "higher"
    return "overlap"


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


@dataclass
class StudyReport:
    arms: Mapping[str, ReportArm]
    seeds: Sequence[int]
    results: Mapping  # tools/evaluate.py JSON
    health: Mapping[tuple[str, int], Mapping]  # (arm, seed) -> events, d_acc_real/fake, loss_d
    recipe: object = None  # the demo-apt TrainConfig
    seconds: float = 0.0
    figures: Mapping[str, Path] = field(default_factory=dict)
    quick: bool = False
    base_seed: int = 0  # seed of the shared diffusion + consistency pair
    # rows of results["rows"] shown as floors beside real data (the real clips through the VAE,
    # the teacher): no verdict; their sample count is printed when it differs from the start's
    references: Sequence[str] = ()

    def row(self, arm: str, seed: int) -> Mapping:
        return self.results["rows"][row_name(arm, seed)]

    def verdicts(self, arm: str) -> list[str]:
        """Per seed: the arm against its reference arm of the same seed (APT: the start)."""
        start, ref_arm = self.results["rows"][START], self.arms[arm].reference
        out = []
        for s in self.seeds:
            ref = start if ref_arm is None else self.row(ref_arm, s)
            out.append(seed_verdict(self.row(arm, s), ref, start, self.health[(arm, s)]["events"]))
        return out

    def summary(self) -> dict:
        out = {}
        for arm in self.arms:
            rows = [self.row(arm, s) for s in self.seeds]
            out[arm] = {
                "fd": [r["fd"] for r in rows],
                "fd_ci": [r.get("fd_ci") for r in rows],
                "background_noise": [r.get("background_noise") for r in rows],
                "sharpness_ratio": [r.get("sharpness_ratio") for r in rows],
                "saturation_distance": [r.get("saturation_distance") for r in rows],
                "caption_all": [r["caption_all"] for r in rows],
                "verdicts": self.verdicts(arm),
                "health": [dict(self.health[(arm, s)]) for s in self.seeds],
            }
        return out

    # ---- Markdown ---------------------------------------------------------------------------
    def _count(self, arm: str) -> str:
        v = self.verdicts(arm)
        words = ("lower", "overlap", "higher", "collapsed")
        return ", ".join(f"{w} {v.count(w)}/{len(v)}" for w in words if v.count(w))

    def _vs(self, arm: str) -> str:
        ref = self.arms[arm].reference
        if ref is None:
            return "vs start: " + self._count(arm)
        if ref in (REFERENCE, raw_key(REFERENCE)):  # the column's header says it
            return self._count(arm)
        return f"vs {self.arms[ref].title}: " + self._count(arm)

    def _table(self, raw: bool = False) -> list[str]:
        lines = [
            "| arm | FD ↓ per seed [95 % CI] | mean FD | background noise | sharpness ratio | "
            "saturation distance | caption all | D acc real / fake (2nd half) | events | "
            "vs APT, same seed |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        start = self.results["rows"][START]
        fixed = [("real data (floor)", self.results["real"])]
        for name in self.references:
            row = self.results["rows"][name]
            n = row.get("num_samples")
            if n is not None and n != start.get("num_samples"):
                name += f" ({n} samples: FD not comparable)"
            fixed.append((name, row))
        for name, row in (*(() if raw else fixed), (START, start)):
            lines.append(
                f"| {name} | {row['fd']:.1f} [{row['fd_ci'][0]:.1f}, {row['fd_ci'][1]:.1f}] | "
                f"{row['fd']:.1f} | {_fmt(row.get('background_noise'), '.3f')} | "
                f"{_fmt(row.get('sharpness_ratio'))} | "
                f"{_fmt(row.get('saturation_distance'), '.3f')} | {row['caption_all']:.2f} | "
                "– | – | – |"
            )
        for arm, spec in self.arms.items():
            if spec.raw != raw:
                continue
            rows = [self.row(arm, s) for s in self.seeds]
            hs = [self.health[(arm, s)] for s in self.seeds]
            fds = "<br>".join(
                f"{r['fd']:.1f} [{r['fd_ci'][0]:.1f}, {r['fd_ci'][1]:.1f}]" for r in rows
            )
            events = sum(len(h["events"]) for h in hs)
            acc = (
                f"{_fmt(_mean([h['d_acc_real'] for h in hs]))} / "
                f"{_fmt(_mean([h['d_acc_fake'] for h in hs]))}"
            )
            lines.append(
                f"| {spec.title} | {fds} | {_mean([r['fd'] for r in rows]):.1f} | "
                f"{_fmt(_mean([r.get('background_noise') for r in rows]), '.3f')} | "
                f"{_fmt(_mean([r.get('sharpness_ratio') for r in rows]))} | "
                f"{_fmt(_mean([r.get('saturation_distance') for r in rows]), '.3f')} | "
                f"{_mean([r['caption_all'] for r in rows]):.2f} | {acc} | {events} | "
                f"{self._vs(arm)} |"
            )
        return lines

    def reproduced(self, arm: str) -> str:
        """``yes`` / ``partly (k/n)`` / ``no`` / ``–`` (no prediction): the seeds whose verdict
        is one the paper predicts."""
        expect = self.arms[arm].expect
        if not expect:
            return "–"
        v = self.verdicts(arm)
        k = sum(x in expect for x in v)
        return "yes" if k == len(v) else "no" if k == 0 else f"partly ({k}/{len(v)})"

    def _claims(self) -> list[str]:
        lines = [
            "| arm | the paper | predicts | measured here (per seed) | reproduced? |",
            "|---|---|---|---|---|",
        ]
        for arm, spec in self.arms.items():
            pred = " or ".join(sorted(spec.expect)) or "–"
            title = f"{spec.title} (raw generator)" if spec.raw else spec.title
            lines.append(
                f"| {title} | {spec.paper} | {pred} | {', '.join(self.verdicts(arm))} | "
                f"{self.reproduced(arm)} |"
            )
        return lines

    def _raw_section(self) -> list[str]:
        if not any(a.raw for a in self.arms.values()):
            return []
        decay = f" (decay {self.recipe.ema_decay:g})" if self.recipe is not None else ""
        return [
            "### Raw generators",
            "",
            "The same runs, sampled from the generator's current weights (what D is training "
            f"against) instead of its EMA{decay}. The EMA is what the demo ships, but with a "
            "decay near 1 it still holds part of the consistency weights it started from and "
            "lags behind the adversarial game; a run that degrades shows it here first. "
            "Verdicts: against the raw generator of the reference arm, same seed.",
            "",
            *self._table(raw=True),
            "",
        ]

    def markdown(self, relative_to: Path | None = None) -> str:
        rel = lambda p: Path(p).relative_to(relative_to) if relative_to else Path(p)  # noqa: E731
        r = self.recipe
        head = [
            "# The paper's ablations at toy scale",
            "",
            "Produced by `make study` (`examples/apt_study.py`); every number below is read off "
            "its runs. One shared diffusion + consistency pair (the demo's recipes, seed "
            f"{self.base_seed}); per arm one APT run per seed "
            f"({', '.join(map(str, self.seeds))}) from it (the longer arms continue the "
            "shorter ones' runs from their last checkpoint); 1-step samples of each run's EMA "
            "generator (and, for the arms of the second table, its raw generator) on the "
            "held-out prompts, all scored in one `tools/evaluate.py` call "
            f"against the same {self.results.get('reference', {}).get('num_samples', '?')} "
            "real clips.",
            "",
        ]
        if self.quick:
            head += ["**Quick run (a few updates per arm): the numbers mean nothing.**", ""]
        if r is not None:
            head += [
                f"Recipe `{r.recipe}`: {r.train_iters} updates ({r.d_warmup_iters} D-only "
                f"warm-up), global batch {r.global_batch_size}, lr G {r.optim.lr:g} / D "
                f"{r.optim.lr_d or r.optim.lr:g} ({r.optim.name}), sigma {r.r1_sigma:g} "
                f"({r.r1_noise_std}), lambda {r.r1_lambda:g}, EMA {r.ema_decay:g}. "
                "Time of its runs and samples (the sum of its steps; the evaluation comes on "
                f"top): {self.seconds / 60:.0f} min on this machine.",
                "",
            ]
        rows = self.results["rows"]
        sizes = {r.get("num_samples") for k, r in rows.items() if k not in self.references}
        sizes = sorted(sizes - {None})
        n = " or ".join(map(str, sizes)) or "?"
        body = [
            "## Results",
            "",
            *self._table(),
            "",
            "FD: Fréchet distance in the feature space of a small CNN trained on the synthetic "
            f"data, {n} samples per row, 95 % percentile bootstrap interval centred on the "
            "estimate. Verdicts compare FD intervals only: `lower`/`higher` = disjoint "
            "intervals, `overlap` = not distinguishable with this many samples, `collapsed` = "
            f"a collapse event or FD above {COLLAPSE_FACTOR:g}x the starting consistency "
            "model's. Background noise: mean |pixel - 3x3 median| on the background (0-255; "
            "real data 0). D accuracy: share of real (fake) samples on the right side of 0, "
            "mean over the second half of the run and over seeds.",
            "",
            *self._raw_section(),
            "## The paper's claims against these runs",
            "",
            *self._claims(),
            "",
        ]
        figs = []
        if "health" in self.figures:
            figs += [
                "## Health of the first seed's runs",
                "",
                f"![health]({rel(self.figures['health'])})",
                "",
            ]
        if "samples" in self.figures:
            figs += [
                "## Samples of the first seed (the same prompts and noise in every row)",
                "",
                f"![samples]({rel(self.figures['samples'])})",
                "",
            ]
        return "\n".join(head + body + figs)
