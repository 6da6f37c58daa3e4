#!/usr/bin/env python
"""The GPU check: one short, prepared run of what a CUDA machine can show (``tools/gpu_check.sh``).

    tools/gpu_check.sh OUT                # on a CUDA machine (one GPU), <= 9 minutes (--budget-s)
    tools/gpu_check.sh --dry-run OUT      # the same steps on CPU (gloo, fp32, small presets)

Steps (each with its own time limit; a failed step is reported and the next one runs):

1. ``environment``: torch, CUDA, the GPU, and which of deepspeed / megatron-core /
   transformer-engine / flash-attn import;
2. ``gpu-tests``: ``pytest tests/gpu``: needing only torch CUDA, the ``local`` spec (megatron-core
   linears + torch SDPA) in bf16 and fp32 on CUDA against the CPU fp32 reference (the MMDiT's
   forward and every gradient; one APT update) and the memory planner against
   ``torch.cuda.max_memory_allocated``; the TE / flash-attn rows where they import. The
   per-test outcomes and figures come back in the report; the step fails when a test failed or
   when no test of the machine's device passed ("nothing tested": on a GPU, every CUDA test
   skipped). A dry run runs the same tests, whose CPU halves then do the measuring;
3. ``train`` + ``resume``: ``pretrain_apt.py --recipe tiny-apt --bf16`` for 4 updates under the
   ``deepspeed`` launcher, 1 process (NCCL), saving at update 2; the trainer's logged
   ``tokens_per_s``, ``mfu``, ``tflops_per_gpu`` and ``peak_mem_gib`` (median over updates 2-4;
   peak: the largest) and ``tools/plan_memory.py``'s prediction for the recipe are reported
   (a run that logged none of them fails); then the same run stopped at 2 and resumed to 4
   from its checkpoint: the logged losses of updates 3 and 4 are compared (exact in fp32 on
   CPU; on a GPU the difference is reported, as non-deterministic kernels may leave a
   last-bit difference);
4. ``bench-forward``: ``tools/benchmark.py --preset mmdit-8b --latent 13x90x160 --phases forward
   --dtype bf16 --layer-spec local`` (torch SDPA's flash kernel); the paper's Table 8 reports
   2.65 s for its 8B DiT at this shape on one H100, the goal here is <= 1.9 s;
5. ``bench-wan``: ``tools/benchmark.py --preset wan2.1-t2v-1.3b --latent 21x60x104 --text-len
   512 --phases forward --dtype bf16 --layer-spec local``: Wan2.1's 1.3B transformer at 480p x
   81 frames (32,760 visual tokens, umT5's 512 text tokens), ours against diffusers'
   ``WanTransformer3DModel`` loaded with our weights (where diffusers imports; carry its
   wheel), the outputs checked to agree before timing; ``eager_ratio`` = ours / diffusers.
   Forward only: forward + backward of 32,760 tokens without recomputation does not fit one GPU
   next to the twin;
6. ``bench-apt``: the ``mid`` preset's APT update (G and D, forward + backward), its MFU;
7. ``bench-compile``: issue 17's comparison on the GPU: ``tools/benchmark.py --preset mid
   --latent 1x64x64 --phases fwd-bwd --compile both --dtype bf16``, ours and diffusers'
   ``SD3Transformer2DModel`` (where diffusers imports; carry its wheel) eager and compiled per
   block in one run; ``meets_goal``: ours compiled / diffusers compiled <= 0.85.

Writes into OUT, after every step, so that a run stopped from outside keeps what it measured
(the device returns at most 8 files of OUT): ``gpu_check.json`` and ``gpu_check.md`` (each
step: status, seconds, the command, the tail of its log; the numbers), ``logs.tgz`` (every
step's full log and the GPU tests' per-test report) and the benchmarks' ``bench-*.json``. The
bulky run folders and the plain logs live in ``--work`` (default ``OUT/work``). Each step runs
in its own process group (session); at its time limit the whole group gets SIGTERM, then
SIGKILL after a grace period, so no rank process of a timed-out launcher is left on the GPU.
``--budget-s`` (default 540; 900 with ``--dry-run``) bounds the whole check below the device's
10 minutes per command: each step's time limit is cut to what is left, and a step with less
than 20 s left is recorded as ``skipped``. Exit code 0 when every step passed, 1 otherwise
(the report is written either way).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER_8B_FORWARD_S = 2.65  # paper, Table 8: one forward of its 8B DiT at 13x90x160, one H100
GOAL_8B_FORWARD_S = 1.9
GOAL_COMPILED_RATIO = 0.85  # issue 17: ours compiled / diffusers compiled, forward + backward
MIN_STEP_S = 20.0  # a step is not started with less of --budget-s left
KILL_GRACE_S = 10.0  # SIGTERM to a timed-out step's process group, then SIGKILL after this
GPU_TESTS_ENV = "MEGATRON_APT_GPU_TESTS_JSON"  # tests/gpu/conftest.py writes its report there
PERF_KEYS = ("tokens_per_s", "mfu", "tflops_per_gpu", "step_time_s")  # the trainer's log
REPORT_KEYS = (  # a step's results shown in gpu_check.md
    "median_s",
    "tflops",
    "mfu",
    "compiled_ratio",
    "eager_ratio",
    "compiled_over_eager",
    "agreement_rel_err",
    "meets_goal",
    "tests",
    "bf16_forward_rel_err",
    "bf16_apt_grad_rel_err",
    "plan_over_measured",
    "tokens_per_s",
    "peak_mem_gib",
    "plan_gib",
    "resume_max_abs_diff",
    "problem",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", type=Path, help="report folder (created): the <= 8 files to keep")
    p.add_argument(
        "--work",
        type=Path,
        help="folder for the plain logs and the training runs (default OUT/work)",
    )
    p.add_argument("--dry-run", action="store_true", help="CPU: gloo, fp32, small presets")
    p.add_argument(
        "--only", nargs="+", help="run only these steps (environment, gpu-tests, train, ...)"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        help="seconds for the whole check: each step's time limit is cut to what is left and a "
        f"step with less than {MIN_STEP_S:.0f} s left is skipped (default 540, under the "
        "device's 10 minutes per command; 900 for --dry-run, which has no such limit)",
    )
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 900.0 if args.dry_run else 540.0
    if args.budget_s <= 0:
        p.error(f"--budget-s {args.budget_s}: must be positive")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Stopped(Exception):
    """The check got SIGTERM / SIGINT / SIGHUP (e.g. the device command's time limit)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame) -> None:
    raise Stopped(signum)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """``sig`` to every process of the group ``pgid`` (none left: nothing to do)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate_group(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM to ``proc``'s process group, SIGKILL after :data:`KILL_GRACE_S`; its output."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        return proc.communicate()


def _die_with_parent() -> None:
    """In a step's process before it execs: SIGTERM to it when the check dies, even by SIGKILL
    (Linux ``prctl(PR_SET_PDEATHSIG)``, linux/prctl.h ``PR_SET_PDEATHSIG 1``), since its own
    session is out of reach of a signal to the check's process group; launchers pass SIGTERM
    on to their ranks. Elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def run_step_command(cmd: list[str], cwd, env: dict, timeout: float) -> tuple[int | str, str]:
    """Run ``cmd`` in a session of its own (``start_new_session``: a new process group whose
    id is its pid) and return ``(exit code or "timeout", stdout + stderr)``.

    ``subprocess.run(timeout=...)`` kills only the process it started (CPython 3.11
    Lib/subprocess.py:552 in ``run``: ``process.kill()`` on ``TimeoutExpired``), so a
    launcher's rank processes would live on, holding the GPU. At the time limit the whole
    group gets SIGTERM, then SIGKILL after :data:`KILL_GRACE_S`; so it does when the check
    itself is stopped (:class:`Stopped`, re-raised); after a normal exit, whatever the step
    left behind in its
    group is killed too."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=_die_with_parent,
    )  # fmt: skip
    note = ""
    try:
        out, err = proc.communicate(timeout=timeout)
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        out, err = _terminate_group(proc)
        rc = "timeout"
        note = f"\n(timed out: {timeout:.0f} s; its process group {proc.pid} was terminated)"
    except BaseException:  # Stopped, KeyboardInterrupt: take the step's processes along
        _terminate_group(proc)
        raise
    finally:
        _signal_group(proc.pid, signal.SIGKILL)
    return rc, f"{out or ''}\n--- stderr ---\n{err or ''}{note}"


def _write_atomically(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a check killed meanwhile leaves the previous
    version, never half a file."""
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    os.replace(tmp, path)


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args, self.dry = args, args.dry_run
        self.out = args.out.resolve()
        self.work = (args.work or args.out / "work").resolve()
        self.logs = self.work / "logs"
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.steps: list[dict] = []
        self.t0 = time.perf_counter()
        self.finished = False  # the report says "incomplete" until every step has run
        self.stopped = None  # why the check stopped early (a signal), if it did
        self.env = dict(os.environ)
        path = [str(ROOT), self.env.get("PYTHONPATH")]
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
        self.env.setdefault("PYTHONWARNINGS", "ignore")
        if self.dry:  # CPU: DeepSpeed's CPU accelerator, gloo, no GPU in sight
            self.env.update(
                DS_ACCELERATOR="cpu", MEGATRON_APT_BACKEND="gloo", CUDA_VISIBLE_DEVICES=""
            )
            self.env.setdefault("OMP_NUM_THREADS", "1")
        else:  # megatron's sequence-parallel overlap needs one CUDA work queue per device
            self.env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

    # ---- running ----------------------------------------------------------------------------
    def run(self, name: str, cmd: list, timeout: int, check=None, env=None, always=False):
        """Run one step (``check()`` adds its figures or fails it; with ``always`` it also
        runs after a non-zero exit, to report what was measured) and record it."""
        if self.args.only and not any(name.startswith(o) for o in self.args.only):
            return {}
        left = self.args.budget_s - (time.perf_counter() - self.t0)
        if left < MIN_STEP_S:
            why = f"time budget: {max(left, 0):.0f} s of --budget-s {self.args.budget_s:g} left"
            return self._record({
                "step": name, "command": " ".join(map(str, cmd)), "rc": None, "seconds": 0.0,
                "status": "skipped", "problem": why,
            })  # fmt: skip
        timeout = int(min(timeout, left))
        log = self.logs / f"{name}.log"
        print(f"[gpu-check] {name}: {' '.join(map(str, cmd))}", flush=True)
        t0 = time.perf_counter()
        rc, text = run_step_command([str(c) for c in cmd], ROOT, env or self.env, timeout)
        log.write_text(text)
        step = {
            "step": name,
            "command": " ".join(map(str, cmd)),
            "rc": rc,
            "seconds": round(time.perf_counter() - t0, 1),
            "log": f"logs/{log.name} (in logs.tgz)",
            "tail": text.strip().splitlines()[-12:],
            "status": "pass" if rc == 0 else "fail",
        }
        if check is not None and (rc == 0 or always):
            try:
                found = check()
            except Exception as e:  # a failed check is a failed step, reported
                found = {"status": "fail", "problem": f"{type(e).__name__}: {e}"}
            if rc != 0:  # the figures of a failed step, never a pass
                found["status"] = "fail"
                found.setdefault("problem", f"exit code {rc}")
            step.update(found)
        return self._record(step)

    def _record(self, step: dict) -> dict:
        """Keep a finished (or skipped) step and rewrite the report and logs.tgz with it."""
        self.steps.append(step)
        self.write_report()
        why = f": {step['problem']}" if step["status"] != "pass" and step.get("problem") else ""
        print(
            f"[gpu-check] {step['step']}: {step['status']} ({step['seconds']} s){why}", flush=True
        )
        return step

    def pack_logs(self) -> None:
        """OUT/logs.tgz: every plain log (and the GPU tests' report) of the work folder."""

        def write(tmp: Path) -> None:
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(self.logs, arcname="logs")

        _write_atomically(self.out / "logs.tgz", write)

    def py(self, *args) -> list:
        return [sys.executable, *args]

    # ---- steps ------------------------------------------------------------------------------
    def environment(self) -> None:
        probe = (
            "import importlib, json, torch\n"
            "out = {'torch': torch.__version__, 'cuda': torch.version.cuda,\n"
            "       'cuda_available': torch.cuda.is_available(),\n"
            "       'device': torch.cuda.get_device_name(0)\n"
            "                 if torch.cuda.is_available() else None}\n"
            "for m in ('deepspeed', 'megatron.core', 'transformer_engine', 'flash_attn'):\n"
            "    try:\n"
            "        mod = importlib.import_module(m)\n"
            "        out[m] = getattr(mod, '__version__', 'present')\n"
            "    except Exception as e:\n"
            "        out[m] = f'missing ({type(e).__name__})'\n"
            "print('ENV ' + json.dumps(out))\n"
        )
        self.run("environment", self.py("-c", probe), 120, check=self._env_check)

    def _env_check(self) -> dict:
        text = (self.logs / "environment.log").read_text()
        line = next(ln for ln in text.splitlines() if ln.startswith("ENV "))
        env = json.loads(line[4:])
        if not self.dry and not env["cuda_available"]:
            problem = "no CUDA device (use --dry-run on CPU)"
            return {"status": "fail", "problem": problem, "env": env}
        return {"env": env}

    def gpu_tests(self) -> None:
        report = self.logs / "gpu-tests.json"
        report.unlink(missing_ok=True)
        cmd = self.py("-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider")
        env = {**self.env, GPU_TESTS_ENV: str(report)}
        self.run("gpu-tests", cmd, 300, check=lambda: self._gpu_tests(report), env=env,
                 always=True)  # fmt: skip

    def _gpu_tests(self, path: Path) -> dict:
        """The per-test report of tests/gpu/conftest.py: counts per device, the headline
        figures; "nothing tested" when no test of this machine's device passed."""
        if not path.is_file():
            return {"status": "fail", "problem": f"pytest wrote no per-test report ({path.name})"}
        tests = json.loads(path.read_text())["tests"]
        device = "cpu" if self.dry else "cuda"
        count = lambda dev, outcome: sum(  # noqa: E731
            t["outcome"] == outcome and t["device"] == dev for t in tests
        )
        summary = {
            f"{dev}_{outcome}": count(dev, outcome)
            for dev in ("cuda", "cpu") for outcome in ("passed", "failed", "skipped")
        }  # fmt: skip
        out = {
            "tests": ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary.items() if v),
            "test_counts": summary,
            "figures": {t["test"].split("::")[-1]: t["figures"] for t in tests if t["figures"]},
            "skipped_because": sorted(
                {t.get("reason", "") for t in tests if t["outcome"] == "skipped"}
            ),  # fmt: skip
            **self._headline(tests, device),
        }
        failed = [t["test"] for t in tests if t["outcome"] == "failed"]
        if failed:
            out.update(status="fail", problem=f"{len(failed)} failed: {', '.join(failed)[:300]}")
        elif summary[f"{device}_passed"] == 0:
            out.update(status="fail", problem=f"nothing tested: no {device} test passed")
        return out

    @staticmethod
    def _headline(tests: list[dict], device: str) -> dict:
        """The worst bf16 figures of the parity tests and the planner's ratio on ``device``."""
        mine = [t for t in tests if t["device"] == device and t["outcome"] == "passed"]
        out = {}
        for key, test, figure in (
            ("bf16_forward_rel_err", "test_mmdit_on_", "forward_rel_err"),
            ("bf16_apt_grad_rel_err", "test_apt_update_on_", "grad_worst_rel_err"),
            ("plan_over_measured", "test_plan_within_", "plan_over_measured"),
        ):
            values = [
                float(t["figures"][figure]) for t in mine
                if test in t["test"] and figure in t["figures"]
                and ("bf16" in t["test"] or key == "plan_over_measured")
            ]  # fmt: skip
            if values:
                out[key] = max(values)
        return out

    def train_and_resume(self) -> None:
        launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
        port = str(free_port())
        base = [launcher, "--num_gpus", "1", "--master_port", port, ROOT / "pretrain_apt.py",
                "--recipe", "tiny-apt", "--log-interval", "1", "--save-interval", "2"]  # fmt: skip
        base += ["--fp32"] if self.dry else ["--bf16"]
        full, part = self.work / "runs" / "full", self.work / "runs" / "resumed"
        for d in (full, part):
            shutil.rmtree(d, ignore_errors=True)
        self.run("train", [*base, "--train-iters", "4", "--save", full], 300,
                 check=lambda: self._throughput(full))  # fmt: skip
        self.run("train-first-half", [*base, "--train-iters", "2", "--save", part], 300)
        self.run(
            "resume", [*base, "--train-iters", "4", "--save", part, "--load", part], 300,
            check=lambda: self._compare(full, part),
        )  # fmt: skip

    def _throughput(self, run: Path) -> dict:
        """The trainer's own figures (megatron_apt/engine/throughput.py, one record per logged
        update): medians over the updates after the first, the largest peak memory; and
        tools/plan_memory.py's plan of the recipe (reported: at tiny size the measured peak
        is mostly the runtime's workspaces, the planner is judged by tests/gpu)."""
        records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if "event" not in r and "tokens_per_s" in r]
        if not records:
            return {"status": "fail", "problem": "the run logged no throughput (tokens_per_s)"}
        later = records[1:] or records
        out = {k: statistics.median(r[k] for r in later) for k in PERF_KEYS if k in later[0]}
        out["peak_mem_gib"] = max(r.get("peak_mem_gib", 0.0) for r in records)
        out["updates_measured"] = len(later)
        plan = subprocess.run(
            self.py(ROOT / "tools" / "plan_memory.py", "--recipe", "tiny-apt", "--gpus", "1",
                    "--dtype", "fp32" if self.dry else "bf16", "--json"),
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if plan.returncode == 0:
            (entry,) = json.loads(plan.stdout).values()  # {"custom": plan}
            out["plan_gib"] = entry["total_gib"]
            out["peak_over_plan"] = out["peak_mem_gib"] / out["plan_gib"]
        else:
            out["plan_problem"] = plan.stderr.strip()[-300:]
        return out

    def _compare(self, full: Path, part: Path) -> dict:
        def losses(d: Path) -> dict[int, dict]:
            out = {}
            for ln in (d / "metrics.jsonl").read_text().splitlines():
                r = json.loads(ln)
                if "event" not in r:
                    out[int(r["step"])] = {k: v for k, v in r.items() if k.startswith("loss")}
            return out

        a, b = losses(full), losses(part)
        diffs = {
            f"{s}/{k}": abs(a[s][k] - b[s][k]) for s in (3, 4) for k in a[s] if k in b.get(s, {})
        }
        if not diffs:
            return {"status": "fail", "problem": "no losses of updates 3 and 4 to compare"}
        worst = max(diffs.values())
        scale = max(abs(a[s][k]) for s in (3, 4) for k in a[s]) or 1.0
        exact = worst == 0.0
        # fp32 on CPU must be bit-exact; bf16 GPU kernels may differ in the last bits
        ok = exact or (not self.dry and worst <= 1e-3 * scale)
        return {
            "status": "pass" if ok else "fail",
            "resume_max_abs_diff": worst,
            "resume_exact": exact,
            "losses_full": {str(s): a[s] for s in (3, 4)},
        }

    def _bench_args(self, size: str) -> list[str]:
        """``tools/benchmark.py`` arguments: on the GPU the paper's 8B model at its video shape
        (``big``) or ``mid`` in bf16; in a dry run the ``tiny`` model in fp32 on CPU for both."""
        if self.dry:
            return ["--preset", "tiny", "--latent", "1x16x16", "--text-len", "16", "--dtype",
                    "fp32", "--device", "cpu", "--repeats", "2", "--warmup", "1"]  # fmt: skip
        shape = {"big": ["mmdit-8b", "13x90x160"], "mid": ["mid", "1x64x64"]}[size]
        return ["--preset", shape[0], "--latent", shape[1], "--dtype", "bf16", "--device", "cuda",
                "--repeats", "5", "--warmup", "2"]  # fmt: skip

    def benchmarks(self) -> None:
        tool = ROOT / "tools" / "benchmark.py"
        steps = (("bench-forward", "big", "forward"), ("bench-apt", "mid", "apt"))
        for name, size, phases in steps:
            js = self.out / f"{name}.json"
            cmd = self.py(tool, *self._bench_args(size), "--phases", phases, "--layer-spec",
                          "local", "--skip-diffusers", "--json-out", js)  # fmt: skip
            self.run(name, cmd, 420, check=lambda js=js, phases=phases: self._bench(js, phases))
            if name == "bench-forward":
                self.bench_wan()

    def _wan_args(self) -> list[str]:
        """Wan2.1 1.3B at 480p x 81 frames (VAE 4x8x8: latent 21x60x104) with umT5's 512
        tokens in bf16 on the GPU; in a dry run ``wan-debug`` at a latent of 4 tokens, no
        warm-up and one repeat (the code path, not a figure: it must stay cheap)."""
        if self.dry:
            return ["--preset", "wan-debug", "--latent", "1x4x4", "--text-len", "8", "--dtype",
                    "fp32", "--device", "cpu", "--repeats", "1", "--warmup", "0"]  # fmt: skip
        return ["--preset", "wan2.1-t2v-1.3b", "--latent", "21x60x104", "--text-len", "512",
                "--dtype", "bf16", "--device", "cuda", "--repeats", "3",
                "--warmup", "1"]  # fmt: skip

    def bench_wan(self) -> None:
        """Our Wan2.1 forward against diffusers' ``WanTransformer3DModel`` with the same
        weights (the tool checks that both outputs agree before timing: exit 1 if not)."""
        js = self.out / "bench-wan.json"
        cmd = self.py(ROOT / "tools" / "benchmark.py", *self._wan_args(), "--phases", "forward",
                      "--layer-spec", "local", "--json-out", js)  # fmt: skip
        self.run("bench-wan", cmd, 240, check=lambda: self._wan(js))

    def _wan(self, path: Path) -> dict:
        result = json.loads(path.read_text())
        entry = result["phases"]["forward"]
        ours = entry["ours"]
        twin = result["diffusers"]
        out = {
            "median_s": ours["median_s"],
            "tokens_per_s": ours["tokens_per_s"],
            "tflops": ours["tflops"],
            "mfu": ours.get("utilization_vs_peak"),
            "peak_mem_mib": ours["memory"]["peak_mib"],
            "device": result["device"]["name"],
            "diffusers": twin.get("skipped") or "timed",
        }
        if "diffusers" in entry:
            out["diffusers_median_s"] = entry["diffusers"]["median_s"]
            out["eager_ratio"] = entry["comparisons"]["ours / diffusers"]["ratio"]
            out["agreement_rel_err"] = twin["agreement"]["rel_err"]
        return out

    def bench_compile(self) -> None:
        """Issue 17 on the GPU: ours against diffusers' SD3 transformer of the same size, eager
        and compiled per block (``--compile both``), forward + backward, in one run."""
        js = self.out / "bench-compile.json"
        cmd = self.py(ROOT / "tools" / "benchmark.py", *self._bench_args("mid"), "--phases",
                      "fwd-bwd", "--compile", "both", "--layer-spec", "local", "--json-out",
                      js)  # fmt: skip
        self.run("bench-compile", cmd, 360, check=lambda: self._compiled(js))

    def _compiled(self, path: Path) -> dict:
        result = json.loads(path.read_text())
        entry = result["phases"]["forward_backward"]
        comparisons = entry.get("comparisons", {})
        out = {
            "median_s": entry["ours compiled"]["median_s"],
            "tflops": entry["ours compiled"]["tflops"],
            "device": result["device"]["name"],
            "compile_status": result.get("compile_status"),
            "diffusers": result["diffusers"].get("skipped") or "timed",
        }
        for key, label in (
            ("ours compiled / diffusers compiled", "compiled_ratio"),
            ("ours / diffusers", "eager_ratio"),
            ("ours compiled / ours", "compiled_over_eager"),
        ):
            if key in comparisons:
                out[label] = comparisons[key]["ratio"]
        fell_back = {
            k: v for k, v in (out["compile_status"] or {}).items() if v != "on" and "compiled" in k
        }
        if fell_back:  # an eager fallback would make the compiled rows meaningless
            out.update(status="fail", problem=f"compilation fell back to eager: {fell_back}")
        elif "compiled_ratio" in out and not self.dry:
            out["meets_goal"] = out["compiled_ratio"] <= GOAL_COMPILED_RATIO
        return out

    def _bench(self, path: Path, phase: str) -> dict:
        result = json.loads(path.read_text())
        entry = next(iter(result["phases"].values()))["ours"]
        out = {
            "median_s": entry["median_s"],
            "tokens_per_s": entry["tokens_per_s"],
            "tflops": entry["tflops"],
            "mfu": entry.get("utilization_vs_peak"),
            "peak_mem_mib": entry["memory"]["peak_mib"],
            "device": result["device"]["name"],
        }
        if phase == "forward" and not self.dry:
            out["paper_h100_s"] = PAPER_8B_FORWARD_S
            out["goal_s"] = GOAL_8B_FORWARD_S
            out["meets_goal"] = entry["median_s"] <= GOAL_8B_FORWARD_S
        return out

    # ---- report -----------------------------------------------------------------------------
    def write_report(self) -> bool:
        """Write gpu_check.json and gpu_check.md from the steps so far; True when all passed."""
        ok = self.finished and all(s["status"] == "pass" for s in self.steps)
        data = {
            "tool": "tools/gpu_check.sh",
            "dry_run": self.dry,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "python": platform.python_version(),
            "pythonpath": self.env["PYTHONPATH"],
            "work": str(self.work),
            "passed": ok,
            "complete": self.finished,
            "stopped": self.stopped,
            "steps": self.steps,
        }
        text = json.dumps(data, indent=1, default=str) + "\n"
        _write_atomically(self.out / "gpu_check.json", lambda tmp: tmp.write_text(text))
        lines = [
            f"# GPU check{' (dry run on CPU: no GPU figure here)' if self.dry else ''}",
            "",
            f"{data['date_utc']}, `tools/gpu_check.sh{' --dry-run' if self.dry else ''}`: "
            + (
                "every step passed."
                if ok
                else "FAILED or skipped steps below."
                if self.finished
                else f"INCOMPLETE: {self.stopped}."
                if self.stopped
                else "INCOMPLETE: stopped (or still running) after the steps below."
            ),
            "",
            "| step | status | seconds | result |",
            "|---|---|---:|---|",
        ]
        for s in self.steps:
            res = ", ".join(f"{k} {_fmt(s[k])}" for k in REPORT_KEYS if s.get(k) is not None)
            lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {res} |")
        env = next((s.get("env") for s in self.steps if s.get("env")), None)
        if env:
            lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items())]
        lines += ["", "Commands and log tails: `gpu_check.json`; full logs: `logs.tgz`."]
        md = "\n".join(lines) + "\n"
        _write_atomically(self.out / "gpu_check.md", lambda tmp: tmp.write_text(md))
        self.pack_logs()
        return ok

    def report(self) -> int:
        self.finished = True
        ok = self.write_report()
        print((self.out / "gpu_check.md").read_text(), end="")
        return 0 if ok else 1

    def main(self) -> int:
        """Every step, then the final report. Stopped from outside (SIGTERM, SIGINT, SIGHUP),
        the running step's processes are terminated and the report (INCOMPLETE, naming the
        signal) is written before exiting with 128 + the signal's number."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _raise_stopped)
        try:
            self.environment()
            self.gpu_tests()
            self.train_and_resume()
            self.benchmarks()
            self.bench_compile()
        except Stopped as e:
            self.stopped = f"stopped from outside by {e} during the step after the last one"
            self.write_report()
            print(f"[gpu-check] {self.stopped}", flush=True)
            return 128 + e.signum
        return self.report()


if __name__ == "__main__":
    sys.exit(Check(parse_args()).main())
