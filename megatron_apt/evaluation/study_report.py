"""The ablation study's report (examples/apt_study.py -> docs/study.md): per arm and seed the
evaluation row (FD with its 95 % interval, caption-conditional FD, background noise, sharpness,
saturation, caption accuracy) and the APT run's health, and a verdict per arm against the demo
recipe's APT run of the same seed, decided by disjoint FD intervals only (never by a point
estimate). An arm may name another reference (the longer runs: APT of the same length) or none
(APT itself: against the consistency model it starts from). Rows of the raw generators (the
weights D trains against, beside the EMA the demo ships) form a second table.

Verdict words, per seed: ``lower`` / ``higher`` (FD intervals disjoint), ``overlap``
(within the noise of the measurement, or a row without an interval), ``collapsed`` (a collapse
event, or FD more than twice the consistency model's it started from).

What the paper predicts for an arm (``expect``) is a set of verdicts: ``{"lower"}`` for APT
against its start, ``{"higher", "collapsed"}`` for an ablation the paper says hurts,
``{"overlap"}`` for a change it calls equivalent, ``{"lower", "overlap"}`` for one it says
does not hurt. An arm's outcome word (:func:`outcome`) is computed from its per-seed verdicts
and ``expect`` only; the report's narrative ("What the runs show") is one generated line per
arm with that word, the counts of seeds behind it and the intervals, plus D's health facts
(:func:`d_saturated`, events) from the runs' logs. Nothing in it rests on a mean or a point
estimate; hand-written context goes to a marked section at the end (``markdown(context=)``).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_apt.evaluation.verdicts import (  # noqa: F401  (re-exported)
    COLLAPSE_FACTOR,
    DIRECTION,
    OUTCOMES,
    SATURATED_ACC,
    SATURATED_LOSS_D,
    SATURATION_CRITERION,
    VERDICT_WORDS,
    Outcome,
    collapse_reasons,
    d_saturated,
    interval_verdict,
    is_opposite,
    outcome,
    seed_verdict,
    seeds_word,
    separated,
)

START = "consistency 1 step (start)"
REFERENCE = "apt"
# The seeds some choice of the `demo-apt` recipe was made on: its EMA decay and R1 sigma were
# chosen on seed 1's chain (the comment above the demo recipes in megatron_apt/config/recipes.py:
# "Chosen on seed 1's chain ...; seeds 2 and 3 were run only after the choice"). The report's
# figures show a seed outside this tuple when the study has one (apt_study.py --figure-seed).
TUNED_ON_SEEDS: tuple[int, ...] = (1,)


def row_name(arm: str, seed: int) -> str:
    return f"{arm} / seed {seed}"


def raw_key(arm: str) -> str:
    """The report's key of an arm's raw-generator rows."""
    return f"{arm}-raw"


def figure_seed(seeds: Sequence[int], tuned: Sequence[int] = TUNED_ON_SEEDS) -> int:
    """The seed of the report's figures: the first of ``seeds`` no recipe choice was made on
    (not in ``tuned``), else the first seed (the report then says it is a tuning seed)."""
    return next((s for s in seeds if s not in tuned), seeds[0])


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


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def _with_ci(row: Mapping, key: str, spec: str = ".1f") -> str:
    """``value [low, high]`` (``value`` without an interval, ``–`` without a value)."""
    v, ci = row.get(key), row.get(f"{key}_ci")
    if v is None:
        return "–"
    return format(v, spec) + (f" [{format(ci[0], spec)}, {format(ci[1], spec)}]" if ci else "")


def _range(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    lo, hi = f"{min(vals):.2f}", f"{max(vals):.2f}"
    return lo if lo == hi else f"{lo}-{hi}"


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
    figure_seed: int | None = None  # the seed of the figures (None: the first seed)
    figure_prompts: int = 0  # held-out prompts per row of the sample figure (0: not said)
    tuned_on: Sequence[int] = TUNED_ON_SEEDS

    def row(self, arm: str, seed: int) -> Mapping:
        return self.results["rows"][row_name(arm, seed)]

    def _ref_row(self, arm: str, seed: int) -> Mapping:
        ref = self.arms[arm].reference
        return self.results["rows"][START] if ref is None else self.row(ref, seed)

    def verdicts(self, arm: str) -> list[str]:
        """Per seed: the arm against its reference arm of the same seed (APT: the start)."""
        start = self.results["rows"][START]
        return [
            seed_verdict(self.row(arm, s), self._ref_row(arm, s), start, self._events(arm, s))
            for s in self.seeds
        ]

    def _events(self, arm: str, seed: int) -> list[str]:
        return list(self.health[(arm, seed)]["events"])

    def outcome(self, arm: str) -> Outcome:
        return outcome(self.verdicts(arm), self.arms[arm].expect)

    def reproduced(self, arm: str) -> str:
        """The outcome label of an arm (:func:`outcome`), as the claims table prints it."""
        return self.outcome(arm).label

    def summary(self) -> dict:
        out = {}
        for arm in self.arms:
            rows = [self.row(arm, s) for s in self.seeds]
            o = self.outcome(arm)
            out[arm] = {
                "fd": [r["fd"] for r in rows],
                "fd_ci": [r.get("fd_ci") for r in rows],
                "cfd": [r.get("cfd") for r in rows],
                "cfd_ci": [r.get("cfd_ci") for r in rows],
                "background_noise": [r.get("background_noise") for r in rows],
                "sharpness_ratio": [r.get("sharpness_ratio") for r in rows],
                "saturation_distance": [r.get("saturation_distance") for r in rows],
                "caption_all": [r["caption_all"] for r in rows],
                "caption_all_ci": [r.get("caption_all_ci") for r in rows],
                "verdicts": self.verdicts(arm),
                "outcome": o.word,
                "outcome_label": o.label,
                "health": [dict(self.health[(arm, s)]) for s in self.seeds],
                "d_saturated": [d_saturated(self.health[(arm, s)]) for s in self.seeds],
            }
        return out

    # ---- the narrative ----------------------------------------------------------------------
    def _per_seed(self, rows: Sequence[Mapping]) -> str:
        return " / ".join(_with_ci(r, "fd") for r in rows)

    def _seeds_text(self) -> str:
        """``seeds 1 / 2 / 3`` (``seed 5``)."""
        return f"{seeds_word(len(self.seeds))} " + " / ".join(map(str, self.seeds))

    def _generator(self, arm: str) -> str:
        return "raw generator" if self.arms[arm].raw else "EMA generator"

    def _evidence(self, arm: str) -> str:
        """The verdict counts of an arm with what decided them."""
        v, n = self.verdicts(arm), len(self.seeds)
        start = self.results["rows"][START]
        parts = []
        for w in VERDICT_WORDS:
            k = v.count(w)
            if not k:
                continue
            if w == "overlap":
                bare = sum(
                    not (self.row(arm, s).get("fd_ci") and self._ref_row(arm, s).get("fd_ci"))
                    for s, x in zip(self.seeds, v, strict=True)
                    if x == "overlap"
                )
                note = f" ({bare} without an interval)" if bare else ""
                parts.append(f"intervals overlap in {k} of {n} {seeds_word(n)}{note}")
            elif w == "collapsed":
                why = [
                    collapse_reasons(self.row(arm, s), start, self._events(arm, s))
                    for s, x in zip(self.seeds, v, strict=True)
                    if x == "collapsed"
                ]
                parts.append(
                    f"collapsed in {k} of {n} {seeds_word(n)} (FD above {COLLAPSE_FACTOR:g}x the "
                    f"start's in {sum(f for _, f in why)}, a collapse event in "
                    f"{sum(e for e, _ in why)})"
                )
            else:
                parts.append(f"{w} in {k} of {n} {seeds_word(n)} (intervals disjoint)")
        return ", ".join(parts)

    def _arm_line(self, arm: str) -> str:
        spec, o = self.arms[arm], self.outcome(arm)
        ref = spec.reference
        rows = [self.row(arm, s) for s in self.seeds]
        if ref is None:
            against = "the consistency start"
            ref_fds = _with_ci(self.results["rows"][START], "fd")
        else:
            against = f"{self.arms[ref].title} (`{ref}`, {self._generator(ref)}), same seed"
            ref_fds = self._per_seed([self.row(ref, s) for s in self.seeds])
        pred = " or ".join(sorted(spec.expect)) or "none"
        paper = f"The paper: {spec.paper}; predicted" if spec.paper else "Predicted"
        return (
            f"- **{o.label}**: {self._evidence(arm)}. {spec.title} (`{arm}`, "
            f"{self._generator(arm)}) against {against}. {paper}: {pred}. FD of "
            f"{self._seeds_text()}: {self._per_seed(rows)} vs {ref_fds}."
        )

    def _ema_vs_raw(self) -> list[str]:
        lines = []
        n = len(self.seeds)
        for arm, spec in self.arms.items():
            raw = raw_key(arm)
            if spec.raw or raw not in self.arms:
                continue
            ema_rows = [self.row(arm, s) for s in self.seeds]
            raw_rows = [self.row(raw, s) for s in self.seeds]
            v = [interval_verdict(e, r) for e, r in zip(ema_rows, raw_rows, strict=True)]
            counts = ", ".join(
                f"intervals overlap in {v.count(w)} of {n} {seeds_word(n)}"
                if w == "overlap"
                else f"EMA {w} in {v.count(w)} of {n} {seeds_word(n)} (intervals disjoint)"
                for w in ("lower", "overlap", "higher")
                if v.count(w)
            )
            lines.append(
                f"- {spec.title} (`{arm}` vs `{raw}`): {counts}. FD of "
                f"{self._seeds_text()}: {self._per_seed(ema_rows)} (EMA) vs "
                f"{self._per_seed(raw_rows)} (raw)."
            )
        return lines

    def _health_lines(self) -> list[str]:
        """D's health per arm (ranges over seeds of the second-half means), saturation by
        :func:`d_saturated`, and the events of every run."""
        runs = [(a, s) for a, spec in self.arms.items() if not spec.raw for s in self.seeds]
        events = [f"`{row_name(a, s)}`: {', '.join(self.health[(a, s)]['events'])}"
                  for a, s in runs if self.health[(a, s)]["events"]]  # fmt: skip
        det = ""
        h = getattr(self.recipe, "health", None)
        if h is not None:
            det = (
                f" (its saturation test: balanced accuracy >= {h.saturated_acc:g} and loss_D < "
                f"{h.saturated_loss_d:g} for {h.collapse_patience} consecutive log steps)"
            )
        if events:
            head = (
                f"Events of the collapse detector{det} in {len(events)} of the {len(runs)} runs: "
                + "; ".join(events)
                + "."
            )
        else:
            head = f"No event of the collapse detector{det} in any of the {len(runs)} runs."
        n = len(self.seeds)
        lines = [
            head,
            "",
            f"D per arm: ranges over {self._seeds_text()} of each run's means over its "
            f"second half; D saturated = {SATURATION_CRITERION}.",
            "",
        ]
        for arm, spec in self.arms.items():
            if spec.raw:
                continue
            hs = [self.health[(arm, s)] for s in self.seeds]
            sat = [d_saturated(x) for x in hs]
            if all(x is None for x in sat):
                lines.append(f"- {spec.title} (`{arm}`): no D metrics logged.")
                continue
            lines.append(
                f"- {spec.title} (`{arm}`): D accuracy real "
                f"{_range([x.get('d_acc_real') for x in hs])}, fake "
                f"{_range([x.get('d_acc_fake') for x in hs])}; loss_D "
                f"{_range([x.get('loss_d') for x in hs])}; D saturated in "
                f"{sum(bool(x) for x in sat)} of {n} {seeds_word(n)}."
            )
        return lines

    def _narrative(self) -> list[str]:
        by_word = {w: [a for a in self.arms if self.outcome(a).word == w] for w in OUTCOMES}
        lines = [
            "## What the runs show",
            "",
            "Generated from the runs below (nothing in this section is written by hand). Per "
            "arm, grouped by outcome: the outcome word, the per-seed verdicts behind it (FD "
            "intervals against the arm's reference, same seed) and the FDs with their 95 % "
            "intervals. Outcome words: **reproduced** = every seed's verdict is one the paper "
            "predicts; **partly (k of n seeds)** = some are, none is the contrary; **opposite** "
            "= at least one seed's verdict is the contrary of the prediction (predicted "
            "higher/collapsed, measured lower; or predicted lower, or lower-or-overlap, "
            "measured higher/collapsed), with the counts; **not reproduced** = no seed as "
            "predicted and none the contrary; **no prediction** = the paper makes none.",
            "",
        ]
        for w in OUTCOMES:
            lines += [self._arm_line(a) for a in by_word[w]]
        lines.append("")
        ema_raw = self._ema_vs_raw()
        if ema_raw:
            lines += [
                "### EMA against the raw generator of the same run",
                "",
                "Per seed, the EMA generator's FD interval against the raw generator's (no "
                "prediction: a fact of the runs).",
                "",
                *ema_raw,
                "",
            ]
        lines += ["### The discriminator's health", "", *self._health_lines(), ""]
        return lines

    # ---- tables -----------------------------------------------------------------------------
    def _count(self, arm: str) -> str:
        v = self.verdicts(arm)
        return ", ".join(
            f"{w} {v.count(w)}/{len(v)}" for w in ("lower", "overlap", "higher", "collapsed")
            if v.count(w)
        )  # fmt: skip

    def _vs(self, arm: str) -> str:
        ref = self.arms[arm].reference
        if ref is None:
            return "vs start: " + self._count(arm)
        if ref in (REFERENCE, raw_key(REFERENCE)):  # the column's header says it
            return self._count(arm)
        return f"vs {self.arms[ref].title}: " + self._count(arm)

    def _table(self, raw: bool = False) -> list[str]:
        lines = [
            "| arm | FD ↓ per seed [95 % CI] | mean FD | cFD ↓ per seed [95 % CI] | "
            "background noise | sharpness ratio | saturation distance | caption all [95 % CI] "
            "| D acc real / fake (2nd half) | events | vs APT, same seed |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
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
                f"| {name} | {_with_ci(row, 'fd')} | {row['fd']:.1f} | {_with_ci(row, 'cfd')} | "
                f"{_fmt(row.get('background_noise'), '.3f')} | "
                f"{_fmt(row.get('sharpness_ratio'))} | "
                f"{_fmt(row.get('saturation_distance'), '.3f')} | "
                f"{_with_ci(row, 'caption_all', '.2f')} | – | – | – |"
            )
        for arm, spec in self.arms.items():
            if spec.raw != raw:
                continue
            rows = [self.row(arm, s) for s in self.seeds]
            hs = [self.health[(arm, s)] for s in self.seeds]

            def per_seed(key: str, spec: str = ".1f", rows=rows) -> str:
                if all(r.get(key) is None for r in rows):
                    return "–"
                return "<br>".join(
                    f"seed {s}: {_with_ci(r, key, spec)}"
                    for s, r in zip(self.seeds, rows, strict=True)
                )

            events = sum(len(h["events"]) for h in hs)
            acc = (
                f"{_fmt(_mean([h.get('d_acc_real') for h in hs]))} / "
                f"{_fmt(_mean([h.get('d_acc_fake') for h in hs]))}"
            )
            lines.append(
                f"| {spec.title} (`{arm}`) | {per_seed('fd')} | "
                f"{_mean([r['fd'] for r in rows]):.1f} | {per_seed('cfd')} | "
                f"{_fmt(_mean([r.get('background_noise') for r in rows]), '.3f')} | "
                f"{_fmt(_mean([r.get('sharpness_ratio') for r in rows]))} | "
                f"{_fmt(_mean([r.get('saturation_distance') for r in rows]), '.3f')} | "
                f"{per_seed('caption_all', '.2f')} | {acc} | {events} | {self._vs(arm)} |"
            )
        return lines

    def _claims(self) -> list[str]:
        lines = [
            "| arm | the paper | predicts | measured here (per seed) | reproduced? |",
            "|---|---|---|---|---|",
        ]
        for arm, spec in self.arms.items():
            pred = " or ".join(sorted(spec.expect)) or "–"
            title = f"{spec.title} (raw generator)" if spec.raw else spec.title
            lines.append(
                f"| {title} (`{arm}`) | {spec.paper} | {pred} | "
                f"{', '.join(self.verdicts(arm))} | {self.reproduced(arm)} |"
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
            "lags behind the adversarial game. "
            "Verdicts: against the raw generator of the reference arm, same seed.",
            "",
            *self._table(raw=True),
            "",
        ]

    def _tuning(self, seed: int) -> tuple[str, str]:
        """(a heading's note, a sentence) on whether the recipe was tuned on ``seed``."""
        if seed in self.tuned_on:
            return (
                "a seed the recipe was tuned on",
                f"Seed {seed} is a seed the `demo-apt` recipe was tuned on (the study has no "
                "other seed).",
            )
        tuned = ", ".join(map(str, self.tuned_on))
        return (
            "not a tuning seed",
            f"Seed {seed} is not a tuning seed: no choice of the `demo-apt` recipe was made on "
            f"it (it was tuned on seed {tuned}: megatron_apt/config/recipes.py).",
        )

    def _figures(self, rel) -> list[str]:
        seed = self.seeds[0] if self.figure_seed is None else self.figure_seed
        note, sentence = self._tuning(seed)
        figs = []
        if "health" in self.figures:
            figs += [
                f"## Health of the seed-{seed} runs ({note})",
                "",
                f"The training logs of the APT-stage arms' seed-{seed} runs. {sentence}",
                "",
                f"![health]({rel(self.figures['health'])})",
                "",
            ]
        if "samples" in self.figures:
            first = f"first {self.figure_prompts} " if self.figure_prompts else "first "
            figs += [
                f"## Samples of seed {seed} ({note})",
                "",
                f"The {first}held-out prompts, in order, in every row (real data: the held-out "
                "clips whose captions they are); each arm's row: the EMA generator of its "
                f"seed-{seed} run, sampled with seed {seed}; the start's row: sampled with seed "
                f"{self.base_seed}. {sentence}",
                "",
                f"![samples]({rel(self.figures['samples'])})",
                "",
            ]
        return figs

    def markdown(
        self,
        relative_to: Path | None = None,
        context: str | None = None,
        context_name: str = "study_context.md",
    ) -> str:
        """The report. ``context``: hand-written text (the file ``context_name``,
        docs/study_context.md), included verbatim in a marked section at the end; everything
        else is generated from the runs and depends only on the report's inputs (no clock, no
        machine, no path but the figures' relative to ``relative_to``)."""
        rel = lambda p: Path(p).relative_to(relative_to) if relative_to else Path(p)  # noqa: E731
        r = self.recipe
        base_note = (
            f" (seed {self.base_seed} is a seed the `demo-apt` recipe was tuned on)"
            if self.base_seed in self.tuned_on
            else ""
        )
        head = [
            "# The paper's ablations at toy scale",
            "",
            "Produced by `make study` (`examples/apt_study.py`); every number below is read off "
            "its runs. One shared diffusion + consistency pair (the demo's recipes, seed "
            f"{self.base_seed}{base_note}); per arm one APT run per seed "
            f"({', '.join(map(str, self.seeds))}) from it (the longer arms continue the "
            "shorter ones' runs from their last checkpoint); 1-step samples of each run's EMA "
            "generator (and, for the arms of the second table, its raw generator) on the "
            "held-out prompts, all scored in one `tools/evaluate.py` call "
            f"against the same {self.results.get('reference', {}).get('num_samples', '?')} "
            "real clips. A run's id is `<arm> / seed <n>` (the arm's key is in the tables).",
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
            *self._narrative(),
            "## Results",
            "",
            *self._table(),
            "",
            "FD: Fréchet distance in the feature space of a small network trained on the "
            f"synthetic data, {n} samples per row, 95 % percentile bootstrap interval centred "
            "on the estimate; rows with another sample count are marked and not compared. cFD: "
            "the FD within each caption class, averaged over the classes (– where the "
            "evaluation has none). Verdicts compare FD intervals only: `lower`/`higher` = "
            "disjoint intervals, `overlap` = not distinguishable with this many samples, "
            f"`collapsed` = a collapse event or FD above {COLLAPSE_FACTOR:g}x the starting "
            "consistency model's. Background noise: mean |pixel - 3x3 median| on the "
            "background (0-255; real data 0). Caption all: share of samples whose colour, "
            "shape and motion all match the prompt. D accuracy: share of real (fake) samples "
            "on the right side of 0, mean over the second half of the run and over seeds.",
            "",
            *self._raw_section(),
            "## The paper's claims against these runs",
            "",
            *self._claims(),
            "",
        ]
        md = "\n".join(head + body + self._figures(rel))
        if context is None:
            return md
        tail = [
            "## Context (hand-written, not generated)",
            "",
            f"_Maintained by hand in `{context_name}` and copied here verbatim; everything "
            "above is generated from the runs. It must cite run ids (`<arm> / seed <n>`) for "
            "anything it says about a run, and make no numeric claim the sections above do not "
            "carry._",
            "",
            "",
        ]
        # the file's text as it is (a final newline added when it has none)
        return md + "\n" + "\n".join(tail) + context + ("" if context.endswith("\n") else "\n")
