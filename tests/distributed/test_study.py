"""`make study`, shortened: examples/apt_study.py --quick runs the shared pre-stages, two arms
(APT and one ablation) for one seed through the real launcher, one evaluation and the report
with its pictures; a second run skips every finished step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from megatron_apt.testing.launch import REPO_ROOT


def _study(out, report, *extra):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(REPO_ROOT / "examples" / "apt_study.py"), "--quick",
           "--out", str(out), "--report", str(report), "--seeds", "5", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_quick_study_runs_arms_and_writes_the_report(tmp_path):
    out, report = tmp_path / "study", tmp_path / "docs" / "study.md"
    proc = _study(out, report, "--arms", "no-r1", "consistency-more")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    rows = set(results["rows"])
    assert {"apt / seed 5", "no-r1 / seed 5", "consistency-more / seed 5"} <= rows, rows
    # the floors beside the arms, made by the study (its base ran no demo generate stage)
    refs = {"real data through the VAE", "teacher: diffusion 25 steps (CFG)"}
    assert refs <= rows, rows
    for folder in ("vae-recon", "diffusion-25"):
        assert any((out / "samples" / folder).iterdir()), folder
    # the arm's flag reached its run; the control distilled for 3 + 3 updates
    state = json.loads(
        next((out / "runs" / "no-r1" / "seed5").glob("iter_*/trainer_state.json")).read_text()
    )
    assert state["config"]["r1_lambda"] == 0.0 and state["config"]["seed"] == 5
    cons = json.loads(
        next(
            (out / "runs" / "consistency-more" / "seed5").glob("iter_*/trainer_state.json")
        ).read_text()
    )
    assert cons["stage"] == "consistency" and cons["step"] == 6  # 3 shared + 3 more
    text = report.read_text()
    for needle in (
        "| APT (demo recipe) |",
        "| no approximated R1",
        "reproduced?",
        "Quick run",
        "| real data through the VAE |",
        "| teacher: diffusion 25 steps (CFG)",
    ):
        assert needle in text, needle
    for png in ("health.png", "samples.png"):
        assert (report.parent / "study" / png).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"apt", "no-r1", "consistency-more"}
    # resumable: a second run only re-evaluates and re-writes the report
    again = _study(out, report, "--arms", "no-r1", "consistency-more")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "/train ..." not in again.stdout, again.stdout[-3000:]
    # a study on a finished base reuses its stages (one arm is enough to show it); one with
    # another seed is refused
    other = _study(tmp_path / "study2", report, "--base", str(out / "base"), "--arms", "no-r1")
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    for stage in ("data", "vae", "preprocess", "diffusion", "consistency"):
        assert f"[study] base/{stage}: done earlier in" in other.stdout, stage
    wrong = _study(tmp_path / "study3", report, "--base", str(out / "base"), "--base-seed", "4")
    assert (
        wrong.returncode != 0 and "--seed 0" in wrong.stderr and str(out / "base") in wrong.stderr
    )
