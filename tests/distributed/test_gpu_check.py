"""tools/gpu_check.sh --dry-run: the GPU check's own steps on CPU (issue 14), so that the rare
GPU minutes go to measuring, not to debugging the script: environment probe, tests/gpu (their
CPU halves), a deepspeed-launched tiny APT run with save and resume (bit-exact in fp32 on CPU)
and its throughput, and the benchmarks (the 8B forward, Wan2.1 against diffusers'
WanTransformer3DModel with the same weights, the APT update, ours against diffusers eager and
compiled); the JSON and Markdown report in OUT after every step; the time budget that keeps the
check inside one device command; a timed-out or stopped step takes its whole process group along
(issue 29, item 11); a GPU-tests step that tested nothing fails."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from megatron_apt.testing.launch import REPO_ROOT, launcher_env


# slow (make test-all, not CI): ~2.5 min (the benchmarks' cold compiles); the lease, budget,
# timeout and report paths are tested below
@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "report"
    env = launcher_env({"PYTHON": sys.executable})
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "tools" / "gpu_check.sh"), "--dry-run", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["passed"]
    steps = {s["step"]: s for s in report["steps"]}
    assert set(steps) == {
        "environment", "gpu-tests", "train", "train-first-half", "resume", "bench-forward",
        "bench-wan", "bench-apt", "bench-compile",
    }  # fmt: skip
    assert [s["step"] for s in report["steps"]].index("bench-wan") == 6  # after bench-forward
    assert report["complete"] and report["stopped"] is None
    compiled = steps["bench-compile"]
    assert compiled["compile_status"] == {"ours": "off", "ours compiled": "on"}
    assert compiled["diffusers"] == "timed" and compiled["compiled_ratio"] > 0
    assert compiled["eager_ratio"] > 0 and compiled["compiled_over_eager"] > 0
    assert "meets_goal" not in compiled  # a goal for GPUs, not judged on a CPU dry run
    assert steps["resume"]["resume_exact"] and steps["resume"]["resume_max_abs_diff"] == 0.0
    assert set(steps["resume"]["losses_full"]) == {"3", "4"}
    assert steps["environment"]["env"]["cuda_available"] is False
    assert steps["bench-forward"]["median_s"] > 0 and steps["bench-apt"]["tflops"] > 0
    assert steps["bench-apt"]["tokens_per_s"] > 0
    wan = steps["bench-wan"]  # ours against diffusers' Wan with our weights, checked to agree
    assert wan["diffusers"] == "timed" and wan["eager_ratio"] > 0 and wan["median_s"] > 0
    assert 0 <= wan["agreement_rel_err"] < 1e-3 and wan["diffusers_median_s"] > 0
    # tests/gpu's CPU halves measured: parity figures and the planner against live tensors
    tests = steps["gpu-tests"]
    assert tests["test_counts"]["cpu_passed"] >= 7 and tests["test_counts"]["cpu_failed"] == 0
    assert 0 < tests["bf16_forward_rel_err"] < 0.03 and 0 < tests["bf16_apt_grad_rel_err"]
    assert 0.8 <= tests["plan_over_measured"] <= 1.2
    # the trainer's own throughput, and the planner's figure for the recipe
    train = steps["train"]
    assert train["tokens_per_s"] > 0 and train["mfu"] > 0 and train["peak_mem_gib"] > 0
    assert train["plan_gib"] > 0 and train["updates_measured"] == 3
    md = (out / "gpu_check.md").read_text()
    assert "dry run on CPU" in md and "| resume | pass |" in md
    # OUT holds only what the device returns (<= 8 files); logs and runs are in OUT/work
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert names == ["bench-apt.json", "bench-compile.json", "bench-forward.json",
                     "bench-wan.json", "gpu_check.json", "gpu_check.md", "logs.tgz"]  # fmt: skip
    assert (out / "work" / "logs" / "train.log").read_text().count("TRAINING-DONE") == 1
    with tarfile.open(out / "logs.tgz") as t:
        assert {"logs/train.log", "logs/bench-compile.log", "logs/gpu-tests.json"} <= set(
            t.getnames()
        )


def test_gpu_check_refuses_a_cpu_machine_without_dry_run(tmp_path):
    """Without CUDA and without --dry-run the environment step fails (and says why)."""
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "gpu_check.py"), str(tmp_path / "r"),
         "--only", "environment"],
        cwd=REPO_ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    (step,) = json.loads((tmp_path / "r" / "gpu_check.json").read_text())["steps"]
    assert step["status"] == "fail" and "no CUDA device" in step["problem"]


def test_gpu_check_time_budget_skips_steps_and_still_reports(tmp_path):
    """--budget-s: a step with less than 20 s of the budget left is not started but recorded as
    skipped (with the reason), the report is complete and says so, and the check fails."""
    out = tmp_path / "r"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "gpu_check.py"), str(out), "--dry-run",
         "--only", "environment", "gpu-tests", "--budget-s", "21"],
        cwd=REPO_ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["complete"] and not report["passed"]
    steps = {s["step"]: s for s in report["steps"]}
    assert set(steps) == {"environment", "gpu-tests"}  # the environment step ran (>= 1 s)
    assert steps["gpu-tests"]["status"] == "skipped"
    assert "time budget" in steps["gpu-tests"]["problem"]
    md = (out / "gpu_check.md").read_text()
    assert "FAILED or skipped" in md and "| gpu-tests | skipped |" in md


def _probe_wheel(folder) -> None:
    """A minimal pure-Python wheel, standing in for the carried deepspeed / megatron-core ones."""
    folder.mkdir()
    files = {
        "gpu_lease_probe/__init__.py": "VALUE = 1\n",
        "gpu_lease_probe-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: gpu-lease-probe\n"
        "Version: 0.1\n",
        "gpu_lease_probe-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "gpu_lease_probe-0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(folder / "gpu_lease_probe-0.1-py3-none-any.whl", "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("gpu_lease_probe-0.1.dist-info/RECORD", record)


def test_gpu_lease_run_installs_the_wheels_and_returns_the_report(tmp_path):
    """tools/gpu_lease.sh run: the carried wheels installed into a folder on PYTHONPATH, the
    check run, and only the report copied into OUT, within what the device returns (at most 8
    files, plain names)."""
    _probe_wheel(tmp_path / "whl")
    out, site = tmp_path / "out", tmp_path / "site"
    env = launcher_env({
        "OUT": str(out), "GPU_CHECK_DIR": str(tmp_path / "work"), "GPU_LEASE_SITE": str(site),
        "PYTHON": sys.executable,
    })  # fmt: skip
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "tools" / "gpu_lease.sh"), "run", str(tmp_path / "whl"),
         "--dry-run", "--only", "environment"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (site / "gpu_lease_probe" / "__init__.py").is_file()
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gpu_check.json", "gpu_check.md", "logs.tgz"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names) and len(names) <= 8
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] and str(site) in report["pythonpath"].split(":")
    assert report["work"] == str(tmp_path / "work")  # the bulky part stays out of OUT
    with tarfile.open(out / "logs.tgz") as t:
        assert "logs/environment.log" in t.getnames()


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _processes_with(marker: str) -> list[int]:
    """Live processes of this user whose environment mentions ``marker`` (a tmp path)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "environ").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return [p for p in found if _alive(p)]


def _wait_until(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


SPAWNER = textwrap.dedent("""
    import pathlib, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    pathlib.Path(sys.argv[1]).write_text(str(child.pid))
    time.sleep(120)
""")


def test_step_timeout_kills_the_steps_whole_process_group(tmp_path):
    """A step that times out takes its children along (a launcher's ranks would otherwise
    keep the GPU): the command spawns a child that sleeps; after the step's time limit the
    child is gone, and the step is recorded as timed out."""
    from tools import gpu_check

    script, pid_file = tmp_path / "spawner.py", tmp_path / "child.pid"
    script.write_text(SPAWNER)
    check = gpu_check.Check(gpu_check.parse_args([str(tmp_path / "r"), "--dry-run"]))
    t0 = time.monotonic()
    step = check.run("spawner", [sys.executable, script, pid_file], timeout=3)
    child = int(pid_file.read_text())
    try:
        assert _wait_until(lambda: not _alive(child), 10), f"child {child} outlived its step"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)  # the old code's leftover: ours, end it
    assert step["rc"] == "timeout" and step["status"] == "fail"
    assert time.monotonic() - t0 < 30  # 3 s, SIGTERM, no need of the SIGKILL grace


def test_step_does_not_outlive_a_check_killed_by_sigkill(tmp_path):
    """SIGKILL to the check (a device time limit's last resort) cannot be caught: the step,
    in a session of its own, gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and ends."""
    pid_file = tmp_path / "step.pid"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from tools import gpu_check
        step = "import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(120)"
        check = gpu_check.Check(gpu_check.parse_args([{str(tmp_path / "r")!r}, "--dry-run"]))
        check.run("sleeper", [sys.executable, "-c", step], 120)
    """)  # noqa: E501
    check = subprocess.Popen([sys.executable, "-c", code], env=launcher_env())
    try:
        assert _wait_until(pid_file.exists, 60), "the step did not start"
        time.sleep(0.2)
        step = int(pid_file.read_text())
        check.kill()
        check.wait()
        assert _wait_until(lambda: not _alive(step), 10), f"step {step} outlived the check"
    finally:
        check.kill()
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_gpu_lease_run_stopped_at_its_time_limit_keeps_the_finished_steps(tmp_path):
    """The device stops a command at its time limit (SIGTERM, exit 124 / 137): OUT must
    already hold the report of the steps that finished, the check must stop its running step
    (no process of it left) and say so in the report."""
    out = tmp_path / "out"
    env = launcher_env({
        "OUT": str(out), "GPU_CHECK_DIR": str(tmp_path / "work"),
        "GPU_LEASE_SITE": str(tmp_path / "site"), "PYTHON": sys.executable,
    })  # fmt: skip
    lease = subprocess.Popen(
        ["bash", str(REPO_ROOT / "tools" / "gpu_lease.sh"), "run", str(tmp_path / "none"),
         "--dry-run", "--only", "environment", "gpu-tests"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    def environment_reported() -> bool:
        try:
            steps = json.loads((out / "gpu_check.json").read_text())["steps"]
        except (OSError, ValueError):
            return False
        return any(s["step"] == "environment" for s in steps)

    try:
        _wait_until(lambda: environment_reported() or lease.poll() is not None, 120)
        running = lease.poll() is None
        lease.send_signal(signal.SIGTERM)  # what timeout(1) sends the device command
        output, _ = lease.communicate(timeout=60)
        assert running, "OUT got no report while the check ran:\n" + output[-3000:]
    finally:
        lease.kill()
    assert lease.returncode == 128 + signal.SIGTERM, output[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert not report["complete"] and "SIGTERM" in report["stopped"]
    assert [s["step"] for s in report["steps"]] == ["environment"]
    assert "INCOMPLETE: stopped from outside by SIGTERM" in (out / "gpu_check.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "logs.tgz"]
    assert _wait_until(lambda: not _processes_with(str(tmp_path)), 15), _processes_with(
        str(tmp_path)
    )


def test_gpu_tests_step_that_tested_nothing_fails(tmp_path):
    """On a machine without CUDA but not in a dry run, every CUDA test of tests/gpu skips:
    the gpu-tests step has measured nothing on the device it is for and must fail saying so
    (pytest itself passes: the CPU halves ran, the rest skipped)."""
    out = tmp_path / "r"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "gpu_check.py"), str(out),
         "--only", "gpu-tests"],
        cwd=REPO_ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    (step,) = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert step["rc"] == 0 and step["status"] == "fail", step
    assert step["problem"] == "nothing tested: no cuda test passed"
    counts = step["test_counts"]
    assert counts["cuda_passed"] == 0 and counts["cuda_skipped"] >= 7 and counts["cpu_passed"]
    assert "needs CUDA" in " ".join(step["skipped_because"])


def test_gpu_lease_run_without_out_says_so(tmp_path):
    env = launcher_env({"PYTHON": sys.executable})
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "tools" / "gpu_lease.sh"), "run", str(tmp_path / "none")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and "OUT is not set" in proc.stderr
