"""Consistency distillation (paper section 3.2): the one-step initialization Ĝ of the generator.

The teacher is the diffusion velocity model run with constant classifier-free guidance (7.5 in
the paper) against a fixed negative prompt. The student Ĝ is a velocity model too; its
consistency function is the sample prediction

    f_θ(x_t, t) = x_t - t · Ĝ(x_t, c, t)        (f_θ(z, 1) = z - Ĝ(z, c, T): eqs. 3-4)

which satisfies the boundary condition f_θ(x, 0) = x by construction. One distillation step
(Song et al., 2023, with the flow-matching path x_t = (1 - t) x + t z):

    pick adjacent t_hi > t_lo on an N-step schedule; x_hi = (1 - t_hi) x + t_hi z
    x_lo = x_hi + (t_lo - t_hi) · v_cfg(x_hi, t_hi)             (one teacher Euler step)
    loss = || f_θ(x_hi, t_hi) - stopgrad f_θ⁻(x_lo, t_lo) ||²   (MSE; θ⁻ = EMA of θ)

Pure torch; the training system runs it in a DeepSpeed engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from megatron_apt.stages.diffusion import add_noise, guided_velocity, sampling_timesteps
from megatron_apt.stages.noise import Rng, rand_batch, randn_like_batch
from megatron_apt.utils.transfer import to_device

__all__ = [
    "ConsistencyConfig",
    "consistency_distillation_step",
    "consistency_function",
    "consistency_loss",
    "teacher_euler_step",
]

VelocityFn = Callable[..., torch.Tensor]


@dataclass(kw_only=True)
class ConsistencyConfig:
    guidance_scale: float = 7.5  # constant CFG of the teacher (paper)
    num_steps: int = 32  # N: discretization of [0, 1] into adjacent (t_lo, t_hi) pairs
    shift: float = 1.0  # schedule shift (3 for SD3-like image models, larger for video)
    target_ema_decay: float = 0.95  # θ⁻ <- μ θ⁻ + (1 - μ) θ after each student step

    def __post_init__(self) -> None:
        if self.num_steps < 1 or not 0.0 <= self.target_ema_decay < 1.0 or self.shift <= 0:
            raise ValueError(
                f"ConsistencyConfig needs num_steps >= 1, 0 <= target_ema_decay < 1, shift > 0;"
                f" got {self.num_steps}, {self.target_ema_decay}, {self.shift}"
            )


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.float().reshape(-1, *([1] * (x.dim() - 1)))


def consistency_function(velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """``f(x_t, t) = x_t - t · v`` in fp32 (``t`` is ``[B]``)."""
    return x_t.float() - _bcast(t, x_t) * velocity.float()


def consistency_loss(
    pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Mean squared error in fp32 between the student's and the target's sample predictions;
    ``reduction="none"`` gives the per-sample mean ``[B]``. The target carries no gradient."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    err = (pred.float() - target.detach().float()).square()
    if reduction == "mean":
        return err.mean()
    if reduction == "none":
        return err.flatten(1).mean(1)
    raise ValueError(f"reduction={reduction!r}: use 'mean' or 'none'")


@torch.no_grad()
def teacher_euler_step(
    teacher: VelocityFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None,
    guidance_scale: float,
) -> torch.Tensor:
    """One Euler step of the guided teacher ODE from ``t`` to ``t_next`` (both ``[B]``), fp32."""
    v = guided_velocity(teacher, x_t, t.float(), cond, uncond, guidance_scale)
    return x_t.float() + _bcast(t_next - t, x_t) * v.float()


def consistency_distillation_step(
    student: VelocityFn,
    target: VelocityFn,
    teacher: VelocityFn,
    x0: torch.Tensor,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None,
    cfg: ConsistencyConfig,
    rng: Rng = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch of consistency distillation: ``(loss, metrics)``.

    ``student``/``target``/``teacher`` are velocity functions ``fn(x_t, t, **cond)``;
    ``target`` is the EMA copy θ⁻ of the student; ``uncond`` holds the negative prompt
    (batch 1 is expanded). ``x0``: clean latents ``[B, ...]``.
    """
    b = x0.shape[0]
    schedule = sampling_timesteps(cfg.num_steps, shift=cfg.shift)  # decreasing, 1 -> 0
    n = (rand_batch(b, rng) * cfg.num_steps).long().clamp(max=cfg.num_steps - 1)
    t_hi, t_lo = to_device(schedule[n], x0.device), to_device(schedule[n + 1], x0.device)
    z = randn_like_batch(x0, rng, torch.float32)
    x_hi = add_noise(x0.float(), z, t_hi).to(x0.dtype)
    x_lo = teacher_euler_step(teacher, x_hi, t_hi, t_lo, cond, uncond, cfg.guidance_scale)
    with torch.no_grad():
        x_lo_in = x_lo.to(x0.dtype)
        target_x0 = consistency_function(target(x_lo_in, t_lo, **cond), x_lo, t_lo)
    pred_x0 = consistency_function(student(x_hi, t_hi, **cond), x_hi, t_hi)
    loss = consistency_loss(pred_x0, target_x0)
    return loss, {"loss": loss.detach(), "t_hi_mean": t_hi.mean()}
