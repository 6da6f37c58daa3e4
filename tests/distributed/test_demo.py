"""`make demo`, shortened: every stage of examples/demo.py runs for real (synthetic data, the
preprocessing tool, three pretrain_apt.py runs on 2 processes through the deepspeed launcher,
generation, evaluation, figures) with a few steps each; a second run skips every stage."""

from __future__ import annotations

import json
import subprocess
import sys

from megatron_apt.testing.launch import REPO_ROOT, launcher_env, run_quick_demo

ROWS = (
    "real data through the VAE",
    "diffusion 25 steps (CFG)",
    "consistency 1 step",
    "APT 1 step",
    "APT 2 steps",
    "APT 1 step (teacher's N)",  # APT's first clips at the teacher's N: the noise check's row
)


def test_quick_demo_end_to_end_then_resume_skips_everything(quick_demo, tmp_path):
    out, proc = quick_demo  # conftest.py: examples/demo.py --quick --seed 11
    progress = json.loads((out / "progress.json").read_text())
    stages = ("data", "vae", "preprocess", "diffusion", "consistency", "apt", "generate")
    stages += ("evaluate",)
    assert set(stages + ("figures",)) <= set(progress)
    # the training stages ran on 2 ranks through the deepspeed launcher, 3 steps each
    for stage in ("diffusion", "consistency", "apt"):
        log = (out / "logs" / f"{stage}.log").read_text()
        assert "deepspeed" in log.splitlines()[0] and "--num_gpus 2" in log.splitlines()[0]
        assert log.count("TRAINING-DONE") == 2, log[-2000:]  # one line per rank
        assert [json.loads(x)["step"] for x in (out / stage / "metrics.jsonl").open()] == [1, 2, 3]
    apt_metrics = json.loads((out / "apt" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss_g", "loss_d", "loss_r1", "d_acc_real", "d_acc_fake", "logit_gap"} <= set(
        apt_metrics
    )
    assert "--seed 11" in (out / "logs" / "apt.log").read_text().splitlines()[0]
    # the table: every row, every column, finite numbers
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == set(ROWS)
    keys = {"fd", "fd_ci", "sharpness_ratio", "background_noise", "background_noise_ci"}
    keys |= {"saturation_distance", "cfd", "cfd_ci", "caption_all_ci"}
    keys |= {f"caption_{k}" for k in ("color", "shape", "motion", "all")} | {"num_samples"}
    for row in results["rows"].values():
        assert keys <= set(row), keys - set(row)
        assert all(v == v for v in row.values())  # no NaN
    assert results["rows"]["APT 1 step"]["num_samples"] == 16  # half of the 32 held-out clips
    assert results["rows"]["diffusion 25 steps (CFG)"]["num_samples"] == 2
    assert results["rows"]["APT 1 step (teacher's N)"]["num_samples"] == 2
    assert results["floors"]["2"]["num_samples"] == 2  # the real-data floor at the teacher's N
    checks = results["demo"]["checks"]
    assert results["demo"]["seed"] == 11 and len(checks) == 5
    assert all({"name", "passed", "detail"} <= set(c) for c in checks)
    table = (out / "results.md").read_text()
    assert all(f"| {r} |" in table for r in ROWS)
    assert "checks (seed 11):" in proc.stdout and str(out) in proc.stdout
    for c in checks:  # every check printed with its outcome
        assert f"[{'PASS' if c['passed'] else 'FAIL'}] {c['name']}" in proc.stdout, c
    # pictures: a grid (PNG), GIF and MP4 per row, and the loss curves
    figs = out / "figures"
    for stem in ("diffusion-25-steps-cfg", "consistency-1-step", "apt-1-step", "apt-2-steps"):
        for ext in (".png", ".gif", ".mp4"):
            assert (figs / f"{stem}{ext}").stat().st_size > 0, stem + ext
    for png in ("apt_loss_curves.png", "apt_loss_curves_health.png", "pre_stages.png"):
        assert (figs / png).read_bytes()[:4] == b"\x89PNG"
    # the commands are ordinary, re-runnable ones
    commands = (out / "commands.sh").read_text()
    assert "pretrain_apt.py --recipe demo-apt" in commands
    # the latents come from the demo's own trained VAE, in preprocessing and generation alike
    assert "tools/train_vae.py" in commands and "tools/reconstruct.py" in commands
    vae = str(out / "models" / "vae")
    assert all(f"--vae {vae}" in line for line in commands.splitlines()
               if "preprocess_data.py" in line or "generate.py" in line)  # fmt: skip
    assert json.loads((out / "models" / "vae" / "config.json").read_text())["latents_std"]
    # --summarize: the README's table and docs/demo/seeds.json, read from finished runs only
    summary = tmp_path / "seeds.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "demo.py"), "--summarize", str(out),
         "--summary-json", str(summary)],
        cwd=REPO_ROOT, env=launcher_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seeds = json.loads(summary.read_text())["seeds"]
    assert [s["seed"] for s in seeds] == [11] and seeds[0]["run"] == "demo"
    apt = results["rows"]["APT 1 step"]
    assert seeds[0]["rows"]["APT 1 step"]["fd"] == apt["fd"]
    assert seeds[0]["checks"] == checks
    assert "| 11 | " in proc.stdout and f"**{apt['fd']:.2f}" in proc.stdout
    # a second run skips every stage
    again = run_quick_demo(out)
    assert again.returncode == 0, again.stderr[-3000:]
    stages_done = [k for k in progress if not k.startswith("_")]  # "_quick", "_seed": meta
    assert again.stdout.count("skipped") == len(stages_done) == 9, again.stdout
