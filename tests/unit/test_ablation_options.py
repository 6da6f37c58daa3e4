"""The ablation options of the APT stage: the R1 noise reading, Adam vs RMSprop, D's timesteps,
D's head layers and the frozen-D control (config, validation, CLI, and what each one changes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_apt.config.recipes import get_recipe
from megatron_apt.config.training import OptimConfig, parse_head_layers, validate
from megatron_apt.engine.engines import build_optimizer
from megatron_apt.engine.trainer import apt_config
from megatron_apt.models import Discriminator, Generator, MMDiT
from megatron_apt.models.builders import build_discriminator
from megatron_apt.models.discriminator import DiscriminatorConfig
from megatron_apt.models.mmdit import get_preset
from megatron_apt.stages.apt import APTConfig, discriminator_step, frozen, generator_step
from megatron_apt.testing import dummy_inputs, randomize_parameters
from megatron_apt.testing.launch import REPO_ROOT


def _cli_config(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "pretrain_apt.py"), *args, "--print-config"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _cli_error(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "pretrain_apt.py"), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_cli_sets_every_ablation_field_and_config_records_them():
    cfg = _cli_config(
        "--recipe", "tiny-apt", "--r1-noise-std", "sqrt-sigma", "--optimizer", "adam",
        "--adam-betas", "0", "0.9", "--d-timesteps", "zero", "--d-head-layers", "last",
        "--freeze-discriminator",
    )  # fmt: skip
    assert cfg["r1_noise_std"] == "sqrt-sigma" and cfg["d_timesteps"] == "zero"
    assert cfg["d_head_layers"] == "last" and cfg["freeze_discriminator"] is True
    assert cfg["optim"]["name"] == "adam" and cfg["optim"]["adam_betas"] == [0.0, 0.9]
    default = _cli_config("--recipe", "tiny-apt")  # to_dict records the defaults too
    assert (default["r1_noise_std"], default["d_timesteps"]) == ("sigma", "ensemble")
    assert (default["d_head_layers"], default["freeze_discriminator"]) == (None, False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--d-head-layers", "3"), "d_head_layers='3': block numbers [3] outside 1..2"),
        (("--d-head-layers", "1,x"), "d_head_layers='1,x': use 'last' or 1-based"),
        (("--adam-betas", "0.9", "1.0"), "adam_betas=(0.9, 1.0): two betas in [0, 1)"),
        (
            ("--recipe", "tiny-diffusion", "--freeze-discriminator"),
            "freeze_discriminator=True applies to the apt stage only",
        ),
        (("--d-warmup-iters", "4"), "d_warmup_iters=4 must lie in [0, train_iters=4)"),
        (("--d-warmup-iters", "-1"), "d_warmup_iters=-1 must lie in [0, train_iters=4)"),
        (
            ("--recipe", "tiny-consistency", "--d-warmup-iters", "1"),
            "d_warmup_iters=1 applies to the apt stage only",
        ),
    ],
)
def test_cli_errors_name_the_flag_value(args, message):
    assert _cli_error(*args).startswith(f"error: {message}")


# ------------------------------------------------------------------------------------------
# --r1-noise-std
# ------------------------------------------------------------------------------------------


def test_r1_noise_std_readings():
    sigma = APTConfig(r1_sigma=0.01, r1_lambda=100.0)
    sqrt = APTConfig(r1_sigma=0.01, r1_lambda=100.0, r1_noise_std="sqrt-sigma")
    assert sigma.r1_std == 0.01 and sqrt.r1_std == pytest.approx(0.1)
    assert sigma.exact_r1_weight == pytest.approx(0.01)  # lambda sigma^2
    assert sqrt.exact_r1_weight == pytest.approx(1.0)  # lambda sigma
    with pytest.raises(ValueError, match="r1_noise_std='variance'"):
        APTConfig(r1_noise_std="variance")
    with pytest.raises(ValueError, match="r1_noise_std='variance'"):
        validate(get_recipe("tiny-apt").replace(r1_noise_std="variance"))


@pytest.fixture(scope="module")
def tiny_gan():
    cfg = get_preset("tiny")
    d, g = Discriminator(MMDiT(cfg)), Generator(MMDiT(cfg))
    randomize_parameters(d, 0)
    randomize_parameters(g, 1)
    batch = {k: v for k, v in dummy_inputs(cfg, batch=4, frames=2).items() if k != "timesteps"}
    return d, g, batch


def _spy_d_phase(tiny_gan, apt: APTConfig):
    d, g, batch = tiny_gan
    calls = []

    def spy(x, t, **cond):
        calls.append((x.detach().clone(), t.clone()))
        return d(x, t, **cond)

    discriminator_step(spy, g, batch, apt, torch.Generator().manual_seed(0))
    (x, t), b = calls[0], batch["latents"].shape[0]
    return x[2 * b :] - batch["latents"], t, b


def test_sqrt_sigma_perturbs_with_std_sqrt_sigma_and_the_same_noise(tiny_gan):
    eps_sigma, _, _ = _spy_d_phase(tiny_gan, APTConfig(r1_sigma=0.04))
    eps_sqrt, _, _ = _spy_d_phase(tiny_gan, APTConfig(r1_sigma=0.04, r1_noise_std="sqrt-sigma"))
    assert eps_sigma.std().item() == pytest.approx(0.04, rel=0.1)
    assert eps_sqrt.std().item() == pytest.approx(0.2, rel=0.1)
    torch.testing.assert_close(eps_sqrt, eps_sigma * 5.0)  # same epsilon, std x sqrt(1/sigma)


# ------------------------------------------------------------------------------------------
# --d-timesteps
# ------------------------------------------------------------------------------------------


def test_zero_timesteps_in_both_phases_and_same_perturbation(tiny_gan):
    eps_ens, t_ens, b = _spy_d_phase(tiny_gan, APTConfig(shift=12.0))
    eps_zero, t_zero, _ = _spy_d_phase(tiny_gan, APTConfig(shift=12.0, d_timesteps="zero"))
    assert t_ens.shape == t_zero.shape == (3 * b,)
    assert (t_ens > 0).all() and (t_zero == 0).all()
    torch.testing.assert_close(eps_zero, eps_ens)  # the ensemble is drawn either way
    d, g, batch = tiny_gan
    seen = []

    def spy(x, t, **cond):
        seen.append(t.clone())
        return d(x, t, **cond)

    with frozen(d):
        for mode in ("ensemble", "zero"):
            apt = APTConfig(shift=12.0, d_timesteps=mode)
            generator_step(spy, g, batch, apt, torch.Generator().manual_seed(0))
    assert (seen[0] > 0).all() and (seen[1] == 0).all()
    with pytest.raises(ValueError, match="d_timesteps='one'"):
        validate(get_recipe("tiny-apt").replace(d_timesteps="one"))


def test_trainer_builds_the_objective_from_the_config():
    cfg = get_recipe("tiny-apt").replace(
        r1_noise_std="sqrt-sigma", d_timesteps="zero", r1_sigma=0.09, r1_lambda=7.0
    )
    apt = apt_config(cfg)
    assert (apt.shift, apt.r1_lambda, apt.r1_sigma) == (12.0, 7.0, 0.09)
    assert (apt.r1_noise_std, apt.d_timesteps, apt.r1_std) == ("sqrt-sigma", "zero", 0.3)


# ------------------------------------------------------------------------------------------
# --d-head-layers
# ------------------------------------------------------------------------------------------


def test_head_layer_specs():
    assert parse_head_layers(None, 36) is None  # the paper's fractions (16, 26, 36)
    assert parse_head_layers("paper", 36) is None
    assert parse_head_layers("last", 36) == (36,)
    assert parse_head_layers(" 4, 2 ", 4) == (4, 2)
    assert parse_head_layers([1, 3], 4) == (1, 3)
    for spec, message in [
        ("5", r"d_head_layers='5': block numbers \[5\] outside 1..4"),
        ("0,1", r"block numbers \[0\] outside 1..4"),
        ("", "use 'last' or 1-based"),
        ("2,2", "a block is named twice"),
        ("first", "use 'last' or 1-based"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_head_layers(spec, 4)
    with pytest.raises(ValueError, match="d_head_layers='37'"):
        validate(get_recipe("mmdit-8b-image-apt").replace(d_head_layers="37"))
    validate(get_recipe("mmdit-8b-image-apt").replace(d_head_layers="12,24,36"))


def test_last_layer_head_discriminator():
    cfg = get_preset("tiny")  # 2 blocks
    heads = DiscriminatorConfig(head_layers=parse_head_layers("last", cfg.num_layers))
    d = build_discriminator(cfg, disc_cfg=heads)
    assert d.head_layers == (2,) and len(d.heads) == 1
    assert d.proj.in_features == cfg.hidden_size  # one head token, not three
    paper = build_discriminator(cfg)
    assert paper.head_layers == (1, 1, 2) and len(paper.heads) == 3
    logits = d(**{k: v for k, v in dummy_inputs(cfg, batch=2).items()})
    assert logits.shape == (2,)


# ------------------------------------------------------------------------------------------
# --optimizer adam
# ------------------------------------------------------------------------------------------


def _steps(optim: OptimConfig, lr: float, grad: float, n: int) -> list[float]:
    """Sizes of ``n`` optimizer steps on a constant gradient ``grad``."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer([p], optim, lr)
    sizes = []
    for _ in range(n):
        before = p.detach().clone()
        p.grad = torch.full_like(p, grad)
        opt.step()
        sizes.append((p.detach() - before).abs().max().item())
    return sizes


def test_rmsprop_first_steps_are_larger_than_bias_corrected_adam():
    """The paper's RMSprop(alpha 0.9) and Adam(beta1 0, beta2 0.9) on a constant gradient:
    RMSprop's first step is lr / sqrt(1 - 0.9) ~ 3.16 lr (no bias correction of v), Adam's is
    lr; both tend to lr as 0.9^t vanishes."""
    lr, eps = 1e-3, 1e-12
    rms = _steps(OptimConfig(name="rmsprop", rmsprop_alpha=0.9, eps=eps), lr, 0.37, 60)
    adam = _steps(OptimConfig(name="adam", adam_betas=(0.0, 0.9), eps=eps), lr, 0.37, 60)
    assert adam[0] == pytest.approx(lr, rel=1e-5)
    assert rms[0] / adam[0] == pytest.approx(1 / math.sqrt(1 - 0.9), rel=1e-5)  # 3.162
    for t in (1, 5, 20):  # RMSprop: lr / sqrt(1 - 0.9^t)
        assert rms[t - 1] == pytest.approx(lr / math.sqrt(1 - 0.9**t), rel=1e-4)
    assert rms[-1] / adam[-1] == pytest.approx(1.0, abs=0.01)
    assert all(a == pytest.approx(lr, rel=1e-4) for a in adam)


def test_adam_is_torch_adam_without_weight_decay():
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(p, OptimConfig(name="adam", adam_betas=(0.0, 0.9)), 1e-4)
    assert type(opt) is torch.optim.Adam
    group = opt.param_groups[0]
    assert group["betas"] == (0.0, 0.9) and group["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="optimizer='adam' takes no weight decay"):
        validate(get_recipe("tiny-apt").replace(optim=OptimConfig(name="adam", weight_decay=0.1)))


# ------------------------------------------------------------------------------------------
# --freeze-discriminator (config; the run itself: tests/distributed/test_ablation_runs.py)
# ------------------------------------------------------------------------------------------


def test_freeze_and_head_layers_are_apt_only():
    for stage in ("diffusion", "consistency"):
        base = get_recipe(f"tiny-{stage}")
        with pytest.raises(ValueError, match="freeze_discriminator=True applies to the apt"):
            validate(base.replace(freeze_discriminator=True))
        with pytest.raises(ValueError, match="d_head_layers='last' applies to the apt"):
            validate(base.replace(d_head_layers="last"))
    validate(get_recipe("tiny-apt").replace(freeze_discriminator=True, d_head_layers="last"))
