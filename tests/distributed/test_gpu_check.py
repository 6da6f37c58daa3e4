"""tools/gpu_check.sh --dry-run: the GPU check's own steps on CPU (issue 14), so that the rare
GPU minutes go to measuring, not to debugging the script: environment probe, tests/gpu, a
deepspeed-launched tiny APT run with save and resume (bit-exact in fp32 on CPU), and the two
benchmarks (the 8B forward, the APT update, ours against diffusers eager and compiled); the JSON
and Markdown report; the time budget that keeps the check inside one device command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import zipfile

from megatron_apt.testing.launch import REPO_ROOT, launcher_env


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
        "bench-apt", "bench-compile",
    }  # fmt: skip
    assert report["complete"]
    compiled = steps["bench-compile"]
    assert compiled["compile_status"] == {"ours": "off", "ours compiled": "on"}
    assert compiled["diffusers"] == "timed" and compiled["compiled_ratio"] > 0
    assert compiled["eager_ratio"] > 0 and compiled["compiled_over_eager"] > 0
    assert "meets_goal" not in compiled  # a goal for GPUs, not judged on a CPU dry run
    assert steps["resume"]["resume_exact"] and steps["resume"]["resume_max_abs_diff"] == 0.0
    assert set(steps["resume"]["losses_full"]) == {"3", "4"}
    assert steps["environment"]["env"]["cuda_available"] is False
    assert steps["bench-forward"]["median_s"] > 0 and steps["bench-apt"]["tflops"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "dry run on CPU" in md and "| resume | pass |" in md
    assert (out / "logs" / "train.log").read_text().count("TRAINING-DONE") == 1


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
    with tarfile.open(out / "logs.tgz") as t:
        assert "logs/environment.log" in t.getnames()


def test_gpu_lease_run_without_out_says_so(tmp_path):
    env = launcher_env({"PYTHON": sys.executable})
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "tools" / "gpu_lease.sh"), "run", str(tmp_path / "none")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and "OUT is not set" in proc.stderr
