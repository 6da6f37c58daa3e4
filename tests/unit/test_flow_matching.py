"""Flow matching (megatron_apt.stages.diffusion): formulas, samplers, CFG batching, and a toy
2-D mixture that a small MLP must learn well enough for measured statistics to match."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from megatron_apt.stages.diffusion import (
    add_noise,
    euler_sample,
    flow_matching_loss,
    one_step_sample,
    sample_timesteps,
    sampling_timesteps,
    timestep_shift,
    velocity_target,
)

# =============================================================================================
# timestep_shift / sample_timesteps / sampling_timesteps
# =============================================================================================


def test_timestep_shift_hand_values():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(timestep_shift(t, 1.0), t)
    assert timestep_shift(0.5, 3.0) == pytest.approx(0.75)  # 1.5 / (1 + 2 * 0.5)
    assert timestep_shift(0.25, 12.0) == pytest.approx(0.8)  # 3 / (1 + 11 * 0.25)
    assert timestep_shift(0.5, 0.5) == pytest.approx(1 / 3)  # 0.25 / 0.75
    for s in (0.5, 3.0, 12.0):
        shifted = timestep_shift(t, s)
        assert shifted[0].item() == 0.0 and shifted[-1].item() == pytest.approx(1.0, abs=1e-15)
        assert bool((shifted[1:] > shifted[:-1]).all()), f"not increasing for s={s}"
        # s > 1 moves every interior t towards noise, s < 1 towards data
        interior_gain = shifted[1:-1] - t[1:-1]
        assert bool((interior_gain > 0).all() if s > 1 else (interior_gain < 0).all())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_timestep_shift_rejects_bad_shift(bad):
    with pytest.raises(ValueError, match=str(bad)):
        timestep_shift(torch.tensor([0.5]), bad)
    with pytest.raises(ValueError):
        sampling_timesteps(4, shift=bad)


def test_sample_timesteps_uniform_and_shift():
    n = 20000
    t = sample_timesteps(n, generator=torch.Generator().manual_seed(0))
    assert t.shape == (n,) and t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    # same generator seed -> same draw; the shift is applied to the same uniform draw
    again = sample_timesteps(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    shifted = sample_timesteps(n, shift=3.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, timestep_shift(t, 3.0))
    assert shifted.median().item() == pytest.approx(0.75, abs=0.01)  # shift(median 0.5, 3)
    assert sample_timesteps(4, dtype=torch.float64).dtype == torch.float64


def test_sample_timesteps_logit_normal_and_clamp():
    g = torch.Generator().manual_seed(1)
    t = sample_timesteps(40000, mode="logit_normal", logit_mean=0.5, logit_std=0.8, generator=g)
    logit = torch.logit(t.double())
    assert logit.mean().item() == pytest.approx(0.5, abs=0.02)
    assert logit.std().item() == pytest.approx(0.8, abs=0.02)
    # a very wide logit-normal saturates the sigmoid: the result is clamped to [eps, 1 - eps]
    g = torch.Generator().manual_seed(2)
    wide = sample_timesteps(1000, mode="logit_normal", logit_std=60.0, generator=g, eps=1e-4)
    assert wide.min().item() == pytest.approx(1e-4) and wide.max().item() == pytest.approx(1 - 1e-4)


def test_sample_timesteps_unknown_mode():
    with pytest.raises(ValueError, match="uniform.*logit_normal"):
        sample_timesteps(4, mode="cosine")


def test_sampling_timesteps_schedule():
    ts = sampling_timesteps(4)
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    ts = sampling_timesteps(2, shift=3.0)
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.75, 0.0]))
    ts = sampling_timesteps(25, shift=12.0)
    assert ts.shape == (26,) and ts.dtype == torch.float32
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0
    assert bool((ts[1:] < ts[:-1]).all())
    torch.testing.assert_close(ts, timestep_shift(torch.linspace(1, 0, 26), 12.0))
    ts = sampling_timesteps(3, t_max=0.8, t_min=0.2)
    torch.testing.assert_close(ts, torch.tensor([0.8, 0.6, 0.4, 0.2]))
    for kwargs in ({"num_steps": 0}, {"num_steps": 2, "t_min": 0.5, "t_max": 0.5}):
        with pytest.raises(ValueError):
            sampling_timesteps(**kwargs)


# =============================================================================================
# add_noise / velocity_target / flow_matching_loss
# =============================================================================================


def test_add_noise_and_velocity_target_hand_values():
    x = torch.tensor([[1.0, 2.0], [0.0, -4.0]]).view(2, 1, 1, 1, 2)  # [B, C, T, H, W]
    z = torch.tensor([[3.0, -1.0], [2.0, 4.0]]).view(2, 1, 1, 1, 2)
    t = torch.tensor([0.25, 0.5])
    x_t = add_noise(x, z, t)
    expected = torch.tensor([[1.5, 1.25], [1.0, 0.0]]).view(2, 1, 1, 1, 2)
    torch.testing.assert_close(x_t, expected)
    torch.testing.assert_close(add_noise(x, z, torch.zeros(2)), x)
    torch.testing.assert_close(add_noise(x, z, torch.ones(2)), z)
    torch.testing.assert_close(velocity_target(x, z), z - x)
    # dx_t/dt is the velocity target
    dt = 1e-3
    x64, z64, t64 = x.double(), z.double(), t.double()
    fd = (add_noise(x64, z64, t64 + dt) - add_noise(x64, z64, t64)) / dt
    torch.testing.assert_close(fd, velocity_target(x64, z64))
    assert add_noise(x.bfloat16(), z, t).dtype == torch.bfloat16


def test_flow_matching_loss_hand_values():
    x = torch.tensor([[1.0, 2.0], [0.0, -4.0]])
    z = torch.tensor([[3.0, -1.0], [2.0, 4.0]])  # target z - x = [[2, -3], [2, 8]]
    v = torch.tensor([[2.0, -1.0], [0.0, 8.0]], requires_grad=True)  # errors [[0, 2], [-2, 0]]
    per_sample = flow_matching_loss(v, x, z, reduction="none")
    torch.testing.assert_close(per_sample, torch.tensor([2.0, 2.0]))
    loss = flow_matching_loss(v, x, z)
    torch.testing.assert_close(loss, torch.tensor(2.0))
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))  # 2 * err / 4
    # bf16 predictions: the loss is computed (and returned) in fp32
    loss_bf16 = flow_matching_loss(v.detach().bfloat16(), x.bfloat16(), z.bfloat16())
    assert loss_bf16.dtype == torch.float32 and loss_bf16.item() == 2.0


def test_shape_mismatch_raises():
    x, z = torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        add_noise(x, z, torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        velocity_target(x, z)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 3\)"):
        flow_matching_loss(z, x, x)
    with pytest.raises(ValueError, match=r"\[3\]"):
        add_noise(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="sum"):
        flow_matching_loss(x, x, x, reduction="sum")


# =============================================================================================
# Euler sampler: exactness, one-step equivalence, schedules
# =============================================================================================


def _point_mass_velocity(c: torch.Tensor):
    """Exact velocity field when the data is a point mass at c: v(x_t, t) = (x_t - c) / t."""

    def velocity_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x_t - c) / t.view(-1, *([1] * (x_t.ndim - 1)))

    return velocity_fn


@pytest.mark.parametrize("num_steps", [1, 2, 7, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_is_exact_for_a_point_mass(num_steps, shift):
    torch.manual_seed(0)
    c = torch.tensor([0.7, -1.3, 2.0]).view(1, 3, 1, 1)
    z = torch.randn(5, 3, 2, 2)
    sample, states = euler_sample(
        _point_mass_velocity(c),
        z,
        num_steps=num_steps,
        cond={},
        shift=shift,
        return_trajectory=True,
    )
    torch.testing.assert_close(sample, c.expand_as(z), atol=1e-5, rtol=0)
    # every intermediate state lies on the straight path x_t = (1 - t) c + t z
    ts = sampling_timesteps(num_steps, shift=shift)
    assert len(states) == num_steps + 1 and torch.equal(states[0], z)
    for t, state in zip(ts.tolist(), states, strict=True):
        torch.testing.assert_close(state, (1 - t) * c + t * z, atol=1e-5, rtol=0)


def test_euler_custom_timesteps_and_validation():
    c = torch.tensor([[1.0, -2.0]])
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    for ts in ([1.0, 0.5, 0.0], torch.tensor([1.0, 0.9, 0.2, 0.0])):
        sample = euler_sample(_point_mass_velocity(c), z, cond={}, timesteps=ts)
        torch.testing.assert_close(sample, c.expand_as(z), atol=1e-5, rtol=0)
    # stopping early: the state at t = 0.4 of the straight path
    sample = euler_sample(_point_mass_velocity(c), z, cond={}, timesteps=[1.0, 0.4])
    torch.testing.assert_close(sample, 0.6 * c + 0.4 * z, atol=1e-5, rtol=0)
    for bad in ([1.0, 1.0, 0.0], [0.0, 1.0], [1.5, 0.0], [1.0]):
        with pytest.raises(ValueError):
            euler_sample(_point_mass_velocity(c), z, cond={}, timesteps=bad)
    with pytest.raises(ValueError, match="num_steps=3"):
        euler_sample(_point_mass_velocity(c), z, num_steps=3, cond={}, timesteps=[1.0, 0.0])


def _nonlinear_velocity(x_t: torch.Tensor, t: torch.Tensor, *, text: torch.Tensor) -> torch.Tensor:
    return torch.tanh(1.7 * x_t * t[:, None] + text.mean(1)) - 0.3 * x_t


def test_one_step_sample_equals_one_euler_step():
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(4, 3, generator=g), torch.randn(4, 5, 3, generator=g)
    one = one_step_sample(_nonlinear_velocity, z, cond={"text": text})
    torch.testing.assert_close(one, z - _nonlinear_velocity(z, torch.ones(4), text=text))
    euler = euler_sample(_nonlinear_velocity, z, cond={"text": text}, timesteps=[1.0, 0.0])
    torch.testing.assert_close(one, euler)
    euler_1 = euler_sample(_nonlinear_velocity, z, num_steps=1, cond={"text": text})
    torch.testing.assert_close(one, euler_1)
    # one_step_sample keeps autograd (it builds the APT generator output); euler_sample does not
    z.requires_grad_(True)
    assert one_step_sample(_nonlinear_velocity, z, cond={"text": text}).requires_grad
    assert not euler_sample(_nonlinear_velocity, z, num_steps=2, cond={"text": text}).requires_grad


# =============================================================================================
# Classifier-free guidance
# =============================================================================================


class _RecordingModel:
    """v = 0.3 * x + masked sum of text tokens + pooled; records the batch of every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, x_t, t, *, text, text_mask, pooled_text=None, extra=None):
        self.calls.append({"batch": x_t.shape[0], "text": text, "mask": text_mask, "extra": extra})
        assert t.shape == (x_t.shape[0],) and t.dtype == torch.float32
        v = 0.3 * x_t + (text * text_mask[..., None]).sum(1)  # [B, D]
        return v if pooled_text is None else v + pooled_text


def _text(batch: int, length: int, valid: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, :valid] = True
    return torch.randn(batch, length, 2, generator=g), mask


@pytest.mark.parametrize("len_c,len_u", [(4, 4), (6, 3), (2, 5)])
def test_cfg_one_batched_call_matches_hand_formula(len_c, len_u):
    b, g = 3, 4.5
    z = torch.randn(b, 2, generator=torch.Generator().manual_seed(0))
    text_c, mask_c = _text(b, len_c, valid=min(len_c, 3), seed=1)
    text_u, mask_u = _text(1, len_u, valid=2, seed=2)  # a fixed negative prompt, batch 1
    pooled_c, pooled_u = torch.randn(b, 2), torch.randn(1, 2)
    cond = {"text": text_c, "text_mask": mask_c, "pooled_text": pooled_c, "extra": None}
    uncond = {"text": text_u, "text_mask": mask_u, "pooled_text": pooled_u, "extra": None}
    model = _RecordingModel()
    out = euler_sample(model, z, cond=cond, uncond=uncond, guidance_scale=g, timesteps=[1.0, 0.0])
    # by hand: v_c and v_u at t = 1 on x = z, then x = z - (v_u + g (v_c - v_u))
    v_c = 0.3 * z + (text_c * mask_c[..., None]).sum(1) + pooled_c
    v_u = 0.3 * z + (text_u * mask_u[..., None]).sum(1) + pooled_u  # broadcast from batch 1
    torch.testing.assert_close(out, z - (v_u + g * (v_c - v_u)))
    # one call with batch 2B; text padded to the longer length, padding masked out
    assert [c["batch"] for c in model.calls] == [2 * b]
    call = model.calls[0]
    length = max(len_c, len_u)
    assert call["text"].shape == (2 * b, length, 2) and call["mask"].shape == (2 * b, length)
    assert int(call["mask"][:b].sum()) == b * min(len_c, 3)
    assert int(call["mask"][b:].sum()) == b * 2
    assert call["extra"] is None


def test_cfg_calls_once_per_step_and_guidance_one_skips_uncond():
    b = 2
    z = torch.randn(b, 2, generator=torch.Generator().manual_seed(0))
    text, mask = _text(b, 4, valid=4, seed=1)
    text_u, mask_u = _text(1, 4, valid=1, seed=2)
    cond, uncond = {"text": text, "text_mask": mask}, {"text": text_u, "text_mask": mask_u}
    model = _RecordingModel()
    euler_sample(model, z, num_steps=5, cond=cond, uncond=uncond, guidance_scale=3.0)
    assert [c["batch"] for c in model.calls] == [2 * b] * 5
    model = _RecordingModel()
    plain = euler_sample(model, z, num_steps=5, cond=cond, uncond=uncond, guidance_scale=1.0)
    assert [c["batch"] for c in model.calls] == [b] * 5
    torch.testing.assert_close(plain, euler_sample(_RecordingModel(), z, num_steps=5, cond=cond))
    with pytest.raises(ValueError, match="uncond"):
        euler_sample(model, z, num_steps=5, cond=cond, guidance_scale=3.0)


def test_cfg_falls_back_to_two_calls_for_unmasked_sequences_of_different_lengths():
    def model(x_t, t, *, ctx):  # no mask: padding would change the result, so no batching
        calls.append(x_t.shape[0])
        return 0.3 * x_t + ctx.sum(1)

    calls: list[int] = []
    g = torch.Generator().manual_seed(0)
    z, ctx_c, ctx_u = torch.randn(3, 2, generator=g), torch.randn(3, 4, 2), torch.randn(1, 2, 2)
    out = euler_sample(
        model,
        z,
        cond={"ctx": ctx_c},
        uncond={"ctx": ctx_u},
        guidance_scale=2.0,
        timesteps=[1.0, 0.0],
    )
    assert calls == [3, 3]
    v_c, v_u = 0.3 * z + ctx_c.sum(1), 0.3 * z + ctx_u.sum(1)
    torch.testing.assert_close(out, z - (v_u + 2.0 * (v_c - v_u)))


def test_euler_low_precision_model_gets_model_dtype_and_returns_noise_dtype():
    seen: list[torch.dtype] = []

    def model(x_t, t):
        seen.append(x_t.dtype)
        return (0.5 * x_t).to(torch.bfloat16)

    z = torch.randn(2, 3).bfloat16()
    out, states = euler_sample(model, z, num_steps=4, cond={}, return_trajectory=True)
    assert out.dtype == torch.bfloat16 and all(s.dtype == torch.bfloat16 for s in states)
    assert seen == [torch.bfloat16] * 4


# =============================================================================================
# Learning a toy distribution: a trained MLP must reproduce measured statistics
# =============================================================================================

SEED = 0
MEANS = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]])  # [K, 2]
WEIGHTS = torch.tensor([0.1, 0.2, 0.3, 0.4])  # unequal, so N(0, I) cannot match by chance
STD = 0.15
NULL_LABEL = 4  # the "no condition" class of the conditional model (label dropout)
LABEL_KEEP = 0.6  # conditional data: the label is the true mode with this prob., else another


def _sample_mixture(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    modes = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)  # [n]
    return MEANS[modes] + STD * torch.randn(n, 2, generator=g), modes


def _true_moments() -> tuple[torch.Tensor, torch.Tensor]:
    mean = WEIGHTS @ MEANS  # [2]
    second = (WEIGHTS[:, None, None] * MEANS[:, :, None] * MEANS[:, None, :]).sum(0)
    cov = second - mean[:, None] * mean[None, :] + STD**2 * torch.eye(2)
    return mean, cov


class _ToyVelocity(nn.Module):
    """MLP v(x_t, t[, label]): Fourier features of t, 2 hidden layers of 256, SiLU."""

    def __init__(self, num_classes: int = 0, width: int = 256) -> None:
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(8.0))
        self.label_emb = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.inp = nn.Linear(2 + 16, width)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x_t, t, label=None):
        ang = t[:, None] * self.freqs  # [B, 8]
        h = self.inp(torch.cat([x_t, ang.sin(), ang.cos()], dim=1))  # [B, W]
        if self.label_emb is not None:
            h = h + self.label_emb(label)
        return self.out(h)  # [B, 2]


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """A 256-wide MLP gains nothing from 2 threads, and 1 thread is ~4x faster on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def single_thread() -> Iterator[None]:
    with _single_thread():
        yield


def _train(model: _ToyVelocity, *, conditional: bool, steps: int = 1200) -> _ToyVelocity:
    g = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    batch, mode = 256, "logit_normal" if conditional else "uniform"
    for _ in range(steps):
        x, label = _sample_mixture(batch, g)
        cond = {}
        if conditional:  # noisy labels, then 20% label dropout to the null class
            relabel = torch.rand(batch, generator=g) >= LABEL_KEEP
            other = (label + torch.randint(1, 4, (batch,), generator=g)) % 4
            label = torch.where(relabel, other, label)
            dropped = torch.rand(batch, generator=g) < 0.2
            cond = {"label": torch.where(dropped, NULL_LABEL, label)}
        z = torch.randn(x.shape, generator=g)
        t = sample_timesteps(batch, mode=mode, generator=g)
        loss = flow_matching_loss(model(add_noise(x, z, t), t, **cond), x, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def _nearest_mode(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dist, mode = torch.cdist(samples, MEANS).min(dim=1)  # [n], [n]
    return dist, mode


def _mixture_failures(samples: torch.Tensor) -> list[str]:
    """Which measured statistics of ``samples`` [n, 2] miss the true mixture's (empty: all ok)."""
    dist, mode = _nearest_mode(samples)
    frac = torch.bincount(mode, minlength=len(WEIGHTS)).float() / len(samples)
    mean, cov = _true_moments()
    failures = []
    if (frac - WEIGHTS).abs().max() > 0.05:
        failures.append(f"mode fractions {frac.tolist()} vs weights {WEIGHTS.tolist()}")
    if (near := (dist < 4 * STD).float().mean().item()) < 0.85:
        failures.append(f"only {near:.3f} of samples within 4 std of a mode")
    if (samples.mean(0) - mean).abs().max() > 0.25:
        failures.append(f"mean {samples.mean(0).tolist()} vs {mean.tolist()}")
    if (torch.cov(samples.T) - cov).abs().max() > 0.5:
        failures.append(f"covariance {torch.cov(samples.T).tolist()} vs {cov.tolist()}")
    return failures


@pytest.fixture(scope="module")
def toy_models() -> tuple[_ToyVelocity, _ToyVelocity]:
    torch.manual_seed(SEED)
    untrained = _ToyVelocity().eval()
    with _single_thread():
        trained = _train(_ToyVelocity(), conditional=False)
    return untrained, trained


def test_trained_flow_matches_toy_mixture_and_untrained_does_not(toy_models, single_thread):
    untrained, trained = toy_models
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(SEED + 1))
    samples = euler_sample(trained, z, num_steps=50, cond={})
    assert _mixture_failures(samples) == []
    # the same statistics must reject the untrained model's samples
    failures = _mixture_failures(euler_sample(untrained, z, num_steps=50, cond={}))
    assert any("fractions" in f for f in failures) and any("4 std" in f for f in failures)
    assert any("covariance" in f for f in failures)
    # and few steps of a shifted schedule still land on the modes
    few = euler_sample(trained, z, num_steps=8, cond={}, shift=3.0)
    assert (_nearest_mode(few)[0] < 6 * STD).float().mean() > 0.75


def test_cfg_on_trained_class_conditional_model_concentrates_mass(single_thread):
    torch.manual_seed(SEED)
    model = _train(_ToyVelocity(num_classes=4), conditional=True)
    n, k = 1000, 1
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(SEED + 1))
    cond, uncond = {"label": torch.full((n,), k)}, {"label": torch.tensor([NULL_LABEL])}

    def frac_at_k(guidance: float) -> float:
        x = euler_sample(model, z, num_steps=30, cond=cond, uncond=uncond, guidance_scale=guidance)
        return (_nearest_mode(x)[1] == k).float().mean().item()

    # without guidance the model samples p(x | label=k): Bayes over the label noise
    other = (1 - LABEL_KEEP) / 3
    p_k = WEIGHTS[k] * LABEL_KEEP / (WEIGHTS[k] * LABEL_KEEP + (1 - WEIGHTS[k]) * other)
    f1, f3 = frac_at_k(1.0), frac_at_k(3.0)
    assert f1 == pytest.approx(p_k.item(), abs=0.08)
    assert f3 > f1 + 0.15, (f1, f3)
    # the null label is the unconditional model
    null = euler_sample(model, z, num_steps=30, cond={"label": torch.full((n,), NULL_LABEL)})
    frac = torch.bincount(_nearest_mode(null)[1], minlength=4).float() / n
    assert (frac - WEIGHTS).abs().max() < 0.08, frac
