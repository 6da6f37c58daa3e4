"""tools/plan_model.py prints the analytic counts (the paper's ~8B preset among them)."""

import json
import subprocess
import sys

from megatron_apt.models.mmdit import count_parameters, forward_flops, get_preset
from megatron_apt.testing.launch import REPO_ROOT


def run_tool(*args):
    proc = subprocess.run(
        [sys.executable, "tools/plan_model.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_plan_model_prints_paper_preset():
    out = run_tool("--preset", "mmdit-8b")
    total = count_parameters(get_preset("mmdit-8b")).total
    assert f"{total:,}" in out and "mmdit-8b" in out


def test_plan_model_json_and_flops():
    rows = json.loads(run_tool("--all", "--json", "--latent", "13x90x160", "--text-len", "256"))
    by_name = {r["preset"]: r for r in rows}
    assert by_name["sd3-medium"]["params"] == 2_028_328_000  # diffusers' SD3 Medium
    r = by_name["mmdit-8b"]
    assert r["visual_tokens"] == 13 * 45 * 80 == 46_800
    cfg = get_preset("mmdit-8b")
    assert abs(r["forward_tflop"] * 1e12 - forward_flops(cfg, 46_800, 256)) < 1e6


def test_forward_flops_hand_count():
    """One layer, no pre-only block, no text: 2*N*(12 d^2) (with mlp_ratio 4) + 4*N^2*d."""
    cfg = get_preset("tiny", num_layers=1, context_pre_only_last=False)
    d, n = cfg.hidden_size, 10
    expected = 2 * n * 12 * d * d + 4 * n * n * d
    expected += 2 * n * (cfg.patch_dim * d + d * cfg.out_patch_dim)
    assert forward_flops(cfg, n, 0) == expected


def test_plan_model_rejects_bad_latent():
    proc = subprocess.run(
        [sys.executable, "tools/plan_model.py", "--latent", "13x90"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "TxHxW" in proc.stderr


def test_plan_model_lists_every_family():
    """Presets of every registered family, counted by their family (Wan2.1 14B: diffusers'
    model on the meta device has 14,288,491,584 parameters, test_wan_equivalence.py)."""
    from megatron_apt.models.families import get_preset as family_preset
    from megatron_apt.models.wan.config import forward_flops as wan_flops

    rows = json.loads(run_tool("--all", "--json", "--latent", "21x90x160", "--text-len", "512"))
    by_name = {r["preset"]: r for r in rows}
    assert by_name["mmdit-8b"]["family"] == "mmdit"
    r = by_name["wan2.1-t2v-14b"]
    assert r["family"] == "wan" and r["params"] == 14_288_491_584
    assert r["visual_tokens"] == 21 * 45 * 80
    want = wan_flops(family_preset("wan2.1-t2v-14b"), 21 * 45 * 80, 512)
    assert abs(r["forward_tflop"] * 1e12 - want) < 1e6
