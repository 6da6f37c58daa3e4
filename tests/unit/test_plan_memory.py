"""The memory planner (megatron_apt/config/memory.py, tools/plan_memory.py) against reality.

1. ``test_activation_inventory_matches_saved_tensors``: the planner's per-token inventory of
   what the model keeps for backward equals (within 1 %; 0.4 % or better when written) the
   bytes of the distinct tensor storages that autograd packs during a real forward
   (``saved_tensors_hooks``; parameters excluded), for RMS-QK-norm + 3-D RoPE and SD3-style
   MMDiTs and the Wan2.1 DiT (``models/wan/memory.py``: equal to the byte), in fp32 and bf16;
   for Wan also the discriminator's pass (backbone up to its last head + heads: equal in
   fp32, 0.01 % in bf16, where D's ``.to(bf16)`` casts the backbone's fp32 islands and the
   CPU keeps bf16 LayerNorm statistics). ``test_parameter_split_over_tp_matches_the_model``:
   parameters per TP rank, stored and trainable, of G and D of both families equal the
   partition attributes of the built model (``models.builders.tensor_layout``).
2. ``test_plan_within_20_percent_of_measured_peak``: for three small CPU set-ups (activation-
   dominated, weight-dominated, activation recompute on), the plan's total is within 20 % of the
   MEASURED peak memory of a real single-process training step (plan / measured was 0.98, 0.99
   and 0.98 on 2026-11-29; weights + gradients + optimizer + EMA 1.01, 1.00 and 1.02). Measured
   (megatron_apt/testing/memory_probe.py, a fresh subprocess, glibc serving every tensor above
   64 KiB by mmap so RSS follows live tensor bytes): the peak resident set size during the
   second fwd + bwd + RMSprop step + EMA update (high-water mark reset right before it), minus
   the RSS before the model was built (after a warm-up step of a throwaway tiny model, so lazy
   imports and runtime set-up are not counted). A fourth case is a Wan DiT with every block
   recomputed (plan / measured 1.05, static 1.00 on 2026-12-07). The plan (stage
   ``diffusion``: one trained model, ZeRO-0, one GPU, fp32) counts weights, gradients, RMSprop
   square averages, the fp32 EMA copy, the activations kept for backward (a recomputed
   block's full set while it is backpropagated) and the backward workspace (MLP activation
   gradients, one weight gradient).
   Weights + gradients + optimizer + EMA must also match the measured RSS once they exist
   (before any forward: a step leaves heap residue that is no tensor) within 10 %.
3. The CLI prints the paper's two set-ups (table and JSON) and names bad values; it plans
   Wan2.1 from pixels (4x8x8 VAE, 81 frames -> 21 latent frames) and names the TP / CP sizes
   a model allows.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_apt.config.memory import MemoryPlanInput, _Layout, plan_memory
from megatron_apt.models.builders import build_skeleton
from megatron_apt.models.discriminator import Discriminator, DiscriminatorConfig
from megatron_apt.models.families import family_of, get_preset
from megatron_apt.parallel.tensor_parallel import tp_partition_dim
from megatron_apt.testing import dummy_inputs, randomize_parameters
from megatron_apt.testing.memory_probe import run_memory_probe as run_probe
from megatron_apt.testing.memory_probe import saved_storage_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd3", "wan-debug"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_inventory_matches_saved_tensors(preset, dtype):
    cfg = get_preset(preset, num_layers=3)
    family = family_of(cfg)
    model = family.build(cfg, params_dtype=dtype)
    randomize_parameters(model, seed=0)
    batch, text_len = 2, 16
    inputs = dummy_inputs(cfg, batch=batch, height=32, width=32, text_len=text_len, masked=False)
    inputs["latents"] = inputs["latents"].to(dtype)
    measured = saved_storage_bytes(model, inputs)
    lay = _Layout(m=2 if dtype == torch.bfloat16 else 4, tp=1, cp=1, sp=False)
    _, planned = family.memory.pass_activation_bytes(cfg, 256, text_len, batch, lay, recompute=())
    assert abs(planned - measured) <= 0.01 * measured, (planned, measured)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(1, 3), (3,)])
def test_wan_discriminator_inventory_matches_saved_tensors(dtype, heads):
    """D's pass on a Wan backbone: blocks up to the last head (no output layer), the heads on
    the gathered features, an odd token grid (3 x 8 x 12) and text length."""
    cfg = get_preset("wan-debug", num_layers=3)
    family = family_of(cfg)
    model = Discriminator(
        family.build(cfg, params_dtype=dtype), DiscriminatorConfig(head_layers=heads)
    )
    randomize_parameters(model, seed=0)
    batch, text_len = 3, 7
    inputs = dummy_inputs(
        cfg, batch=batch, frames=3, height=16, width=24, text_len=text_len, masked=False
    )
    inputs["latents"] = inputs["latents"].to(dtype)
    measured = saved_storage_bytes(model, inputs)
    lay = _Layout(m=2 if dtype == torch.bfloat16 else 4, tp=1, cp=1, sp=False)
    _, planned = family.memory.pass_activation_bytes(
        cfg, 3 * 8 * 12, text_len, batch, lay, (), max(heads), False, heads
    )
    assert abs(planned - measured) <= 0.01 * measured, (planned, measured)
    if dtype == torch.float32:
        assert planned == measured


def tp_local_parameters(model: torch.nn.Module, tp: int) -> tuple[int, int]:
    """(stored, trainable) parameters on one TP rank of a TP=1 skeleton, read off megatron's
    partition attributes."""
    stored = trainable = 0
    for p in model.parameters():
        n = p.numel() // (tp if tp_partition_dim(p) is not None else 1)
        stored += n
        trainable += n if p.requires_grad else 0
    return stored, trainable


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd3", "wan-debug", "wan2.1-t2v-14b"])
def test_parameter_split_over_tp_matches_the_model(preset):
    cfg = get_preset(preset)
    memory = family_of(cfg).memory
    local, total = memory.model_parameters(cfg, 1)
    assert local == total == family_of(cfg).count_parameters(cfg)
    local2, _ = memory.model_parameters(cfg, 2)
    assert total / 2 < local2 < total  # embeddings, norms, tables and row biases replicated
    heads = (1, cfg.num_layers - 1)  # blocks after the last head are frozen
    g, d = build_skeleton(cfg), build_skeleton(cfg, "discriminator", heads)
    for tp in (1, 2, 4):
        assert memory.model_parameters(cfg, tp)[0] == tp_local_parameters(g, tp)[0], tp
        assert memory.discriminator_parameters(cfg, tp, heads) == tp_local_parameters(d, tp), tp


CASES = {
    # activations dominate (no recompute)
    "demo-576tok": dict(preset="demo", batch=2, height=48, width=48, text_len=32),
    # weights, gradients, optimizer and EMA dominate
    "mid2-64tok": dict(
        preset="mid", overrides={"num_layers": 2}, batch=2, height=16, width=16, text_len=16
    ),
    # every block recomputed
    "demo-1024tok-recompute": dict(
        preset="demo", batch=4, height=64, width=64, text_len=32, recompute="all"
    ),
    # a Wan DiT (width 128, 4 blocks), every block recomputed, 4 x 576 tokens
    "wan-576tok-recompute": dict(
        preset="wan-debug",
        overrides=dict(num_heads=4, head_dim=32, ffn_dim=384, num_layers=4, text_dim=64),
        batch=4,
        height=48,
        width=48,
        text_len=32,
        recompute="all",
    ),
}


def plan_for(spec: dict):
    cfg = get_preset(spec["preset"], **spec.get("overrides", {}))
    return plan_memory(
        MemoryPlanInput(
            model=cfg,
            stage="diffusion",
            frames=1,
            height=spec["height"],
            width=spec["width"],
            text_len=spec["text_len"],
            micro_batch=spec["batch"],
            gpus=1,
            zero_stage=0,
            dtype="fp32",
            recompute=spec.get("recompute", "none"),
        ),
        family_of(cfg).memory,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_within_20_percent_of_measured_peak(case):
    spec = CASES[case]
    measured = run_probe(spec)
    plan = plan_for(spec)
    c = plan.components
    static = c["g_weights"] + c["ema"] + c["grads"] + c["optimizer"]
    report = {"measured": measured, "plan": plan.to_dict()["bytes"], "plan_total": plan.total}
    assert measured["peak"] > 20 * 2**20, report  # large enough for allocator noise to vanish
    assert abs(static - measured["static"]) <= 0.1 * measured["static"], report
    assert abs(plan.total - measured["peak"]) <= 0.2 * measured["peak"], report


def test_recompute_lowers_planned_activation_memory():
    """Same set-up with and without recompute: the plan's activation term drops by more than
    half (the measured drop is tests/unit/test_activation_checkpointing.py's)."""
    spec = CASES["demo-1024tok-recompute"]
    on = plan_for(spec).components["activations"]
    off = plan_for({**spec, "recompute": "none"}).components["activations"]
    assert on < 0.5 * off


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/plan_memory.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_paper_setups():
    proc = run_cli()
    assert proc.returncode == 0, proc.stderr
    assert "paper image" in proc.stdout and "paper video" in proc.stdout
    assert "| **total** |" in proc.stdout and "TP 4" in proc.stdout
    data = json.loads(run_cli("--json").stdout)
    assert len(data) == 4  # two set-ups, recompute off and on
    for title, plan in data.items():
        assert plan["total_bytes"] > 0 and plan["step_time_s"] > 0, title
    video_off = next(p for t, p in data.items() if "video" in t and "none" in t)
    video_on = next(p for t, p in data.items() if "video" in t and "all" in t)
    assert video_on["bytes"]["activations"] < video_off["bytes"]["activations"] / 5
    assert video_on["step_time_s"] > video_off["step_time_s"]  # recompute costs FLOPs
    assert video_off["visual_tokens"] == 13 * 45 * 80


def test_cli_custom_and_errors():
    proc = run_cli(
        "--model", "mmdit-8b", "--pixels", "49x720x1280", "--vae", "4x8x8", "--tp", "4", "--sp",
        "--gpus", "1024", "--global-batch", "2048", "--recompute", "all", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (plan,) = json.loads(proc.stdout).values()
    assert plan["inputs"]["frames"] == 13 and plan["inputs"]["dp"] == 256
    bad = run_cli("--recompute", "0,1")
    assert bad.returncode == 2 and "0,1" in bad.stderr
    bad = run_cli("--model", "mmdit-8b", "--tp", "3")
    assert bad.returncode == 2 and "tp=3" in bad.stderr


def test_cli_d_head_layers():
    """D's heads as trained (--d-head-layers) reach the plan: one head on the last block keeps
    fewer activations than the paper's three; a block outside the model is named."""
    base = ["--recipe", "mmdit-8b-video-apt", "--gpus", "1024", "--json"]
    (paper,) = json.loads(run_cli(*base).stdout).values()
    proc = run_cli(*base, "--d-head-layers", "last")
    assert proc.returncode == 0, proc.stderr
    (last,) = json.loads(proc.stdout).values()
    assert paper["inputs"]["head_layers"] is None and last["inputs"]["head_layers"] == [36]
    assert last["bytes"]["activations"] < paper["bytes"]["activations"]
    bad = run_cli(*base, "--d-head-layers", "37")
    assert bad.returncode == 2 and "37" in bad.stderr


WAN_14B = ["--model", "wan2.1-t2v-14b", "--pixels", "81x720x1280", "--vae", "4x8x8"]
WAN_14B_256 = [*WAN_14B, "--tp", "8", "--sp", "--gpus", "256", "--recompute", "all"]


def load_tool():
    """tools/plan_memory.py in this process (a subprocess for a Wan model imports torch and
    megatron-core again: seconds each)."""
    spec = importlib.util.spec_from_file_location("plan_memory_tool", ROOT / "tools/plan_memory.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def tool_json(capsys, *args: str) -> dict:
    assert load_tool().main([*args, "--json"]) == 0
    (plan,) = json.loads(capsys.readouterr().out).values()
    return plan


def test_cli_wan_14b_720p_fits_on_256_gpus():
    """The 14B at 720p x 81 frames, TP 8 + SP, every block recomputed, on 256 GPUs fits 80
    GiB; the header names the TP x CP sizes 40 heads allow and the TP sizes ffn 13824 allows."""
    proc = run_cli(*WAN_14B_256)
    assert proc.returncode == 0, proc.stderr
    assert "75600 visual + 512 text tokens" in proc.stdout
    assert "TP x CP in {1, 2, 4, 5, 8, 10, 20, 40}" in proc.stdout
    assert "TP in {1, 2, 4, 8}" in proc.stdout and "CP = 1" in proc.stdout
    assert "fits in 80 GiB" in proc.stdout and "does NOT fit" not in proc.stdout


def test_cli_wan_tokens_vae_and_recompute(capsys):
    """21 x 45 x 80 visual tokens (4x8x8 VAE: 1 + (81 - 1) / 4 latent frames; 1x2x2 patches),
    512 umT5 tokens by default; Wan's VAE is the default for a Wan model; without recompute
    the same layout does not fit."""
    plan = tool_json(capsys, *WAN_14B_256)
    assert plan["visual_tokens"] == 21 * 45 * 80 == 75_600
    assert plan["inputs"]["frames"] == 21 and plan["inputs"]["text_len"] == 512
    assert plan["inputs"]["family"] == "wan" and plan["inputs"]["dp"] == 32
    assert plan["total_gib"] <= 80
    default_vae = tool_json(capsys, *WAN_14B_256[:4], *WAN_14B_256[6:])
    assert default_vae["inputs"]["frames"] == 21
    assert default_vae["total_bytes"] == plan["total_bytes"]
    assert tool_json(capsys, *WAN_14B_256[:-2])["total_gib"] > 80  # recompute none
    # the recipe carries that layout (TP 8 + SP, recompute all, 81 frames at 720p, batch 2048)
    recipe = tool_json(capsys, "--recipe", "wan2.1-t2v-14b-video-apt", "--gpus", "256")
    assert recipe["total_bytes"] == plan["total_bytes"] and recipe["total_gib"] <= 80
    assert recipe["inputs"]["global_batch"] == 2048
    small = tool_json(capsys, "--model", "wan2.1-t2v-1.3b", "--pixels", "81x480x832")
    assert small["visual_tokens"] == 21 * 30 * 52


def test_cli_wan_refuses_layouts_the_model_cannot_build(capsys):
    tool = load_tool()

    def error(*args: str) -> str:
        assert tool.main(list(args)) == 2
        return capsys.readouterr().err

    assert "[1, 2, 4, 5, 8, 10, 20, 40]" in error(*WAN_14B, "--tp", "3", "--gpus", "48")
    err = error(*WAN_14B, "--tp", "5", "--gpus", "40")  # ffn 13824
    assert "ffn width 13824" in err and "[1, 2, 4, 8]" in err
    err = error(*WAN_14B, "--tp", "4", "--cp", "2", "--gpus", "64")
    assert "does not model the Wan family's context parallelism" in err
    assert "k x 4 + 1" in error("--model", "wan2.1-t2v-14b", "--pixels", "80x720x1280")
    assert "[1, 2, 4, 5, 10, 20]" in error("--model", "mmdit-8b", "--tp", "4", "--cp", "2")
    assert "unknown model preset 'wan3'" in error("--model", "wan3")
