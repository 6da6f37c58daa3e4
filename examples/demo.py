#!/usr/bin/env python
"""The paper's pipeline end to end at toy scale on one machine (`make demo`).

    python examples/demo.py                  # runs/demo; ~15 min on 2 CPU cores
    python examples/demo.py --quick          # a few steps per stage (the CI test)
    python examples/demo.py --redo apt       # re-run the APT stage and everything after it

Stages, each an ordinary command that anyone can re-run (the exact lines are in
OUT/commands.sh and the logs in OUT/logs/):

 1. data         tools/make_synthetic_data.py: 16x16 clips of 5 frames, coloured shapes
                 moving left/right/up/down, with captions; a held-out real set; a tiny T5
 2. preprocess   tools/preprocess_data.py: latent shards (identity:2 "VAE", T5 embeddings)
 3. diffusion    pretrain_apt.py --recipe demo-diffusion  (flow matching, 10% negative prompt)
 4. consistency  pretrain_apt.py --recipe demo-consistency (CFG teacher, negative prompt)
 5. apt          pretrain_apt.py --recipe demo-apt: the two DeepSpeed engines (G and D),
                 RMSprop, R1, EMA, on 2 processes through the deepspeed launcher
 6. generate     tools/generate.py: diffusion 25 steps + CFG, consistency 1 step,
                 APT 1 step, APT 2 steps, on the held-out captions
 7. evaluate     tools/evaluate.py: FD, sharpness, caption accuracy -> OUT/results.md
 8. figures      tools/make_figures.py: sample grids (PNG, GIF, MP4), loss curves (PNG)

Re-running skips finished stages (OUT/progress.json); an interrupted training stage resumes
from its last checkpoint (--load).
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
VAE = "identity:2:-0.72:3.0"  # pixel-unshuffle, normalized to zero mean, unit variance
STAGES = (
    "data",
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
    p.add_argument("--out", default=str(ROOT / "runs" / "demo"), help="output folder")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (tests, CI)")
    p.add_argument("--nproc", type=int, default=2, help="training processes")
    p.add_argument(
        "--launcher",
        choices=("deepspeed", "torchrun", "mpirun"),
        default="deepspeed",
        help="how the training stages start their processes",
    )
    p.add_argument("--redo", choices=STAGES, help="re-run this stage and all after it")
    p.add_argument("--verbose", action="store_true", help="show every line of the children")
    return p.parse_args(argv)


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
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
        # sizes: the full demo, or a few steps of everything (the CI test)
        self.n_train, self.n_eval = (64, 16) if self.quick else (2048, 256)
        self.iters = {"diffusion": 3, "consistency": 3, "apt": 3} if self.quick else {}
        self.feature_steps = 20 if self.quick else 300

    # ---- paths ------------------------------------------------------------------------
    def p(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    # ---- running commands ---------------------------------------------------------------
    def run(self, stage: str, cmd: list[str]) -> None:
        """Run one command, log it to OUT/logs/<stage>.log and OUT/commands.sh, show the
        interesting lines; exit with the command's status when it fails."""
        line = " ".join(shlex.quote(str(c)) for c in cmd)
        with open(self.p("commands.sh"), "a") as f:
            f.write(f"# {stage}\n{line}\n")
        log_path = self.p("logs", f"{stage}.log")
        with open(log_path, "a") as log:
            log.write(f"$ {line}\n")
            log.flush()
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                cwd=ROOT,
                env=self.env,
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
        caps = sorted(self.p("data", "real").glob("*.txt"))
        self.p("data", "eval_prompts.txt").write_text(
            "".join(c.read_text().strip() + "\n" for c in caps)
        )

    def stage_preprocess(self) -> None:
        self.run("preprocess", [
            self.py, ROOT / "tools" / "preprocess_data.py",
            "--input", self.p("data", "train"), "--output", self.p("shards"),
            "--bucket", "16x16x5@8", "--vae", VAE,
            "--text-encoder", self.p("models", "t5"), "--max-text-length", "12",
            "--batch-size", "64", "--samples-per-shard", "512", "--no-progress",
        ])  # fmt: skip

    def _train(self, stage: str, extra: list[str]) -> None:
        save = self.p(stage)
        cmd = [*self.launch(), ROOT / "pretrain_apt.py", "--recipe", f"demo-{stage}",
               "--data-path", self.p("shards"), "--save", save, "--load", save, *extra]  # fmt: skip
        if stage in self.iters:
            cmd += ["--train-iters", str(self.iters[stage]), "--log-interval", "1"]
        self.run(stage, cmd)

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

    def stage_generate(self) -> None:
        base = [
            self.py, ROOT / "tools" / "generate.py",
            "--prompts-file", self.p("data", "eval_prompts.txt"),
            "--text-encoder", self.p("models", "t5"), "--max-text-length", "12",
            "--vae", VAE, "--frames", "5", "--height", "16", "--width", "16",
            "--fps", "8", "--video-format", "gif", "--batch-size", "64", "--seed", "0",
            "--device", "cpu",
        ]  # fmt: skip
        recipe = {
            "diffusion": ["--mode", "diffusion", "--steps", "25", "--guidance-scale", "3",
                          "--checkpoint", self.p("diffusion", "diffusion_ema.safetensors")],
            "consistency": ["--checkpoint", self.p("consistency", "consistency_ema.safetensors")],
            "apt1": ["--checkpoint", self.p("apt", "generator_ema.safetensors")],
            "apt2": ["--checkpoint", self.p("apt", "generator_ema.safetensors"), "--steps", "2"],
        }  # fmt: skip
        for folder, key in ROWS.values():
            out = self.p("samples", folder)
            shutil.rmtree(out, ignore_errors=True)
            self.run("generate", [*base, *recipe[key], "--output", out])

    def stage_evaluate(self) -> None:
        rows = [f"{name}={self.p('samples', folder)}" for name, (folder, _) in ROWS.items()]
        self.run("evaluate", [
            self.py, ROOT / "tools" / "evaluate.py", "--real", self.p("data", "real"),
            *[a for r in rows for a in ("--row", r)], "--output", self.p("results"),
            "--size", "16", "--feature-steps", str(self.feature_steps),
            "--feature-net", self.p("models", "feature_net.safetensors"),
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
            "--metrics", f"APT losses={self.p('apt', 'metrics.jsonl')}",
            "--keys", "APT losses=loss_g,loss_d,loss_r1",
            "--metrics", f"APT discriminator logits={self.p('apt', 'metrics.jsonl')}",
            "--keys", "APT discriminator logits=d_real,d_fake",
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
        self.progress["_quick"] = self.quick
        if self.args.redo:
            for s in STAGES[STAGES.index(self.args.redo) :]:
                self.progress.pop(s, None)
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
        self.report()
        return 0

    def report(self) -> None:
        res = json.loads(self.p("results.json").read_text())
        print("\n" + self.p("results.md").read_text())
        cd, apt = res["rows"]["consistency 1 step"], res["rows"]["APT 1 step"]
        better_fd, sharper = apt["fd"] < cd["fd"], apt["sharpness"] > cd["sharpness"]
        print(
            f"APT 1 step vs consistency 1 step: FD {apt['fd']:.2f} vs {cd['fd']:.2f} "
            f"({'lower' if better_fd else 'NOT lower'}), sharpness {apt['sharpness']:.1f} vs "
            f"{cd['sharpness']:.1f} ({'higher' if sharper else 'NOT higher'})"
        )
        times = ", ".join(f"{s} {self.progress[s]:.0f} s" for s in STAGES)
        print(f"stage times: {times}")
        print(f"outputs: {self.out}  (results.md, figures/, samples/, logs/, commands.sh)")


if __name__ == "__main__":
    sys.exit(Demo(parse_args()).main())
