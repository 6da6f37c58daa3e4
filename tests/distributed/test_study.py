"""`make study`, shortened: examples/apt_study.py --quick on a finished base (the session's quick
demo, conftest.py, whose stages and reference samples it reuses) runs the arms
(APT, one ablation, the consistency control and the twice-as-long pair that continues APT's and
the ablation's runs) for one seed through the real launcher, EMA and raw-generator samples, one
evaluation and the report with its pictures; a second run skips every finished step, and
--report-only re-creates the report byte for byte from OUT and the hand-written context. (The
shared pre-stages run by the study itself: examples/demo.py's, tested by test_demo.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_apt.evaluation.study_report import OUTCOMES
from megatron_apt.testing.launch import QUICK_DEMO_SEED, REPO_ROOT, launcher_env

# slow (make test-all, not CI): the study tool end to end (~8 min); the study itself is `make
# study`; its report is tested in tests/unit/test_study_report.py
pytestmark = pytest.mark.slow

CONTEXT = (
    "Hand-written context: `apt / seed 5` is a quick run.\n\n"
    "- kept *verbatim* | with a pipe and [a link](https://example.org)\n"
)


def _study(out, report, *extra):
    env = launcher_env()  # gloo, CUDA hidden: a GPU machine runs these on the CPU too
    cmd = [sys.executable, str(REPO_ROOT / "examples" / "apt_study.py"), "--quick",
           "--out", str(out), "--report", str(report), "--seeds", "5", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_quick_study_runs_arms_and_writes_the_report(quick_demo, tmp_path):
    base = quick_demo[0]  # a finished examples/demo.py --quick --seed 11
    out, report = tmp_path / "study", tmp_path / "docs" / "study.md"
    report.parent.mkdir(parents=True)
    context = report.with_name("study_context.md")  # read next to the report
    context.write_text(CONTEXT)
    arms = ("--arms", "no-r1-long", "consistency-more")  # + apt, no-r1, apt-long (needed)
    arms += ("--base", str(base), "--base-seed", str(QUICK_DEMO_SEED))
    proc = _study(out, report, *arms)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    rows = set(results["rows"])
    keys = ("apt", "no-r1", "apt-long", "no-r1-long")
    want = {f"{k} / seed 5" for k in (*keys, "consistency-more")}
    want |= {f"{k}-raw / seed 5" for k in keys}  # raw generators beside the EMA
    assert want <= rows, want - rows
    assert "consistency-more-raw / seed 5" not in rows
    # the base's stages and its reference samples (the floors beside the arms) reused, not re-run
    for stage in ("data", "vae", "preprocess", "diffusion", "consistency"):
        assert f"[study] base/{stage}: done earlier in" in proc.stdout, stage
    refs = {"real data through the VAE", "teacher: diffusion 25 steps (CFG)"}
    assert refs <= rows, rows
    for row in refs:
        assert f"[study] {row}: the samples of {base}, reused" in proc.stdout, row
    assert not (out / "samples" / "diffusion-25").exists()
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
    # the long ablation continued the short one's run (not a fresh start) to twice its updates,
    # with its flags, and its metrics cover the whole run
    long = out / "runs" / "no-r1-long" / "seed5"
    state = json.loads((long / "iter_0000006" / "trainer_state.json").read_text())
    assert state["config"]["r1_lambda"] == 0.0 and state["step"] == 6
    assert not (long / "iter_0000003").exists()  # its first 3 updates are no-r1's
    log = (base / "logs" / "study-no-r1-long-seed5.log").read_text()  # the base's logs
    assert f"resumed from {out / 'runs' / 'no-r1' / 'seed5' / 'iter_0000003'}" in log
    steps = {json.loads(x)["step"] for x in (long / "metrics.jsonl").read_text().splitlines() if x}
    assert {1, 3, 4, 6} <= steps, steps
    text = report.read_text()
    for needle in (
        "| APT (demo recipe) (`apt`) |",
        "| no approximated R1",
        "reproduced?",
        "Quick run",
        "| real data through the VAE |",
        "| teacher: diffusion 25 steps (CFG)",
        "### Raw generators",
        "| no approximated R1, 2x updates (`no-r1-long`) |",
        "vs APT, 2x updates: ",
        # the figures of seed 5, a seed no recipe choice was made on (the default)
        "## Health of the seed-5 runs (not a tuning seed)",
        "## Samples of seed 5 (not a tuning seed)",
    ):
        assert needle in text, needle
    # the generated narrative: before the tables, one line per arm (EMA and raw rows) with its
    # outcome word; the hand-written context verbatim in its marked section at the end
    narrative = text.split("## What the runs show")[1].split("## Results")[0]
    lines = [x for x in narrative.splitlines() if x.startswith("- **")]
    for key in (*keys, "consistency-more", *(f"{k}-raw" for k in keys)):
        (line,) = [x for x in lines if f"(`{key}`, " in x.split(" against ")[0]]
        assert line.split("**")[1].split(" (")[0] in OUTCOMES, line
        assert ("raw generator" if key.endswith("-raw") else "EMA generator") in line, line
    assert "## Context (hand-written, not generated)" in text and text.endswith("\n" + CONTEXT)
    for png in ("health.png", "samples.png"):
        assert (report.parent / "study" / png).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {*keys, "consistency-more", *(f"{k}-raw" for k in keys)}
    # resumable: a second run only re-evaluates and re-writes the report
    again = _study(out, report, *arms)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "/train ..." not in again.stdout, again.stdout[-3000:]
    # --report-only re-creates that report byte for byte (into another folder, the context
    # passed explicitly): nothing in it but OUT's results, progress and logs and the context
    written = report.read_bytes()
    copy = tmp_path / "copy" / "study.md"
    same = _study(out, copy, *arms, "--report-only", "--context", str(context))
    assert same.returncode == 0, same.stdout[-3000:] + same.stderr[-3000:]
    assert copy.read_bytes() == written
    assert (copy.parent / "study" / "samples.png").is_file()
    wrong_seed = _study(out, copy, *arms, "--report-only", "--figure-seed", "7")
    assert wrong_seed.returncode != 0 and "--figure-seed 7" in wrong_seed.stderr
    # --report-only re-writes the report from the finished runs, and refuses an unfinished one
    report.unlink()
    evaluated = (out / "results.json").stat().st_mtime_ns
    only = _study(out, report, *arms, "--report-only")
    assert only.returncode == 0 and "(nothing run)" in only.stdout, only.stderr[-3000:]
    assert (out / "results.json").stat().st_mtime_ns == evaluated  # not evaluated again
    assert report.read_bytes() == written
    more = _study(out, report, *arms, "--report-only", "--seeds", "5", "6")
    assert more.returncode != 0 and "apt/seed6/train" in more.stderr, more.stderr[-2000:]
    # a study on a base of another seed is refused
    wrong = _study(tmp_path / "study3", report, "--base", str(base), "--base-seed", "4")
    assert wrong.returncode != 0 and f"--seed {QUICK_DEMO_SEED}" in wrong.stderr, wrong.stderr
    assert str(base) in wrong.stderr
