"""Consistency distillation (section 3.2): formulas, the guided teacher step, and a measured
toy: distillation makes the one-step sample match the teacher's 64-step guided samples."""

import pytest
import torch

from megatron_apt.stages.consistency import (
    ConsistencyConfig,
    consistency_distillation_step,
    consistency_function,
    consistency_loss,
    teacher_euler_step,
)
from megatron_apt.stages.diffusion import euler_sample, one_step_sample
from megatron_apt.stages.ema import ema_update_, make_ema
from megatron_apt.testing.toy import GaussianMixtureFlow, MLPVelocity

MEANS = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]])


def test_consistency_function_boundaries():
    x, v = torch.randn(3, 4, 1, 2, 2), torch.randn(3, 4, 1, 2, 2)
    torch.testing.assert_close(consistency_function(v, x, torch.zeros(3)), x)  # f(x, 0) = x
    torch.testing.assert_close(consistency_function(v, x, torch.ones(3)), x - v)  # eq. 4
    half = consistency_function(v, x, torch.tensor([0.5, 0.5, 0.5]))
    torch.testing.assert_close(half, x - 0.5 * v)


def test_consistency_loss_is_mse_with_detached_target():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    loss = consistency_loss(pred, target)
    assert loss.item() == pytest.approx((1 + 4 + 1 + 1) / 4)
    loss.backward()
    assert target.grad is None and pred.grad is not None
    per = consistency_loss(pred, target, reduction="none")
    torch.testing.assert_close(per, torch.tensor([2.5, 1.0]))
    with pytest.raises(ValueError, match="differ"):
        consistency_loss(pred, target[:1])


def test_teacher_step_uses_constant_cfg_with_negative_prompt():
    def teacher(x, t, label):
        return x * 0 + label[:, None].float()  # v_c = label, v_u = -1

    x = torch.zeros(2, 3)
    out = teacher_euler_step(
        teacher,
        x,
        torch.ones(2),
        torch.full((2,), 0.75),
        {"label": torch.tensor([2, 3])},
        {"label": torch.tensor([-1])},
        7.5,
    )
    v = -1 + 7.5 * (torch.tensor([2.0, 3.0]) + 1)
    torch.testing.assert_close(out, (-0.25 * v)[:, None].expand(2, 3))


def test_config_defaults_and_validation():
    assert ConsistencyConfig().guidance_scale == 7.5  # the paper's constant CFG
    with pytest.raises(ValueError, match="num_steps"):
        ConsistencyConfig(num_steps=0)


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema = make_ema(a)
    ema_update_(ema, b, decay=0.9)
    torch.testing.assert_close(ema.weight, 0.9 * a.weight + 0.1 * b.weight)
    assert not ema.weight.requires_grad
    with pytest.raises(ValueError, match="no match"):
        ema_update_(ema, torch.nn.Linear(3, 2), 0.9)


def test_distillation_brings_one_step_samples_to_the_teacher():
    """Teacher: the exact (closed-form) velocity of a 4-mode Gaussian mixture, guided with
    scale 3 against the null label (the negative prompt). After distillation the student's
    one-step sample from z must be far closer to the teacher's 64-step sample from the same z
    than the untrained student's, and closer than the teacher's own one-step sample."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    gmm = GaussianMixtureFlow(MEANS, 0.2)
    cfg = ConsistencyConfig(guidance_scale=3.0, num_steps=16, target_ema_decay=0.9)
    uncond = {"label": torch.full((1,), -1)}
    z, labels = torch.randn(1024, 2, generator=g), torch.randint(0, 4, (1024,), generator=g)
    cond = {"label": labels}
    teacher_many = euler_sample(
        gmm.velocity, z, num_steps=64, cond=cond, uncond=uncond, guidance_scale=3.0
    )
    teacher_one = euler_sample(
        gmm.velocity, z, num_steps=1, cond=cond, uncond=uncond, guidance_scale=3.0
    )

    def dist(x):
        return (x - teacher_many).square().sum(1).mean().item()

    student = MLPVelocity(2, 128, num_classes=4)
    target = make_ema(student)
    with torch.no_grad():
        before = dist(one_step_sample(student, z, cond=cond))
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(400):
        x0, lab = gmm.sample(256, g)
        loss, _ = consistency_distillation_step(
            student, target, gmm.velocity, x0, {"label": lab}, uncond, cfg, g
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update_(target, student, cfg.target_ema_decay)
    with torch.no_grad():
        after = dist(one_step_sample(student, z, cond=cond))
    assert after < 0.02 * before, (before, after)
    assert after < 0.1 * dist(teacher_one), (after, dist(teacher_one))
    # the teacher's guided samples themselves sit on the requested modes
    assert (teacher_many - MEANS[labels]).norm(dim=1).mean() < 0.6
