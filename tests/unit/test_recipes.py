"""Recipes against the paper (section 3.5) and the batch arithmetic, without launching.

Decisions checked here: 9062 (the paper's image batch) has no even split over 128 or 256 data-
parallel ranks, so the image recipe rounds it up to the nearest multiple of micro x DP (9088 on
128, 9216 on 256); the video batch 2048 on 1024 GPUs works with the recipe's TP=4 (+SP):
DP = 256, micro 1 -> accumulation 8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_apt.config.recipes import (
    PAPER_IMAGE_BATCH,
    RECIPES,
    get_recipe,
    mmdit_8b_image_apt,
    mmdit_8b_video_apt,
    paper_image_global_batch,
)
from megatron_apt.config.training import OptimConfig, lr_factor, plan_batch, validate
from megatron_apt.engine.ds_config import build_deepspeed_config
from megatron_apt.models.mmdit.config import get_preset
from megatron_apt.testing.launch import REPO_ROOT

# ------------------------------------------------------------------------------------------
# Batch arithmetic
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("gpus", "batch", "accumulation"), [(128, 9088, 71), (256, 9216, 36)])
def test_image_batch_on_paper_gpu_counts(gpus, batch, accumulation):
    assert PAPER_IMAGE_BATCH == 9062
    assert paper_image_global_batch(gpus) == batch
    assert PAPER_IMAGE_BATCH <= batch < PAPER_IMAGE_BATCH + gpus  # nearest multiple above
    assert batch / PAPER_IMAGE_BATCH - 1 < 0.02
    cfg = mmdit_8b_image_apt(data_parallel=gpus)
    plan = plan_batch(cfg, world_size=gpus)
    assert (plan.micro_batch_size, plan.accumulation, plan.data_parallel) == (1, accumulation, gpus)
    assert plan.global_batch_size == cfg.global_batch_size == batch


def test_image_batch_with_larger_micro_batch_and_1024_gpus():
    assert paper_image_global_batch(128, micro_batch_size=2) == 9216  # 36 x 256
    cfg = mmdit_8b_image_apt(data_parallel=1024)
    plan = plan_batch(cfg, world_size=1024)
    assert (plan.accumulation, plan.global_batch_size) == (9, 9216)


@pytest.mark.parametrize(
    ("gpus", "dp", "accumulation"), [(1024, 256, 8), (256, 64, 32), (2048, 512, 4)]
)
def test_video_batch_2048_with_tp4(gpus, dp, accumulation):
    cfg = mmdit_8b_video_apt()
    assert (cfg.tensor_parallel, cfg.sequence_parallel, cfg.global_batch_size) == (4, True, 2048)
    plan = plan_batch(cfg, world_size=gpus)
    assert (plan.micro_batch_size, plan.data_parallel, plan.accumulation) == (1, dp, accumulation)
    assert plan.micro_batch_size * plan.accumulation * plan.data_parallel == 2048
    ds = build_deepspeed_config(cfg, plan)
    assert ds["train_batch_size"] == 2048
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * dp == 2048


@pytest.mark.parametrize(
    ("recipe", "world", "changes", "message"),
    [
        ("mmdit-8b-image-apt", 256, {"global_batch_size": 9062}, "global_batch_size=9062"),
        ("mmdit-8b-video-apt", 1022, {}, "not divisible by tensor_parallel=4"),
        ("mmdit-8b-video-apt", 1024, {"micro_batch_size": 3}, "micro_batch_size=3"),
        ("tiny-apt", 2, {"global_batch_size": 6}, "data_parallel=2 (= 4)"),
    ],
)
def test_impossible_batch_is_a_value_error(recipe, world, changes, message):
    cfg = get_recipe(recipe).replace(**changes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_batch(cfg, world_size=world)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tensor_parallel": 8}, "num_heads=20 is not divisible by tensor_parallel=8"),
        ({"tensor_parallel": 1, "sequence_parallel": True}, "sequence_parallel needs"),
        ({"context_parallel": 8}, "tensor_parallel=4 x context_parallel=8"),  # 20 heads
        ({"context_parallel": 0}, "context_parallel=0 must be >= 1"),
        ({"stage": "gan"}, "stage='gan'"),
        ({"zero_stage": 4}, "zero_stage=4"),
        ({"ema_decay": 1.0}, "ema_decay=1.0"),
        ({"train_iters": 0}, "train_iters=0"),
        ({"cond_dropout": 1.0}, "cond_dropout=1.0"),
        ({"optim": OptimConfig(name="sgd")}, "optimizer='sgd'"),
        ({"optim": OptimConfig(eps=0.0)}, "eps=0.0 must be > 0"),
    ],
)
def test_invalid_config_is_a_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        validate(mmdit_8b_video_apt().replace(**changes))


# ------------------------------------------------------------------------------------------
# Hyper-parameters of section 3.5
# ------------------------------------------------------------------------------------------

PAPER = {  # field: (image, video)
    "lr": (5e-6, 3e-6),
    "ema_decay": (0.995, 0.995),
    "train_iters": (350, 300),
    "r1_sigma": (0.01, 0.1),
    "shift": (1.0, 12.0),
    "r1_lambda": (100.0, 100.0),
}


@pytest.mark.parametrize("which", [0, 1], ids=["image", "video"])
def test_paper_hyper_parameters(which):
    cfg = (mmdit_8b_image_apt(), mmdit_8b_video_apt())[which]
    validate(cfg)
    assert cfg.stage == "apt" and cfg.model == get_preset("mmdit-8b")
    got = {k: getattr(cfg.optim if k == "lr" else cfg, k) for k in PAPER}
    assert got == {k: v[which] for k, v in PAPER.items()}
    o = cfg.optim
    assert o.lr_d is None  # the discriminator uses the generator's lr
    assert (o.rmsprop_alpha, o.weight_decay, o.grad_clip) == (0.9, 0.0, 0.0)
    assert cfg.bf16 is True
    ds = build_deepspeed_config(cfg, plan_batch(cfg, 256 if which == 0 else 1024))
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed's default 1.0 switched off
    assert ds["bf16"] == {"enabled": True}
    assert "optimizer" not in ds  # RMSprop is the client optimizer
    frames = (1, 13)[which]  # 1024px images; 49 frames (2 s at 24 fps) through a 4x temporal VAE
    assert (cfg.data.frames, cfg.data.height, cfg.data.width) == (
        (frames, 128, 128) if which == 0 else (frames, 90, 160)
    )


def test_every_recipe_validates_and_tiny_ones_plan_on_two_ranks():
    for name in RECIPES:
        cfg = get_recipe(name)
        validate(cfg)
        assert cfg.recipe == name
        if name.startswith(("tiny-", "demo-")):
            assert plan_batch(cfg, 2).accumulation == 1
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("mmdit-9b")


# ------------------------------------------------------------------------------------------
# The CLI: clean errors before anything starts
# ------------------------------------------------------------------------------------------


def _cli(*args: str, world_size: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    if world_size is not None:  # what torchrun / deepspeed announce to each rank
        env["WORLD_SIZE"] = str(world_size)
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "pretrain_apt.py"), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "world", "message"),
    [
        (("--global-batch-size", "6"), 2, "error: global_batch_size=6 is not a multiple of"),
        (("--tensor-model-parallel-size", "3"), 3, "error: num_heads=4 is not divisible"),
        (("--recipe", "mmdit-8b-video-apt"), 6, "error: world size 6 is not divisible"),
        (("--model", "tiny-9b"), None, "error: unknown model preset 'tiny-9b'"),
        (("--context-parallel-size", "2"), 3, "error: world size 3 is not divisible"),
    ],
)
def test_cli_config_error_exits_2_without_traceback(tmp_path, args, world, message):
    proc = _cli(*args, "--save", str(tmp_path / "run"), world_size=world)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_context_parallel_batch_plan_and_deepspeed_batch():
    """CP ranks share samples: DP = world / (TP x CP); DeepSpeed's data-parallel group is
    DP x CP, so its train_batch_size counts the global batch CP times."""
    from megatron_apt.engine.ds_config import build_deepspeed_config

    # 20 heads: TP 4 x CP 2 cannot split them, TP 2 x CP 2 can (5 heads per rank)
    with pytest.raises(ValueError, match="num_heads=20 is not divisible by tensor_parallel=4 x"):
        validate(mmdit_8b_video_apt().replace(context_parallel=2))
    cfg = mmdit_8b_video_apt().replace(tensor_parallel=2, context_parallel=2)
    validate(cfg)
    plan = plan_batch(cfg, world_size=1024)
    assert (plan.data_parallel, plan.accumulation, plan.global_batch_size) == (256, 8, 2048)
    ds = build_deepspeed_config(cfg, plan)
    assert ds["train_batch_size"] == 4096 == ds["train_micro_batch_size_per_gpu"] * 8 * 512
    proc = _cli("--recipe", "tiny-apt", "--context-parallel-size", "2", "--print-config")
    assert proc.returncode == 0 and json.loads(proc.stdout)["context_parallel"] == 2


def test_cli_print_config_applies_overrides():
    proc = _cli("--recipe", "mmdit-8b-video-apt", "--lr", "1e-6", "--print-config")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert cfg["tensor_parallel"] == 4 and cfg["optim"]["lr"] == 1e-6
    assert cfg["global_batch_size"] == 2048 and cfg["model"]["num_layers"] == 36


def test_cli_optimizer_flags():
    proc = _cli(
        "--recipe", "demo-apt", "--optimizer", "adamw", "--optim-eps", "1e-3",
        "--cond-dropout", "0.2", "--print-config",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert cfg["optim"]["name"] == "adamw" and cfg["optim"]["eps"] == 1e-3
    assert cfg["cond_dropout"] == 0.2 and cfg["optim"]["lr"] == get_recipe("demo-apt").optim.lr


def test_demo_recipes_pre_stages_adam_apt_rmsprop_like_the_paper():
    assert get_recipe("demo-diffusion").optim.name == "adamw"
    assert get_recipe("demo-diffusion").cond_dropout > 0  # the CFG of the later stages
    apt = get_recipe("demo-apt")
    assert apt.optim.name == "rmsprop" and apt.optim.rmsprop_alpha == 0.9
    assert apt.optim.weight_decay == 0 and apt.optim.grad_clip == 0
    assert apt.r1_lambda == 100 and apt.ema_decay < 1  # the approximated R1 and the EMA
    for r in ("mmdit-8b-image-apt", "mmdit-8b-video-apt"):
        assert get_recipe(r).optim.name == "rmsprop"


def test_lr_factor_warmup_then_cosine_and_paper_constant():
    paper = get_recipe("mmdit-8b-image-apt").optim
    assert [lr_factor(paper, s, 350) for s in (0, 100, 349)] == [1.0, 1.0, 1.0]
    o = OptimConfig(warmup_iters=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_factor(o, 0, 110) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_factor(o, 9, 110) == pytest.approx(1.0)
    assert lr_factor(o, 10, 110) == pytest.approx(1.0)  # cosine starts at the top
    assert lr_factor(o, 60, 110) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert lr_factor(o, 110, 110) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr decay='step'"):
        validate(get_recipe("demo-apt").replace(optim=OptimConfig(decay="step")))


# ------------------------------------------------------------------------------------------
# The Wan2.1 recipes (issue 32 item 3): the paper's hyper-parameters on the Wan family
# ------------------------------------------------------------------------------------------
WAN_STAGES = ("consistency", "image-apt", "video-apt")


@pytest.mark.parametrize("size", ["1.3b", "14b"])
@pytest.mark.parametrize("gpus", [64, 256])
def test_wan_recipes_paper_values_and_exact_batches(size, gpus):
    """Every Wan recipe validates with the Wan preset of its size, 81 frames (21 latent frames)
    of 480p (1.3B) or 720p (14B) video or single frames, 512 text tokens; the APT stages carry
    the paper's values (image: lr 5e-6, sigma 0.01, s = 1, 350 updates; video: lr 3e-6, sigma
    0.1, s = 12, 300 updates; RMSprop alpha 0.9, EMA 0.995, lambda 100, D at G's lr) and
    reach their global batch exactly on 64 and 256 GPUs (the image batch 9062 rounded up to a
    multiple of micro x DP of the layout, as for the MMDiT)."""
    from megatron_apt.config.recipes import wan_image_apt
    from megatron_apt.models.families import family_of, get_preset

    preset = {"1.3b": "wan2.1-t2v-1.3b", "14b": "wan2.1-t2v-14b"}[size]
    hw = {"1.3b": (60, 104), "14b": (90, 160)}[size]
    for stage in WAN_STAGES:
        cfg = get_recipe(f"wan2.1-t2v-{size}-{stage}")
        validate(cfg)
        assert family_of(cfg.model).name == "wan" and cfg.model == get_preset(preset)
        frames = 1 if stage == "image-apt" else 21
        assert (cfg.data.frames, *hw, cfg.data.text_len) == (
            cfg.data.frames,
            cfg.data.height,
            cfg.data.width,
            512,
        ) and cfg.data.frames == frames
        assert cfg.bf16 and cfg.zero_stage == 3
        mp = cfg.tensor_parallel * cfg.context_parallel
        if stage == "image-apt":  # the recipe's batch is for its default DP; another DP rounds
            dp = gpus // mp
            cfg = wan_image_apt(size, data_parallel=dp)
            assert cfg.global_batch_size == paper_image_global_batch(dp)
            assert 0 <= cfg.global_batch_size - PAPER_IMAGE_BATCH < dp
        plan = plan_batch(cfg, gpus)
        assert plan.global_batch_size == cfg.global_batch_size, (stage, plan)
        if stage == "consistency":
            assert cfg.stage == "consistency" and cfg.guidance_scale == 5.0
            continue
        which = 0 if stage == "image-apt" else 1
        got = {k: getattr(cfg.optim if k == "lr" else cfg, k) for k in PAPER}
        assert got == {k: v[which] for k, v in PAPER.items()}, stage
        o = cfg.optim
        assert (o.name, o.rmsprop_alpha, o.lr_d, o.weight_decay) == ("rmsprop", 0.9, None, 0.0)


def test_wan_recipe_prints_its_family(tmp_path):
    proc = _cli("--recipe", "wan2.1-t2v-14b-video-apt", "--print-config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert cfg["model"]["family"] == "wan" and cfg["model"]["num_layers"] == 40
