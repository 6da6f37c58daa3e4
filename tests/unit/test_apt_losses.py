"""APT formulas against hand values and the paper (eqs. 1, 2, 6, 7, 9, 10), and the single
discriminator forward of the D phase."""

import math

import pytest
import torch

from megatron_apt.models import Discriminator, Generator, MMDiT
from megatron_apt.models.mmdit import get_preset
from megatron_apt.stages.apt import (
    APTConfig,
    approx_r1_penalty,
    discriminator_health,
    discriminator_loss,
    discriminator_step,
    frozen,
    generator_loss,
    generator_step,
    perturb,
    sample_discriminator_timesteps,
    timestep_shift,
)
from megatron_apt.testing import dummy_inputs, randomize_parameters


def test_shift_identity_monotone_and_endpoints():
    t = torch.linspace(0, 1, 101)
    torch.testing.assert_close(timestep_shift(t, 1.0), t)
    for s in (0.5, 3.0, 12.0):
        shifted = timestep_shift(t, s)
        assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted.diff() > 0).all())
    assert timestep_shift(0.5, 12.0) == pytest.approx(12 * 0.5 / (1 + 11 * 0.5))


def test_discriminator_timesteps_follow_the_shifted_uniform():
    g = torch.Generator().manual_seed(0)
    t = sample_discriminator_timesteps(20000, 12.0, g)
    assert t.shape == (20000,) and 0 <= t.min() and t.max() <= 1
    # median of shift(U, s) is shift(0.5, s) = 6/6.5 for s = 12
    assert t.median().item() == pytest.approx(6 / 6.5, abs=0.01)
    img = sample_discriminator_timesteps(20000, 1.0, torch.Generator().manual_seed(0))
    assert img.mean().item() == pytest.approx(0.5, abs=0.01)


def test_losses_equal_log_sigmoid_expressions():
    real, fake = torch.tensor([0.0, 2.0, -1.5]), torch.tensor([0.0, -3.0, 0.7])
    sig = torch.sigmoid
    ref_d = -(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean())
    torch.testing.assert_close(discriminator_loss(real, fake), ref_d)
    torch.testing.assert_close(generator_loss(fake), -torch.log(sig(fake)).mean())
    zero = torch.zeros(4)
    assert discriminator_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert generator_loss(zero).item() == pytest.approx(math.log(2))
    # stable far in the tails (softplus form)
    assert torch.isfinite(discriminator_loss(torch.tensor([-200.0]), torch.tensor([200.0])))


HEALTH = {"d_acc_real", "d_acc_fake", "logit_gap"}


def test_discriminator_health_on_hand_made_logits():
    real = torch.tensor([2.0, 0.5, -1.0, 0.0])  # 2 of 4 above 0 (0 is not "real")
    fake = torch.tensor([-3.0, -0.1, 1.0, 0.0, -2.0])  # 3 of 5 below 0
    h = discriminator_health(real.bfloat16(), fake.requires_grad_())
    assert set(h) == HEALTH and all(v.dtype == torch.float32 for v in h.values())
    assert h["d_acc_real"].item() == 0.5 and h["d_acc_fake"].item() == pytest.approx(0.6)
    assert h["logit_gap"].item() == pytest.approx(0.375 - (-0.82))
    assert not h["logit_gap"].requires_grad
    perfect = discriminator_health(torch.full((8,), 5.0), torch.full((8,), -5.0))
    assert (perfect["d_acc_real"].item(), perfect["d_acc_fake"].item()) == (1.0, 1.0)
    blind = discriminator_health(torch.zeros(8), torch.zeros(8))  # sigmoid 0.5 everywhere
    assert (blind["d_acc_real"].item(), blind["d_acc_fake"].item()) == (0.0, 0.0)


def test_approx_r1_hand_values():
    real, pert = torch.tensor([1.0, 2.0]), torch.tensor([0.9, 2.2])
    assert approx_r1_penalty(real, pert, 100.0).item() == pytest.approx(100 * (0.01 + 0.04) / 2)
    bf = approx_r1_penalty(real.bfloat16(), pert.bfloat16())
    assert bf.dtype == torch.float32
    with pytest.raises(ValueError, match="logit shapes differ"):
        approx_r1_penalty(real, pert[:1])


def test_perturbation_is_fp32():
    x = torch.full((4, 1000), 1.5, dtype=torch.bfloat16)
    xp = perturb(x, 0.01, torch.Generator().manual_seed(0))
    assert xp.dtype == torch.float32
    assert (xp - 1.5).std().item() == pytest.approx(0.01, rel=0.05)  # not bf16-quantized


def test_paper_hyper_parameters():
    img, vid = APTConfig.image(), APTConfig.video()
    assert (img.shift, img.r1_lambda, img.r1_sigma) == (1.0, 100.0, 0.01)
    assert (vid.shift, vid.r1_lambda, vid.r1_sigma) == (12.0, 100.0, 0.1)
    with pytest.raises(ValueError, match="r1_sigma"):
        APTConfig(r1_sigma=0.0)


@pytest.fixture(scope="module")
def tiny_d64():
    cfg = get_preset("tiny")
    d = Discriminator(MMDiT(cfg, params_dtype=torch.float64))
    randomize_parameters(d, seed=0, std=0.2)
    return d


def test_approx_r1_tends_to_exact_r1(tiny_d64):
    """E_eps[(D(x) - D(x + s eps))^2] / (s^2 ||grad_x D||^2) -> 1 as s -> 0 (torch.autograd)."""
    d = tiny_d64
    inputs = dummy_inputs(d.backbone.cfg, batch=1, dtype=torch.float64)
    x = inputs["latents"].requires_grad_(True)
    t = torch.tensor([0.3], dtype=torch.float64)
    logit = d(x, t, inputs["text"], inputs["text_mask"])
    (grad,) = torch.autograd.grad(logit.sum(), x)
    gnorm2 = grad.double().square().sum().item()
    k = 512
    eps = torch.randn(
        k, *x.shape[1:], generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    linear = ((eps * grad).flatten(1).sum(1) ** 2).mean().item()  # E[(eps . g)^2]
    assert linear == pytest.approx(gnorm2, rel=0.15)  # Monte Carlo of ||g||^2
    errors = []
    with torch.no_grad():
        xr = x.detach().expand(k, *x.shape[1:])
        rep = {key: inputs[key].expand(k, *inputs[key].shape[1:]) for key in ("text", "text_mask")}
        base = d(xr, t.expand(k), **rep)
        for sigma in (0.3, 0.03, 0.003):
            pert = d(xr + sigma * eps, t.expand(k), **rep)
            r1 = approx_r1_penalty(base, pert, r1_lambda=1.0).item()
            errors.append(abs(r1 / (sigma**2 * linear) - 1))
    print("approx-R1 / (sigma^2 ||grad||^2) - 1 at sigma 0.3, 0.03, 0.003:", errors)
    assert errors[-1] < 0.01 and errors[-1] < errors[0], errors


def test_d_phase_runs_one_forward_on_real_fake_perturbed():
    cfg = get_preset("tiny")
    d, g = Discriminator(MMDiT(cfg)), Generator(MMDiT(cfg))
    randomize_parameters(d, 0)
    randomize_parameters(g, 1)
    batch = {k: v for k, v in dummy_inputs(cfg, batch=3, frames=2).items() if k != "timesteps"}
    calls = []

    def spy(x, t, **cond):
        calls.append((x.detach().clone(), t.clone(), {k: v for k, v in cond.items()}))
        return d(x, t, **cond)

    apt = APTConfig(r1_sigma=0.01)
    loss, m = discriminator_step(spy, g, batch, apt, torch.Generator().manual_seed(0))
    assert len(calls) == 1
    x, t, cond = calls[0]
    b, real = 3, batch["latents"]
    assert x.shape[0] == 3 * b and x.dtype == torch.float32
    assert torch.equal(x[:b], real)  # D sees the clean real sample
    assert torch.equal(t[2 * b :], t[:b])  # the perturbed copy keeps its t ...
    assert torch.equal(cond["text"][2 * b :], cond["text"][:b])  # ... and its text
    assert (x[2 * b :] - real).std().item() == pytest.approx(0.01, rel=0.1)
    with torch.no_grad():
        fake = g(torch.randn_like(real), batch["text"], batch["text_mask"])
    assert not torch.equal(x[b : 2 * b], real) and x[b : 2 * b].shape == fake.shape
    assert set(m) == {"loss_d", "loss_r1", "d_real", "d_fake"} | HEALTH
    torch.testing.assert_close(loss.detach(), m["loss_d"] + m["loss_r1"])
    with torch.no_grad():  # the health metrics are those of the real and fake logits
        l_real, l_fake, _ = d(x, t, **cond).split(b)
    for k, v in discriminator_health(l_real, l_fake).items():
        torch.testing.assert_close(m[k], v)
    loss.backward()
    assert all(p.grad is None for p in g.parameters())  # G is not trained in the D phase
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())


def test_g_phase_trains_only_the_generator():
    cfg = get_preset("tiny")
    d, g = Discriminator(MMDiT(cfg)), Generator(MMDiT(cfg))
    randomize_parameters(d, 0)
    randomize_parameters(g, 1)
    batch = {k: v for k, v in dummy_inputs(cfg, batch=2).items() if k != "timesteps"}
    flags = [p.requires_grad for p in d.parameters()]
    with frozen(d):
        loss, m = generator_step(d, g, batch, APTConfig(), torch.Generator().manual_seed(0))
        loss.backward()
    assert [p.requires_grad for p in d.parameters()] == flags  # restored
    assert all(p.grad is None for p in d.parameters())
    grads = [p.grad for p in g.parameters()]
    assert all(gr is not None for gr in grads) and sum(gr.abs().sum() for gr in grads) > 0
    assert set(m) == {"loss_g", "d_fake_g"}
