#!/usr/bin/env python
"""The paper's ablations at toy scale (`make study`): every arm over several seeds, from one
shared diffusion + consistency pair, scored against one reference set; writes docs/study.md.

    python examples/apt_study.py                     # runs/study, seeds 1 2 3; ~2 h on 2 cores
    python examples/apt_study.py --seeds 1 2 3 4     # more seeds (finished runs are kept)
    python examples/apt_study.py --arms apt no-r1    # a subset of the arms
    python examples/apt_study.py --quick             # a few steps of everything (the test)
    python examples/apt_study.py --base runs/demo-seed0   # reuse a finished `make demo`

It reuses examples/demo.py's stages: data, vae, preprocess, diffusion and consistency once (in
--base, a demo of seed --base-seed: a finished demo there is reused as it is), then per arm
and seed one training run (`pretrain_apt.py --recipe demo-apt` plus the arm's flags, or
more consistency updates for that control), 1-step samples of its EMA generator on the
held-out prompts, and one tools/evaluate.py call over every run (FD with 95 % bootstrap
intervals, background noise, sharpness and saturation against real data, caption
accuracy). Resumable: finished runs are recorded in OUT/progress.json, an interrupted
training run resumes from its checkpoint. The report (tables, verdicts, health curves,
sample grids) goes to --report (docs/study.md, pictures in docs/study/).
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

from demo import RECON_FOLDER, RECON_ROW, ROOT, ROWS, Demo  # noqa: E402  (puts ROOT on sys.path)

from megatron_apt.config.recipes import get_recipe  # noqa: E402
from megatron_apt.evaluation.figures import read_metrics  # noqa: E402

WORSE = frozenset({"higher", "collapsed"})
# Reference rows beside the arms (the floors the demo's table has too): results-table row ->
# the demo's sample folder and its row key (None: the real clips through the VAE). Made by the
# study unless the base is a finished demo whose samples are reused.
TEACHER_ROW = "teacher: diffusion 25 steps (CFG)"
REFERENCE_ROWS = {
    RECON_ROW: (RECON_FOLDER, None),
    TEACHER_ROW: ROWS["diffusion 25 steps (CFG)"],  # ("diffusion-25", "diffusion")
}


@dataclass(frozen=True)
class Arm:
    title: str
    flags: tuple[str, ...] = ()
    paper: str = ""  # what the paper says about it
    stage: str = "apt"  # "consistency": the control that trains the distilled model on
    batch: float = 1.0  # global batch relative to the demo recipe's
    # the verdicts (vs APT of the same seed; APT itself: vs its start) the paper predicts
    expect: frozenset = field(default_factory=lambda: WORSE)


ARMS: dict[str, Arm] = {
    "apt": Arm(
        "APT (demo recipe)",
        paper="one-step model closer to real data than its init (sec. 4, 5.3)",
        expect=frozenset({"lower"}),
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
    ),
    "d-t0": Arm(
        "D at t = 0 only",
        ("--d-timesteps", "zero"),
        "sec. 3.3: t = 0 leads to collapse; the timestep ensemble avoids it",
    ),
    "one-head": Arm(
        "one head, last layer",
        ("--d-head-layers", "last"),
        "sec. 5.2, fig. 7: multi-layer heads improve structure",
    ),
    "batch-small": Arm(
        "small batch (1/4)", batch=0.25, paper="app. E: small batches mode-collapse"
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
}


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
    return p.parse_args(argv)


class Study:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.report = Path(args.report).resolve()
        self.arms = {k: ARMS[k] for k in (args.arms or ARMS)}
        if "apt" not in self.arms:
            self.arms = {"apt": ARMS["apt"], **self.arms}  # the reference of every verdict
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
        self.demo.train("apt", extra, d, seed, log)

    def sample(self, key: str, seed: int) -> None:
        d = self.run_dir(key, seed)
        ema = "consistency_ema" if self.arms[key].stage == "consistency" else "generator_ema"
        args = ["--checkpoint", d / f"{ema}.safetensors"]
        self.demo.generate(self.samples_dir(key, seed), "one_step", seed, args, "study-generate")

    def evaluate(self) -> dict:
        base = self.demo.p
        rows = {row: self.reference_samples(row) for row in REFERENCE_ROWS}
        rows["consistency 1 step (start)"] = self.start_samples()
        rows |= {
            f"{key} / seed {seed}": self.samples_dir(key, seed)
            for key in self.arms
            for seed in self.args.seeds
        }
        self.demo.run("study-evaluate", [
            self.demo.py, ROOT / "tools" / "evaluate.py", "--real", base("data", "real"),
            *[a for name, folder in rows.items() for a in ("--row", f"{name}={folder}")],
            "--output", self.out / "results", "--size", "16",
            "--feature-net", base("models", "feature_net.safetensors"),
            "--feature-steps", str(self.demo.feature_steps),
            "--max-samples", str(self.demo.n_rows["one_step"]),
        ])  # fmt: skip
        return json.loads((self.out / "results.json").read_text())

    # ---- driver -----------------------------------------------------------------------------
    def step(self, name: str, fn, *a) -> None:
        if name in self.progress:
            return
        stage = name.removeprefix("base/")
        if stage != name and stage in self.demo.progress:  # a finished stage of the demo
            self.progress[name] = self.demo.progress[stage]
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
        # the shared pair: data, shards, diffusion and consistency of seed 0, its 1-step row
        for stage in ("data", "vae", "preprocess", "diffusion", "consistency"):
            self.step(f"base/{stage}", getattr(d, f"stage_{stage}"))
        cons = ["--checkpoint", d.p("consistency", "consistency_ema.safetensors")]
        out, seed = self.start_samples(), self.args.base_seed
        self.step("start/sample", d.generate, out, "one_step", seed, cons, "study-generate")
        for row, (folder, _) in REFERENCE_ROWS.items():
            self.step(f"reference/{folder}", self.make_reference, row)
        for seed in self.args.seeds:
            for key in self.arms:
                self.step(f"{key}/seed{seed}/train", self.train, key, seed)
                self.step(f"{key}/seed{seed}/sample", self.sample, key, seed)
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

    def write_report(self, results: dict) -> None:
        from megatron_apt.evaluation.study_report import StudyReport

        figures = self.report.parent / self.report.stem
        figures.mkdir(parents=True, exist_ok=True)
        self._figures(figures)
        health = {(k, s): self._health(k, s) for k in self.arms for s in self.args.seeds}
        report = StudyReport(
            arms={k: (a.title, a.paper, a.expect) for k, a in self.arms.items()},
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
        )
        self.report.write_text(report.markdown(relative_to=self.report.parent))
        (self.out / "summary.json").write_text(json.dumps(report.summary(), indent=1))

    def _figures(self, folder: Path) -> None:
        seed, d = self.args.seeds[0], self.demo
        samples = [f"real data={d.p('data', 'real')}"]
        samples += [f"consistency (start)={self.start_samples()}"]
        samples += [f"{k}={self.samples_dir(k, seed)}" for k in self.arms]
        apt_runs = [k for k, a in self.arms.items() if a.stage == "apt"]
        metrics = [f"{k}={self.run_dir(k, seed) / 'metrics.jsonl'}" for k in apt_runs]
        tmp = self.out / "figures"
        d.run("study-figures", [
            d.py, ROOT / "tools" / "make_figures.py", "--output", tmp,
            *[a for s in samples for a in ("--samples", s)], "--comparison", "samples",
            "--per-row", "6", "--num", "4",
            *[a for m in metrics for a in ("--metrics", m)], "--health", "--curves-name", "apt",
        ])  # fmt: skip
        shutil.copy(tmp / "samples.png", folder / "samples.png")
        shutil.copy(tmp / "apt_health.png", folder / "health.png")


if __name__ == "__main__":
    sys.exit(Study(parse_args()).main())
