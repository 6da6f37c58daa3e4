#!/usr/bin/env python
"""The paper's ablations at toy scale (`make study`): every arm over several seeds, from one
shared diffusion + consistency pair, scored against one reference set; writes docs/study.md.

    python examples/apt_study.py                     # runs/study, seeds 1 2 3; ~2 h 15 min, 2 cores
    python examples/apt_study.py --seeds 1 2 3 4     # more seeds (finished runs are kept)
    python examples/apt_study.py --arms apt no-r1    # a subset of the arms
    python examples/apt_study.py --quick             # a few steps of everything (the test)
    python examples/apt_study.py --base runs/demo-seed0   # reuse a finished `make demo`
    python examples/apt_study.py --report-only       # re-write docs/study.md, run nothing
    python examples/apt_study.py --figure-seed 3     # the pictures of seed 3's runs

It reuses examples/demo.py's stages: data, vae, preprocess, diffusion and consistency once (in
--base, a demo of seed --base-seed: a finished demo there is reused as it is), then per arm
and seed one training run (`pretrain_apt.py --recipe demo-apt` plus the arm's flags, or
more consistency updates for that control; the "-long" arms continue the run of APT / of no
R1 from its last checkpoint to twice the updates), 1-step samples of its EMA generator on
the held-out prompts (and of the raw generator for the arms whose report has a raw row),
and one tools/evaluate.py call over every run (FD with 95 % bootstrap intervals, background
noise, sharpness and saturation against real data, caption accuracy). Resumable: finished
runs are recorded in OUT/progress.json, an interrupted training run resumes from its
checkpoint. The report (a generated narrative of outcomes per arm, tables, verdicts, health
curves and sample grids of --figure-seed, the hand-written --context at the end) goes to
--report (docs/study.md, pictures in docs/study/). It depends only on OUT's results.json,
progress.json and run logs, the arguments and the context file: --report-only re-creates it
byte for byte.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import LATEST, RECON_FOLDER, RECON_ROW, ROOT, ROWS, Demo  # noqa: E402  (puts ROOT on sys.path)

from megatron_apt.config.recipes import get_recipe  # noqa: E402
from megatron_apt.evaluation.figures import read_metrics  # noqa: E402
from megatron_apt.evaluation.study_report import (  # noqa: E402
    REFERENCE,
    START,
    TUNED_ON_SEEDS,
    ReportArm,
    StudyReport,
    figure_seed,
    raw_key,
    row_name,
)

WORSE = frozenset({"higher", "collapsed"})
# Reference rows beside the arms (the floors the demo's table has too): results-table row ->
# the demo's sample folder and its row key (None: the real clips through the VAE). Made by the
# study unless the base is a finished demo whose samples are reused.
TEACHER_ROW = "teacher: diffusion 25 steps (CFG)"
REFERENCE_ROWS = {
    RECON_ROW: (RECON_FOLDER, None),
    TEACHER_ROW: ROWS["diffusion 25 steps (CFG)"],  # ("diffusion-25", "diffusion")
}
FIGURE_PROMPTS = 6  # samples per row of the sample figure: the first held-out prompts, in order


@dataclass(frozen=True)
class Arm:
    title: str
    flags: tuple[str, ...] = ()
    paper: str = ""  # what the paper says about it
    stage: str = "apt"  # "consistency": the control that trains the distilled model on
    batch: float = 1.0  # global batch relative to the demo recipe's
    # the verdicts (vs the reference arm of the same seed) the paper predicts
    expect: frozenset = field(default_factory=lambda: WORSE)
    reference: str | None = REFERENCE  # the arm it is judged against; None: the start
    length: int = 1  # updates, in multiples of the recipe's
    # the arm whose finished run (same seed) this one continues from its last checkpoint to
    # `length` x the recipe's updates: the same run as one of that length from the start (the
    # APT learning rate is constant; resume is exact), for the cost of the extra updates only
    continues: str | None = None
    raw: bool = False  # also sample the raw generator (not only its EMA): the second table


ARMS: dict[str, Arm] = {
    "apt": Arm(
        "APT (demo recipe)",
        paper="one-step model closer to real data than its init (sec. 4, 5.3)",
        expect=frozenset({"lower"}),
        reference=None,
        raw=True,
    ),
    "d-frozen": Arm(
        "control: D frozen",
        ("--freeze-discriminator",),
        "control: the adversarial gradient of an untrained D (heads at init)",
    ),
    "consistency-more": Arm(
        "control: consistency, same extra updates",
        stage="consistency",
        paper="control: is APT's gain just more training of the distilled model?",
    ),
    "no-r1": Arm(
        "no approximated R1 (lambda 0)",
        ("--r1-lambda", "0"),
        "sec. 5.1, fig. 5: loss_D -> 0 and collapse",
        raw=True,
    ),
    "d-t0": Arm(
        "D at t = 0 only",
        ("--d-timesteps", "zero"),
        "sec. 3.3: t = 0 leads to collapse; the timestep ensemble avoids it",
        raw=True,
    ),
    "one-head": Arm(
        "one head, last layer",
        ("--d-head-layers", "last"),
        "sec. 5.2, fig. 7: multi-layer heads improve structure",
        raw=True,
    ),
    "batch-small": Arm(
        "small batch (1/4)", batch=0.25, paper="app. E: small batches mode-collapse", raw=True
    ),
    "batch-large": Arm(
        "large batch (2x)",
        batch=2.0,
        paper="app. E: larger batches are stable",
        expect=frozenset({"lower", "overlap"}),
    ),
    "r1-sqrt-sigma": Arm(
        "R1 noise std sqrt(sigma)",
        ("--r1-noise-std", "sqrt-sigma"),
        "sec. 3.4 writes N(x, sigma I), 'small variance sigma': std sqrt(sigma)",
        expect=frozenset(),  # a reading of the text, not a claim
    ),
    "adam": Arm(
        "Adam(0, 0.9), bias-corrected",
        ("--optimizer", "adam", "--adam-betas", "0", "0.9"),
        "sec. 3.5: RMSprop(alpha 0.9) 'is equivalent to' Adam(0, 0.9)",
        expect=frozenset({"overlap"}),
    ),
    # twice as long: APT (the paper's app. D: longer training degrades) and the R1 ablation
    # (at the recipe's length D without R1 only heads for saturation: docs/study.md)
    "apt-long": Arm(
        "APT, 2x updates",
        paper="app. D: quality peaks (EMA, 350 G updates); training longer degrades it",
        expect=frozenset({"higher"}),
        length=2,
        continues="apt",
        raw=True,
    ),
    "no-r1-long": Arm(
        "no approximated R1, 2x updates",
        ("--r1-lambda", "0"),
        "sec. 5.1, fig. 5: loss_D -> 0 and collapse",
        reference="apt-long",
        length=2,
        continues="no-r1",
        raw=True,
    ),
}


def with_dependencies(keys) -> dict[str, Arm]:
    """The chosen arms plus APT (the reference of every verdict) and the arms they are judged
    against or continue, in the order of ARMS (an arm after those it needs)."""
    need, todo = set(), ["apt", *keys]
    while todo:
        k = todo.pop()
        if k is not None and k not in need:
            need.add(k)
            todo += [ARMS[k].reference, ARMS[k].continues]
    return {k: a for k, a in ARMS.items() if k in need}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=str(ROOT / "runs" / "study"), help="output folder")
    p.add_argument("--report", default=str(ROOT / "docs" / "study.md"), help="report path")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of every arm")
    p.add_argument("--arms", nargs="+", choices=sorted(ARMS), help="arms to run (default all)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (tests)")
    p.add_argument("--nproc", type=int, default=2, help="training processes")
    p.add_argument(
        "--base",
        help="folder of the shared data, diffusion and consistency runs: a demo's output "
        "(examples/demo.py --out); its finished stages are reused (default: OUT/base)",
    )
    p.add_argument("--base-seed", type=int, default=0, help="seed of the shared runs (default 0)")
    p.add_argument("--verbose", action="store_true", help="show every line of the children")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="re-write the report from OUT's finished runs and evaluation, running nothing",
    )
    p.add_argument(
        "--figure-seed",
        type=int,
        help="seed of the runs in the health and sample figures, one of --seeds (default: the "
        f"first of --seeds the demo-apt recipe was not tuned on, i.e. not in {TUNED_ON_SEEDS})",
    )
    p.add_argument(
        "--context",
        help="hand-written context, included verbatim at the end of the report (default: "
        "<report folder>/<report stem>_context.md, docs/study_context.md, when it exists)",
    )
    args = p.parse_args(argv)
    if args.figure_seed is None:
        args.figure_seed = figure_seed(args.seeds)
    elif args.figure_seed not in args.seeds:
        p.error(f"--figure-seed {args.figure_seed} is not one of --seeds {args.seeds}")
    return args


class Study:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.report = Path(args.report).resolve()
        self.arms = with_dependencies(args.arms or ARMS)
        # the shared pre-stages and every run: a demo of seed --base-seed
        demo_args = argparse.Namespace(
            out=str(args.base or self.out / "base"), quick=args.quick, nproc=args.nproc,
            seed=args.base_seed,
            launcher="deepspeed", redo=None, verbose=args.verbose, strict=False,
        )  # fmt: skip
        self.demo = Demo(demo_args)
        self.recipe = get_recipe("demo-apt")
        self.iters = 3 if args.quick else self.recipe.train_iters
        self.progress_file = self.out / "progress.json"
        self.progress = (
            json.loads(self.progress_file.read_text()) if self.progress_file.is_file() else {}
        )

    # ---- runs -------------------------------------------------------------------------------
    def run_dir(self, arm: str, seed: int) -> Path:
        return self.out / "runs" / arm / f"seed{seed}"

    def start_samples(self) -> Path:
        return self.out / "samples" / "consistency-start"

    def reference_samples(self, row: str) -> Path:
        """A reference row's samples: the base demo's when its generate stage finished."""
        folder = REFERENCE_ROWS[row][0]
        mine, demo = self.out / "samples" / folder, self.demo.p("samples", folder)
        return demo if "generate" in self.demo.progress and demo.is_dir() else mine

    def make_reference(self, row: str) -> None:
        folder, key = REFERENCE_ROWS[row]
        out = self.reference_samples(row)
        if out != self.out / "samples" / folder:
            print(f"[study] {row}: the samples of {self.demo.out}, reused", flush=True)
        elif key is None:
            self.demo.reconstruct(out, "study-generate")
        else:
            prompts, args = self.demo.row_args(key)
            self.demo.generate(out, prompts, self.args.base_seed, args, "study-generate")

    def samples_dir(self, arm: str, seed: int) -> Path:
        """1-step samples of a run (``raw_key(arm)``: of its raw generator)."""
        return self.out / "samples" / f"{arm}-seed{seed}"

    def _batch_flags(self, arm: Arm) -> list[str]:
        if arm.batch == 1.0:
            return []
        r = self.recipe
        micro = (
            r.micro_batch_size if arm.batch >= 1 else max(1, int(r.micro_batch_size * arm.batch))
        )
        glob = max(micro * self.args.nproc, int(r.global_batch_size * arm.batch))
        return ["--micro-batch-size", str(micro), "--global-batch-size", str(glob)]

    def train(self, key: str, seed: int) -> None:
        arm, d, base = self.arms[key], self.run_dir(key, seed), self.demo.p
        d.parent.mkdir(parents=True, exist_ok=True)
        log = f"study-{key}-seed{seed}"
        if arm.stage == "consistency":
            # consistency distillation with this seed, given the updates of the shared run plus
            # those of an APT run (its cosine schedule over all of them): APT's extra updates
            # spent on distillation instead. (Resuming the shared run is not an option: its
            # data order is tied to its seed.)
            cons = 3 if self.args.quick else get_recipe("demo-consistency").train_iters
            extra = ["--init-generator", base("diffusion", "diffusion_ema.safetensors"),
                     "--train-iters", str(cons + self.iters)]  # fmt: skip
            self.demo.train("consistency", extra, d, seed, log)
            return
        extra = [
            "--init-generator", base("consistency", "consistency_ema.safetensors"),
            "--init-discriminator", base("diffusion", "diffusion_ema.safetensors"),
            *arm.flags, *self._batch_flags(arm),
        ]  # fmt: skip
        load = None
        if arm.length != 1:
            extra += ["--train-iters", str(arm.length * self.iters)]
        if arm.continues is not None:
            # resume the shorter run (its flags are this arm's) into this folder, its metrics
            # first so that the health curves and the second-half means cover the whole run
            load = self.run_dir(arm.continues, seed)
            if not (d / LATEST).is_file():
                d.mkdir(exist_ok=True)
                shutil.copy(load / "metrics.jsonl", d / "metrics.jsonl")
        self.demo.train("apt", extra, d, seed, log, load=load)

    def sample(self, key: str, seed: int, raw: bool = False) -> None:
        d = self.run_dir(key, seed)
        ema = "consistency_ema" if self.arms[key].stage == "consistency" else "generator_ema"
        args = ["--checkpoint", d / f"{'generator' if raw else ema}.safetensors"]
        out = self.samples_dir(raw_key(key) if raw else key, seed)
        self.demo.generate(out, "one_step", seed, args, "study-generate")

    def report_arms(self) -> dict[str, ReportArm]:
        """The report's arms: every arm, then the raw-generator rows of those that have them."""
        out = {k: ReportArm(a.title, a.paper, a.expect, a.reference) for k, a in self.arms.items()}
        for k, a in self.arms.items():
            if a.raw:
                ref = None if a.reference is None else raw_key(a.reference)
                out[raw_key(k)] = ReportArm(a.title, a.paper, a.expect, ref, raw=True)
        return out

    def rows(self) -> dict[str, Path]:
        """The evaluation's rows: name -> sample folder."""
        rows = {row: self.reference_samples(row) for row in REFERENCE_ROWS}
        rows[START] = self.start_samples()
        rows |= {
            row_name(key, seed): self.samples_dir(key, seed)
            for key in self.report_arms()
            for seed in self.args.seeds
        }
        return rows

    def evaluate(self) -> dict:
        base, rows = self.demo.p, self.rows()
        self.demo.run("study-evaluate", [
            self.demo.py, ROOT / "tools" / "evaluate.py", "--real", base("data", "real"),
            *[a for name, folder in rows.items() for a in ("--row", f"{name}={folder}")],
            "--output", self.out / "results", "--size", "16",
            "--feature-net", base("models", "feature_net.safetensors"),
            "--feature-steps", str(self.demo.feature_steps),
            "--max-samples", str(self.demo.n_rows["one_step"]),
            "--bootstrap", str(self.demo.bootstrap),
        ])  # fmt: skip
        return json.loads((self.out / "results.json").read_text())

    # ---- driver -----------------------------------------------------------------------------
    def step(self, name: str, fn, *a) -> None:
        if name in self.progress:
            return
        stage = name.removeprefix("base/")
        if stage != name and stage in self.demo.progress:  # a finished stage of the demo
            self.progress[name] = self.demo.progress[stage]
            # on file at once: the report's time (and --report-only's) sums progress.json
            self.progress_file.write_text(json.dumps(self.progress, indent=1))
            print(f"[study] {name}: done earlier in {self.demo.out}, reused", flush=True)
            return
        t0 = time.perf_counter()
        print(f"[study] {name} ...", flush=True)
        fn(*a)
        self.progress[name] = time.perf_counter() - t0
        self.progress_file.write_text(json.dumps(self.progress, indent=1))
        if stage != name:  # the base stays a demo folder that examples/demo.py can continue
            d = self.demo
            d.progress |= {
                "_quick": d.quick,
                "_seed": self.args.base_seed,
                stage: self.progress[name],
            }
            d.progress_file.write_text(json.dumps(d.progress, indent=1))
        print(f"[study] {name}: {self.progress[name]:.0f} s", flush=True)

    def steps(self) -> list[tuple]:
        """Every step of the study in order: (name in progress.json, function, *arguments)."""
        d = self.demo
        # the shared pair: data, shards, diffusion and consistency, its 1-step row, the floors
        out = [(f"base/{stage}", getattr(d, f"stage_{stage}"))
               for stage in ("data", "vae", "preprocess", "diffusion", "consistency")]  # fmt: skip
        cons = ["--checkpoint", d.p("consistency", "consistency_ema.safetensors")]
        seed = self.args.base_seed
        out.append(
            ("start/sample", d.generate, self.start_samples(), "one_step", seed, cons,
             "study-generate")
        )  # fmt: skip
        out += [(f"reference/{f}", self.make_reference, r) for r, (f, _) in REFERENCE_ROWS.items()]
        for seed in self.args.seeds:
            for key, arm in self.arms.items():
                out.append((f"{key}/seed{seed}/train", self.train, key, seed))
                out.append((f"{key}/seed{seed}/sample", self.sample, key, seed))
                if arm.raw:
                    out.append((f"{key}/seed{seed}/sample-raw", self.sample, key, seed, True))
        return out

    def finished_results(self, steps: list[tuple]) -> dict:
        """--report-only: the evaluation of a finished study, checked to cover every step and
        row of this one (same arms and seeds)."""
        done = set(self.progress) | {f"base/{k}" for k in self.demo.progress}
        missing = [name for name, *_ in steps if name not in done]
        path = self.out / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
        missing += [f"row {r!r} of {path}" for r in self.rows() if r not in results["rows"]]
        if missing:
            raise SystemExit(
                f"study: --report-only needs a finished, evaluated study in {self.out}; "
                f"missing {len(missing)}: {', '.join(missing[:4])}"
                f"{' ...' if len(missing) > 4 else ''} (run it without --report-only)"
            )
        print(f"[study] report from {path} (nothing run)", flush=True)
        return results

    def main(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        d = self.demo
        d.out.mkdir(parents=True, exist_ok=True)
        d.p("logs").mkdir(exist_ok=True)
        base = self.args.base_seed
        if d.progress.get("_seed", base) != base or d.progress.get("_quick", d.quick) != d.quick:
            raise SystemExit(
                f"study: {d.out} holds a demo with --seed {d.progress.get('_seed')} "
                f"(quick: {d.progress.get('_quick')}); pass --base-seed "
                f"{d.progress.get('_seed')} or another --base"
            )
        steps = self.steps()
        if self.args.report_only:
            results = self.finished_results(steps)
        else:
            for name, fn, *a in steps:
                self.step(name, fn, *a)
            results = self.evaluate()
        self.write_report(results)
        print(f"[study] report: {self.report}")
        return 0

    # ---- report -----------------------------------------------------------------------------
    def _health(self, key: str, seed: int) -> dict:
        path = self.run_dir(key, seed) / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        records = [json.loads(x) for x in lines if x.strip()]
        events = [r for r in records if "event" in r]
        steps = read_metrics(path) if path.is_file() else []
        last = steps[-1]["step"] if steps else 0
        half = [r for r in steps if r["step"] > last / 2 and "d_acc_real" in r]
        mean = lambda k: statistics.fmean(r[k] for r in half) if half else None  # noqa: E731
        return {
            "events": [f"{e['event']}@{e['step']}" for e in events],
            "d_acc_real": mean("d_acc_real"),
            "d_acc_fake": mean("d_acc_fake"),
            "loss_d": mean("loss_d"),
        }

    def context(self) -> Path:
        """The hand-written context file (--context, else <report stem>_context.md beside it)."""
        if self.args.context:
            return Path(self.args.context).resolve()
        return self.report.with_name(f"{self.report.stem}_context.md")

    def write_report(self, results: dict) -> None:
        """The report from results, progress.json, the runs' metrics.jsonl, the arguments and
        the context file only (no clock, no machine): --report-only writes the same bytes."""
        figures = self.report.parent / self.report.stem
        figures.mkdir(parents=True, exist_ok=True)
        self._figures(figures)
        health = {(k, s): self._health(k, s) for k in self.arms for s in self.args.seeds}
        health |= {(raw_key(k), s): health[(k, s)] for k, s in list(health) if self.arms[k].raw}
        report = StudyReport(
            arms=self.report_arms(),
            seeds=self.args.seeds,
            results=results,
            health=health,
            recipe=self.recipe,
            seconds=sum(self.progress.values()),
            figures={
                "health": figures / "health.png",
                "samples": figures / "samples.png",
            },
            quick=self.args.quick,
            base_seed=self.args.base_seed,
            references=list(REFERENCE_ROWS),
            figure_seed=self.args.figure_seed,
            figure_prompts=FIGURE_PROMPTS,
        )
        ctx = self.context()
        if self.args.context and not ctx.is_file():
            raise SystemExit(f"study: --context {ctx}: no such file")
        text = ctx.read_text() if ctx.is_file() else None
        md = report.markdown(relative_to=self.report.parent, context=text, context_name=ctx.name)
        self.report.write_text(md)
        (self.out / "summary.json").write_text(json.dumps(report.summary(), indent=1))

    def _figures(self, folder: Path) -> None:
        """The health and sample figures of --figure-seed's runs; the sample figure shows the
        first FIGURE_PROMPTS samples of every folder (the first held-out prompts, in order)."""
        seed, d = self.args.figure_seed, self.demo
        samples = [f"real data={d.p('data', 'real')}"]
        samples += [f"consistency (start)={self.start_samples()}"]
        samples += [f"{k}={self.samples_dir(k, seed)}" for k in self.arms]
        apt_runs = [k for k, a in self.arms.items() if a.stage == "apt"]
        metrics = [f"{k}={self.run_dir(k, seed) / 'metrics.jsonl'}" for k in apt_runs]
        tmp = self.out / "figures"
        d.run("study-figures", [
            d.py, ROOT / "tools" / "make_figures.py", "--output", tmp,
            *[a for s in samples for a in ("--samples", s)], "--comparison", "samples",
            "--per-row", str(FIGURE_PROMPTS), "--num", "4",
            *[a for m in metrics for a in ("--metrics", m)], "--health", "--curves-name", "apt",
        ])  # fmt: skip
        shutil.copy(tmp / "samples.png", folder / "samples.png")
        shutil.copy(tmp / "apt_health.png", folder / "health.png")


if __name__ == "__main__":
    sys.exit(Study(parse_args()).main())
