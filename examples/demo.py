#!/usr/bin/env python
"""The paper's pipeline end to end at toy scale on one machine (`make demo`).

    python examples/demo.py                  # runs/demo-seed0; ~20 min on 2 CPU cores
    python examples/demo.py --quick          # a few steps per stage (the CI test)
    python examples/demo.py --redo apt       # re-run the APT stage and everything after it

Stages, each an ordinary command that anyone can re-run (the exact lines are in
OUT/commands.sh and the logs in OUT/logs/):

 1. data         tools/make_synthetic_data.py: 16x16 clips of 5 frames, coloured shapes
                 moving left/right/up/down, with captions; a held-out real set; a tiny T5
 2. vae          tools/train_vae.py: a small KL autoencoder (diffusers AutoencoderKL) trained
                 on the training clips' frames: 16x16 RGB -> 4x8x8 latents
 3. preprocess   tools/preprocess_data.py: latent shards (that VAE, T5 embeddings)
 4. diffusion    pretrain_apt.py --recipe demo-diffusion  (flow matching, 10% negative prompt)
 5. consistency  pretrain_apt.py --recipe demo-consistency (CFG teacher, negative prompt)
 6. apt          pretrain_apt.py --recipe demo-apt: the two DeepSpeed engines (G and D),
                 RMSprop, R1, EMA, on 2 processes through the deepspeed launcher
 7. generate     tools/generate.py: diffusion 25 steps + CFG, consistency 1 step,
                 APT 1 step, APT 2 steps, on the held-out captions; tools/reconstruct.py:
                 the real-data row's clips through the VAE (the floor of the latent rows)
 8. evaluate     tools/evaluate.py: video FD, conditional FD, caption accuracy (95 % intervals),
                 background noise, sharpness -> OUT/results.md; --summarize: the seeds' table
 9. figures      tools/make_figures.py: sample grids (PNG, GIF, MP4), loss curves (PNG)

Re-running skips finished stages (OUT/progress.json); an interrupted training stage resumes
from its last checkpoint (--load).

    python examples/demo.py --summarize runs/demo-seed0 runs/demo-seed1 ...
                                             # the README's table of several seeds' runs and
                                             # docs/demo/seeds.json (runs nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's megatron_apt, whatever else is installed
LATEST = "latest_checkpointed_iteration.txt"  # megatron_apt.engine.checkpointing.LATEST
STAGES = (
    "data",
    "vae",
    "preprocess",
    "diffusion",
    "consistency",
    "apt",
    "generate",
    "evaluate",
    "figures",
)
ROWS = {  # results-table row -> (sample folder, generate.py arguments)
    "diffusion 25 steps (CFG)": ("diffusion-25", "diffusion"),
    "consistency 1 step": ("consistency-1", "consistency"),
    "APT 1 step": ("apt-1", "apt1"),
    "APT 2 steps": ("apt-2", "apt2"),
}
APT_AT_TEACHER_N = "APT 1 step (teacher's N)"  # megatron_apt.evaluation.checks.demo_checks
# The floor of every latent row: the real-data row's clips through the VAE (tools/reconstruct.py)
RECON_ROW, RECON_FOLDER = "real data through the VAE", "vae-recon"
# Output lines of the child processes worth showing (everything goes to OUT/logs/).
NOISE = re.compile(
    r"warnings\.warn|UserWarning|FutureWarning|DeprecationWarning|^\s*$|\[INFO\]|\[WARNING\]|"
    r"Loading weights|Writing model shards|^\[\d+/\d+\] |ds_accelerator|real_accelerator|"
    r"Setting ds_accelerator|TorchCheckpointEngine|launcher|cmd =|nnodes|dist_world|"
    r"global_rank_mapping|WORLD INFO|KMP_|Using .* \(|\bPYTHON|Process \d+ exits"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", help="output folder (default: runs/demo-seed<SEED>)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (tests, CI)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the three training stages (weights, data order, noise) and of the "
        "generation noise; no recipe pins one: the demo is meant to hold for any seed",
    )
    p.add_argument(
        "--arch",
        choices=("mmdit", "wan"),
        default="mmdit",
        help="model family of the teacher, consistency model, G and D: the MMDiT (`demo` preset)"
        " or Wan2.1's blocks (`demo-wan`, the same width and depth); default output folder "
        "runs/demo-seed<SEED> or runs/demo-wan-seed<SEED>",
    )
    p.add_argument("--nproc", type=int, default=2, help="training processes")
    p.add_argument(
        "--launcher",
        choices=("deepspeed", "torchrun", "mpirun"),
        default="deepspeed",
        help="how the training stages start their processes",
    )
    p.add_argument("--redo", choices=STAGES, help="re-run this stage and all after it")
    p.add_argument(
        "--strict", action="store_true", help="exit 1 when one of the demo's checks fails"
    )
    p.add_argument("--verbose", action="store_true", help="show every line of the children")
    p.add_argument(
        "--summarize",
        nargs="+",
        metavar="RUN",
        help="run nothing: read finished demo folders (one per seed; or a summary JSON written "
        "earlier, whose seeds are kept) and write their key numbers to --summary-json and a "
        "Markdown table (the README's) to stdout",
    )
    p.add_argument(
        "--summary-json",
        default=str(ROOT / "docs" / "demo" / "seeds.json"),
        help="where --summarize writes (default docs/demo/seeds.json: the metric tests read "
        "the APT row's seed-to-seed spread from it)",
    )
    return p.parse_args(argv)


SUMMARY_KEYS = ("fd", "fd_ci", "cfd", "cfd_ci", "caption_all", "caption_all_ci", "caption_color",
                "caption_shape", "caption_motion", "background_noise", "background_noise_ci",
                "sharpness_ratio", "num_samples")  # fmt: skip


def _ci(row: dict, key: str, digits: int) -> str:
    ci = row.get(f"{key}_ci")
    if row.get(key) is None:  # e.g. the conditional FD where no class has enough clips
        return "–"
    v = f"{row[key]:.{digits}f}"
    return v + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def summarize(folders: list[str], out_json: str) -> str:
    """The demo runs' key numbers (``out_json``) and the README's table of them (returned).
    Every number is read from a run's results.json and the APT run's metrics.jsonl, or from a
    summary JSON written earlier by this function (a ``.json`` among ``folders``: its seeds are
    kept, a run folder of the same seed replaces its entry)."""
    from megatron_apt.evaluation.checks import d_accuracy_band

    seeds, stored = [], {}
    for path in (Path(f) for f in folders if f.endswith(".json")):
        if not path.is_file():
            sys.exit(f"demo --summarize: {path} missing")
        for s in json.loads(path.read_text())["seeds"]:
            stored[s["seed"]] = s
    for folder in (Path(f) for f in folders if not f.endswith(".json")):
        res_path = folder / "results.json"
        if not res_path.is_file():
            sys.exit(f"demo --summarize: {res_path} missing (is {folder} a finished demo?)")
        res = json.loads(res_path.read_text())
        if "demo" not in res:
            sys.exit(f"demo --summarize: {res_path} has no checks: run the demo in {folder} again")
        recs = [json.loads(x) for x in (folder / "apt" / "metrics.jsonl").read_text().splitlines()
                if x.strip()]  # fmt: skip
        steps = [r for r in recs if "event" not in r and "d_acc_real" in r]
        half = [r for r in steps if r["step"] > steps[-1]["step"] / 2]
        pick = lambda row: {k: row.get(k) for k in SUMMARY_KEYS}  # noqa: E731
        progress = json.loads((folder / "progress.json").read_text())
        seeds.append({
            "seed": res["demo"]["seed"],
            "run": folder.name,
            "real": pick(res["real"]),
            "floors": {n: pick(r) for n, r in res.get("floors", {}).items()},
            "rows": {name: pick(r) for name, r in res["rows"].items()},
            "d_acc_second_half": {k: [min(r[k] for r in half), max(r[k] for r in half)]
                                  for k in ("d_acc_real", "d_acc_fake")},
            "d_band_ok": d_accuracy_band(recs).ok,
            "events": [f"{r['event']}@{r['step']}" for r in recs if "event" in r],
            "checks": res["demo"]["checks"],
            "stage_seconds": {k: round(v) for k, v in progress.items() if not k.startswith("_")},
        })  # fmt: skip
    fresh = {s["seed"] for s in seeds}
    seeds += [s for k, s in stored.items() if k not in fresh]
    seeds.sort(key=lambda s: s["seed"])
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps({"seeds": seeds}, indent=1) + "\n")
    lines = [
        "| seed | video FD: consistency 1 step | APT 1 step | APT 2 steps | conditional FD: "
        "consistency / APT | caption all: teacher / consistency / APT | background noise at "
        "the teacher's N: teacher / APT | D accuracy real / fake (2nd half) | checks passed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in seeds:
        r = s["rows"]
        t, c, a, a2 = (r["diffusion 25 steps (CFG)"], r["consistency 1 step"], r["APT 1 step"],
                       r["APT 2 steps"])  # fmt: skip
        an = r.get(APT_AT_TEACHER_N, a)
        acc = s["d_acc_second_half"]
        passed = sum(c["passed"] for c in s["checks"])
        lines.append(
            f"| {s['seed']} | {_ci(c, 'fd', 2)} | **{_ci(a, 'fd', 2)}** | {_ci(a2, 'fd', 2)} | "
            f"{_ci(c, 'cfd', 2)} / {_ci(a, 'cfd', 2)} | {_ci(t, 'caption_all', 2)} / "
            f"{_ci(c, 'caption_all', 2)} / {_ci(a, 'caption_all', 2)} | "
            f"{_ci(t, 'background_noise', 3)} / {_ci(an, 'background_noise', 3)} | "
            f"{acc['d_acc_real'][0]:.2f}–{acc['d_acc_real'][1]:.2f} / "
            f"{acc['d_acc_fake'][0]:.2f}–{acc['d_acc_fake'][1]:.2f} | "
            f"{passed} of {len(s['checks'])} |"
        )
    fds = [s["rows"]["APT 1 step"]["fd"] for s in seeds]
    floor = [s["real"]["fd"] for s in seeds]
    lines += [
        "",
        f"APT 1 step video FD over the {len(seeds)} seeds: {min(fds):.2f}-{max(fds):.2f} "
        f"(spread {max(fds) - min(fds):.2f}); real-vs-real floor {min(floor):.2f}-"
        f"{max(floor):.2f}.",
    ]
    return "\n".join(lines)


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        arch = getattr(args, "arch", "mmdit")
        tag = "" if arch == "mmdit" else f"{arch}-"
        self.out = Path(args.out or ROOT / "runs" / f"demo-{tag}seed{args.seed}").resolve()
        self.model_args = [] if arch == "mmdit" else ["--model", f"demo-{arch}"]
        # a family's own recipe where the MMDiT's does not transfer (config/recipes.py)
        self.recipes = {"apt": "demo-wan-apt"} if arch == "wan" else {}
        self.quick = args.quick
        self.bin = Path(sys.executable).parent
        self.py = sys.executable
        self.progress_file = self.out / "progress.json"
        self.progress = (
            json.loads(self.progress_file.read_text()) if self.progress_file.is_file() else {}
        )
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        self.env.setdefault("DS_ACCELERATOR", "cpu")
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        # sizes: the full demo, or a few steps of everything (the CI test). The held-out real
        # set is split in two halves (evaluate.py): one the reference of every row, one the
        # real-data row; the one-step rows get as many samples as a half (2048: FD intervals
        # about +-15 at FD ~100), the 25-step row (50 model calls per sample with CFG) 256.
        self.n_train, self.n_eval = (64, 32) if self.quick else (2048, 4096)
        self.n_rows = {"one_step": self.n_eval // 2, "diffusion": self.n_eval // 16}
        self.iters = {"diffusion": 3, "consistency": 3, "apt": 3} if self.quick else {}
        self.feature_steps = 20 if self.quick else 300
        # bootstrap resamples of every interval: a quick run's 16-clip rows still get intervals,
        # at a tenth of the cost (each resample of an FD is a 269-dim matrix square root)
        self.bootstrap = 100 if self.quick else 1000
        self.vae_steps = 10 if self.quick else 600

    # ---- paths ------------------------------------------------------------------------
    def p(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    # ---- running commands ---------------------------------------------------------------
    def run(self, stage: str, cmd: list[str]) -> None:
        """Run one command, log it to OUT/logs/<stage>.log and OUT/commands.sh, show the
        interesting lines; exit with the command's status when it fails. A one-process command
        (this Python, not a launcher) gets ``--nproc`` threads: the cores that the training
        stages use as ``--nproc`` one-thread processes (2 threads: a one-step row generates
        1.2x faster in wall time, with the same pixels)."""
        line = " ".join(shlex.quote(str(c)) for c in cmd)
        env = self.env
        if str(cmd[0]) == self.py and not self.quick:  # quick: tiny tensors, 1 thread is faster
            env = dict(env, OMP_NUM_THREADS=str(self.args.nproc))
        with open(self.p("commands.sh"), "a") as f:
            f.write(f"# {stage}\n{line}\n")
        log_path = self.p("logs", f"{stage}.log")
        with open(log_path, "a") as log:
            log.write(f"$ {line}\n")
            log.flush()
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            assert proc.stdout is not None
            tail: list[str] = []
            for out_line in proc.stdout:
                log.write(out_line)
                tail = (tail + [out_line])[-40:]
                if self.args.verbose or not NOISE.search(out_line):
                    print(f"    {out_line.rstrip()}", flush=True)
            rc = proc.wait()
        if rc != 0:
            print("".join(tail), file=sys.stderr)
            sys.exit(f"demo: stage {stage!r} failed (exit {rc}); full log: {log_path}")

    def launch(self) -> list[str]:
        """The training launcher for ``--nproc`` local processes on a free port."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        n = str(self.args.nproc)
        if self.args.launcher == "deepspeed":
            return [self.bin / "deepspeed", "--num_gpus", n, "--master_port", port]
        if self.args.launcher == "torchrun":
            return [self.bin / "torchrun", "--nproc-per-node", n, "--master-port", port]
        self.env["MASTER_PORT"] = port
        return ["mpirun", "-n", n, self.py]

    # ---- the stages ---------------------------------------------------------------------
    def stage_data(self) -> None:
        common = ["--kind", "video", "--size", "16", "--frames", "5", "--format", "gif"]
        tool = [self.py, ROOT / "tools" / "make_synthetic_data.py", *common]
        self.run(
            "data",
            [
                *tool,
                "--output",
                self.p("data", "train"),
                "--num",
                str(self.n_train),
                "--seed",
                "0",
                "--text-encoder",
                self.p("models", "t5"),
            ],
        )
        # the held-out real set: other samples (seed 1); its captions are the eval prompts
        self.run(
            "data",
            [*tool, "--output", self.p("data", "real"), "--num", str(self.n_eval), "--seed", "1"],
        )
        # prompts: the captions of the real-data row's half (tools/evaluate.py), in order
        caps = [c.read_text().strip() for c in sorted(self.p("data", "real").glob("*.txt"))]
        for name, n in self.n_rows.items():
            self.p("data", f"prompts_{name}.txt").write_text("".join(c + "\n" for c in caps[:n]))

    @property
    def vae(self) -> Path:
        """The demo's VAE (a diffusers directory: every tool takes it as ``--vae``)."""
        return self.p("models", "vae")

    def stage_vae(self) -> None:
        # one process with --nproc threads: the cores the training stages use as processes
        self.run("vae", [
            self.py, ROOT / "tools" / "train_vae.py", "--input", self.p("data", "train"),
            "--output", self.vae, "--steps", str(self.vae_steps), "--seed", str(self.args.seed),
            "--threads", "1" if self.quick else str(self.args.nproc), "--log-interval", "100",
        ])  # fmt: skip

    def stage_preprocess(self) -> None:
        self.run("preprocess", [
            self.py, ROOT / "tools" / "preprocess_data.py",
            "--input", self.p("data", "train"), "--output", self.p("shards"),
            "--bucket", "16x16x5@8", "--vae", self.vae,
            "--text-encoder", self.p("models", "t5"), "--max-text-length", "12",
            "--batch-size", "64", "--samples-per-shard", "512", "--no-progress",
        ])  # fmt: skip

    def train(
        self, stage: str, extra: list, save: Path, seed: int, log: str, load: Path | None = None
    ) -> None:
        """``pretrain_apt.py --recipe demo-<stage>`` (Wan's APT: ``demo-wan-apt``) on this run's
        shards, saving to (and resuming from) ``save``, or resuming from ``load`` while ``save``
        has no checkpoint."""
        load = save if load is None or (save / LATEST).is_file() else load
        recipe = self.recipes.get(stage, f"demo-{stage}")
        cmd = [*self.launch(), ROOT / "pretrain_apt.py", "--recipe", recipe,
               "--data-path", self.p("shards"), "--save", save, "--load", load,
               "--seed", str(seed), *self.model_args, *extra]  # fmt: skip
        if stage in self.iters:  # quick: a few updates, unless the caller set them
            iters = [] if "--train-iters" in extra else ["--train-iters", str(self.iters[stage])]
            warmup = ["--d-warmup-iters", "1"] if stage == "apt" else []  # recipe: 40 of 240
            cmd += [*iters, *warmup, "--log-interval", "1"]
        self.run(log, cmd)

    def _train(self, stage: str, extra: list[str]) -> None:
        self.train(stage, extra, self.p(stage), self.args.seed, stage)

    def stage_diffusion(self) -> None:
        self._train("diffusion", [])

    def stage_consistency(self) -> None:
        self._train(
            "consistency",
            ["--init-generator", self.p("diffusion", "diffusion_ema.safetensors")],
        )

    def stage_apt(self) -> None:
        # G from the distilled model's EMA; D's backbone from the diffusion model (section 3.2)
        self._train("apt", [
            "--init-generator", self.p("consistency", "consistency_ema.safetensors"),
            "--init-discriminator", self.p("diffusion", "diffusion_ema.safetensors"),
        ])  # fmt: skip

    def generate(self, out: Path, prompts: str, seed: int, args: list, log: str) -> None:
        """tools/generate.py into ``out`` (replaced) for the prompts file ``prompts_<name>``."""
        shutil.rmtree(out, ignore_errors=True)
        self.run(log, [
            self.py, ROOT / "tools" / "generate.py",
            "--text-encoder", self.p("models", "t5"), "--max-text-length", "12",
            "--vae", self.vae, "--frames", "5", "--height", "16", "--width", "16",
            "--fps", "8", "--video-format", "gif", "--batch-size", "128",
            "--seed", str(seed), "--device", "cpu",
            "--prompts-file", self.p("data", f"prompts_{prompts}.txt"), *args, "--output", out,
        ])  # fmt: skip

    def row_args(self, key: str) -> tuple[str, list]:
        """The prompts file and tools/generate.py arguments of a results row (ROWS' keys)."""
        recipe = {
            "diffusion": ["--mode", "diffusion", "--steps", "25", "--guidance-scale", "3",
                          "--checkpoint", self.p("diffusion", "diffusion_ema.safetensors")],
            "consistency": ["--checkpoint", self.p("consistency", "consistency_ema.safetensors")],
            "apt1": ["--checkpoint", self.p("apt", "generator_ema.safetensors")],
            "apt2": ["--checkpoint", self.p("apt", "generator_ema.safetensors"), "--steps", "2"],
        }  # fmt: skip
        return ("diffusion" if key == "diffusion" else "one_step"), recipe[key]

    def reconstruct(self, out: Path, log: str) -> None:
        """The real-data row's clips (the held-out set's first half) through the VAE."""
        shutil.rmtree(out, ignore_errors=True)
        self.run(log, [
            self.py, ROOT / "tools" / "reconstruct.py", "--vae", self.vae,
            "--input", self.p("data", "real"), "--output", out,
            "--max-files", str(self.n_rows["one_step"]), "--format", "gif",
        ])  # fmt: skip

    def stage_generate(self) -> None:
        for folder, key in ROWS.values():
            prompts, args = self.row_args(key)
            self.generate(self.p("samples", folder), prompts, self.args.seed, args, "generate")
        self.reconstruct(self.p("samples", RECON_FOLDER), "generate")

    def stage_evaluate(self) -> None:
        rows = [f"{RECON_ROW}={self.p('samples', RECON_FOLDER)}"] + [
            f"{name}={self.p('samples', folder)}" for name, (folder, _) in ROWS.items()
        ]
        # APT's first clips at the teacher's sample count (the teacher's prompts): the row the
        # background-noise claim compares with the teacher (equal N, equal prompts)
        rows.append(f"{APT_AT_TEACHER_N}={self.p('samples', 'apt-1')}@{self.n_rows['diffusion']}")
        self.run("evaluate", [
            self.py, ROOT / "tools" / "evaluate.py", "--real", self.p("data", "real"),
            *[a for r in rows for a in ("--row", r)], "--output", self.p("results"),
            "--size", "16", "--feature-steps", str(self.feature_steps),
            "--feature-net", self.p("models", "feature_net.safetensors"),
            "--max-samples", str(self.n_rows["one_step"]), "--bootstrap", str(self.bootstrap),
        ])  # fmt: skip

    def stage_figures(self) -> None:
        samples = [f"real data={self.p('data', 'real')}"] + [
            f"{name}={self.p('samples', folder)}" for name, (folder, _) in ROWS.items()
        ]
        metrics = [f"{s}={self.p(s, 'metrics.jsonl')}" for s in ("diffusion", "consistency")]
        self.run("figures", [
            self.py, ROOT / "tools" / "make_figures.py", "--output", self.p("figures"),
            *[a for s in samples for a in ("--samples", s)],
            *[a for m in metrics for a in ("--metrics", m)], "--curves-name", "pre_stages",
            "--comparison", "comparison",
        ])  # fmt: skip
        self.run("figures", [
            self.py, ROOT / "tools" / "make_figures.py", "--output", self.p("figures"),
            "--metrics", f"APT={self.p('apt', 'metrics.jsonl')}", "--health",
            "--curves-name", "apt_loss_curves",
        ])  # fmt: skip

    # ---- driver ---------------------------------------------------------------------------
    def main(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.p("logs").mkdir(exist_ok=True)
        if self.progress.get("_quick", self.quick) != self.quick:
            sys.exit(
                f"demo: {self.out} holds a {'quick' if self.progress['_quick'] else 'full'} run;"
                " use another --out or delete it"
            )
        if self.progress.get("_seed", self.args.seed) != self.args.seed:
            sys.exit(
                f"demo: {self.out} holds a run with --seed {self.progress['_seed']}; use another"
                " --out or delete it"
            )
        arch = getattr(self.args, "arch", "mmdit")
        # a folder from before --arch existed holds an MMDiT run
        held = self.progress.get("_arch", "mmdit" if set(STAGES) & set(self.progress) else arch)
        if held != arch:
            sys.exit(
                f"demo: {self.out} holds a run with --arch {held}; use another --out or delete it"
            )
        self.progress["_quick"], self.progress["_seed"] = self.quick, self.args.seed
        self.progress["_arch"] = arch
        redo = self.args.redo
        missing = [s for s in STAGES if s not in self.progress]
        if (
            not redo
            and missing
            and any(s in self.progress for s in STAGES[STAGES.index(missing[0]) :])
        ):
            # a folder from an older demo (e.g. without the "vae" stage): the stages after a
            # missing one were made from other inputs, so they are redone too
            redo = missing[0]
            print(f"demo: stage {redo!r} has not run in {self.out}: redoing it and all after it")
        if redo:
            for s in STAGES[STAGES.index(redo) :]:
                self.progress.pop(s, None)
                old = self.p(s)
                if s in ("diffusion", "consistency", "apt") and old.is_dir():
                    # a re-run starts afresh (its --load would resume the old checkpoints);
                    # the old run is kept aside, not deleted
                    aside = self.p(f"{s}.replaced")
                    shutil.rmtree(aside, ignore_errors=True)
                    old.rename(aside)
                    print(f"--redo {redo}: the previous {s} run moved to {aside}")
        start = time.perf_counter()
        for i, stage in enumerate(STAGES, 1):
            head = f"[{i}/{len(STAGES)}] {stage}"
            if stage in self.progress:
                print(f"{head}: done earlier ({self.progress[stage]:.0f} s), skipped", flush=True)
                continue
            print(f"{head} ...", flush=True)
            t0 = time.perf_counter()
            getattr(self, f"stage_{stage}")()
            dt = time.perf_counter() - t0
            self.progress[stage] = dt
            self.progress_file.write_text(json.dumps(self.progress, indent=1))
            print(f"{head}: done in {dt:.0f} s (total {time.perf_counter() - start:.0f} s)")
        return self.report()

    def report(self) -> int:
        """Print the table and the demo's checks; write the checks into results.json."""
        from megatron_apt.evaluation.checks import checks_to_json, demo_checks

        results = json.loads(self.p("results.json").read_text())
        print("\n" + self.p("results.md").read_text())
        path = self.p("apt", "metrics.jsonl")
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        checks = demo_checks(results, records)
        results["demo"] = {"seed": self.args.seed, "checks": checks_to_json(checks)}
        self.p("results.json").write_text(json.dumps(results, indent=1))
        print(f"checks (seed {self.args.seed}):")
        print("\n".join("  " + c.line() for c in checks))
        failed = [c for c in checks if not c.passed]
        times = ", ".join(f"{s} {self.progress[s]:.0f} s" for s in STAGES)
        print(f"stage times: {times}")
        print(f"outputs: {self.out}  (results.md/.json, figures/, samples/, logs/, commands.sh)")
        if failed and not self.quick:
            print(f"{len(failed)} of {len(checks)} checks failed (see above)")
            return 1 if self.args.strict else 0
        return 0


if __name__ == "__main__":
    _args = parse_args()
    if _args.summarize:
        print(summarize(_args.summarize, _args.summary_json))
        sys.exit(0)
    sys.exit(Demo(_args).main())
