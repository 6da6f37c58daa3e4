"""Flow matching for the `diffusion` stage: noising, loss, timestep sampling and ODE samplers.

Pure functions on torch tensors (no DeepSpeed, no megatron-core). Conventions used everywhere:

- A latent ``x`` has its batch dimension first, e.g. ``[B, C, T, H, W]`` for video latents.
- ``t`` is a float tensor of shape ``[B]`` on the ``[0, 1]`` scale: ``t = 0`` is clean data and
  ``t = 1`` is pure noise. Scale it to a model's own timestep range (e.g. ``[0, 1000]``) inside
  the model, after any shift.
- ``x_t = (1 - t) * x + t * z`` with ``z ~ N(0, I)``; the model predicts the velocity
  ``v = z - x = dx_t/dt``.
- A velocity model is called as ``velocity_fn(x_t, t, **cond)``; every tensor in ``cond`` (for the
  MMDiT: ``text`` [B, L, D], ``text_mask`` [B, L] bool, ``pooled_text`` [B, P]) has its batch
  dimension first. ``None`` values in ``cond`` are passed through unchanged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

import torch

from megatron_apt.utils.transfer import to_device

__all__ = [
    "LOSS_REDUCTIONS",
    "TIMESTEP_MODES",
    "VelocityFn",
    "add_noise",
    "drop_condition",
    "euler_sample",
    "flow_matching_loss",
    "guided_velocity",
    "one_step_sample",
    "sample_timesteps",
    "sampling_timesteps",
    "timestep_shift",
    "velocity_target",
]

VelocityFn = Callable[..., torch.Tensor]
"""``velocity_fn(x_t [B, ...], t [B], **cond) -> v [B, ...]``."""

TIMESTEP_MODES = ("uniform", "logit_normal")
LOSS_REDUCTIONS = ("mean", "none")


# ---------------------------------------------------------------------------------------------
# Timesteps
# ---------------------------------------------------------------------------------------------


def _check_shift(shift: float) -> None:
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"timestep shift must be a finite number > 0, got {shift!r}")


@overload
def timestep_shift(t: torch.Tensor, shift: float) -> torch.Tensor: ...
@overload
def timestep_shift(t: float, shift: float) -> float: ...
def timestep_shift(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Shift timesteps towards noise: ``shift(t, s) = s*t / (1 + (s-1)*t)`` (APT paper eq. 7).

    Args:
        t: timesteps on ``[0, 1]`` (tensor of any shape, or a python float).
        shift: ``s > 0``. ``s = 1`` is the identity, ``s > 1`` moves mass towards ``t = 1``
            (the paper uses 1 for images and 12 for video), ``s < 1`` towards ``t = 0``.

    Returns:
        Shifted timesteps, same shape and type as ``t``; 0 maps to 0 and 1 maps to 1.
    """
    _check_shift(shift)
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    batch_size: int,
    *,
    mode: str = "uniform",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Draw one training timestep per sample.

    ``u ~ U(0, 1)`` (``mode="uniform"``) or ``u = sigmoid(n), n ~ N(logit_mean, logit_std^2)``
    (``mode="logit_normal"``, SD3), then ``t = timestep_shift(u, shift)``.

    The result is clamped to ``[eps, 1 - eps]`` *after* the shift (computed in fp32, then cast to
    ``dtype``), so ``t`` stays in the open interval (0, 1): ``torch.rand`` can return exactly 0 and
    the sigmoid saturates to 0 or 1 in fp32. Note that a low-precision ``dtype`` (bf16) may round
    values near 1 back to 1.0; keep timesteps in fp32.

    Args:
        batch_size: number of timesteps ``B``.
        generator: RNG; when given and ``device`` is None, the generator's device is used.

    Returns:
        ``t`` of shape ``[B]``, values in ``[eps, 1 - eps]``.
    """
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"unknown timestep mode {mode!r}; valid modes: {TIMESTEP_MODES}")
    if not 0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps}")
    if mode == "logit_normal" and not logit_std > 0:
        raise ValueError(f"logit_std must be > 0, got {logit_std}")
    if device is None and generator is not None:
        device = generator.device
    shape = (batch_size,)
    if mode == "uniform":
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    else:
        n = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        u = torch.sigmoid(n * logit_std + logit_mean)
    t = timestep_shift(u, shift).clamp(eps, 1 - eps)
    return t.to(dtype)


def sampling_timesteps(
    num_steps: int,
    *,
    shift: float = 1.0,
    t_max: float = 1.0,
    t_min: float = 0.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The decreasing timestep schedule of an ODE sampler.

    ``num_steps + 1`` values evenly spaced from ``t_max`` down to ``t_min``, then shifted with
    :func:`timestep_shift` (like diffusers' ``FlowMatchEulerDiscreteScheduler`` with ``shift``).
    Endpoints 0 and 1 are fixed points of the shift, so the default schedule runs exactly from 1
    to 0.

    Returns:
        fp32 tensor of shape ``[num_steps + 1]``, strictly decreasing.
    """
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    ts = torch.linspace(t_max, t_min, num_steps + 1, dtype=torch.float64)
    return timestep_shift(ts, shift).to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Noising and loss
# ---------------------------------------------------------------------------------------------


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )


def _broadcast_t(t: torch.Tensor | float, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` ([B], [] or float) as a ``[B, 1, ..., 1]`` tensor that broadcasts against ``x``."""
    t = torch.as_tensor(t, device=x.device, dtype=dtype)
    if t.ndim == 0:
        return t
    if t.shape != x.shape[:1]:
        raise ValueError(
            f"t must have shape [B]={list(x.shape[:1])} (or be a scalar), got {list(t.shape)}"
        )
    return t.view(-1, *([1] * (x.ndim - 1)))


def add_noise(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Interpolate data and noise: ``x_t = (1 - t) * x + t * noise``.

    Args:
        x: clean latents ``[B, ...]``.
        noise: ``z ~ N(0, I)``, same shape as ``x``.
        t: ``[B]`` timesteps on ``[0, 1]`` (or a scalar), broadcast over all non-batch dims.

    Returns:
        ``x_t``, same shape and dtype as ``x`` (computed in at least fp32).
    """
    _check_same_shape("x", x, "noise", noise)
    dtype = torch.promote_types(torch.promote_types(x.dtype, noise.dtype), torch.float32)
    t_b = _broadcast_t(t, x, dtype)  # [B, 1, ..., 1]
    x_t = (1 - t_b) * x.to(dtype) + t_b * noise.to(dtype)
    return x_t.to(x.dtype)


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target ``v = noise - x`` (``dx_t/dt``), shape of ``x``."""
    _check_same_shape("x", x, "noise", noise)
    return noise - x


def flow_matching_loss(
    v_pred: torch.Tensor, x: torch.Tensor, noise: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Mean squared error between predicted and target velocity, computed in (at least) fp32.

    Args:
        v_pred: model output ``[B, ...]`` (any float dtype, e.g. bf16).
        x: clean latents, same shape.
        noise: the ``z`` used to build ``x_t``, same shape.
        reduction: ``"mean"`` (scalar, mean over all elements) or ``"none"`` (``[B]``, the mean
            over each sample's elements).
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {LOSS_REDUCTIONS}")
    _check_same_shape("v_pred", v_pred, "x", x)
    _check_same_shape("x", x, "noise", noise)
    dtype = torch.promote_types(v_pred.dtype, torch.float32)
    target = noise.to(dtype) - x.to(dtype)
    err = (v_pred.to(dtype) - target).square()
    if reduction == "mean":
        return err.mean()
    return err.reshape(err.shape[0], -1).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance: batching cond and uncond into one model call
# ---------------------------------------------------------------------------------------------


def _expand_batch(value: Any, batch: int, key: str) -> Any:
    """Expand a batch-1 tensor to ``batch``; leave other values (and 0-dim tensors) alone."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(f"cond[{key!r}] has batch size {value.shape[0]}, expected 1 or {batch}")


def _pad_dim1(value: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad dim 1 (the sequence) with zeros (``False`` for masks) up to ``length``."""
    if value.shape[1] == length:
        return value
    pad = value.new_zeros((value.shape[0], length - value.shape[1], *value.shape[2:]))
    return torch.cat([value, pad], dim=1)


def _can_pad(key: str, c: torch.Tensor, u: torch.Tensor, cond: Mapping[str, Any]) -> bool:
    """Sequences of different lengths may be padded only if a bool mask says which are padding.

    True when ``c`` and ``u`` differ only in dim 1 and either are bool masks themselves or have a
    bool companion ``f"{key}_mask"`` (e.g. ``text`` and ``text_mask``).
    """
    if c.ndim < 2 or c.ndim != u.ndim or c.shape[2:] != u.shape[2:]:
        return False
    if c.dtype == torch.bool and u.dtype == torch.bool:
        return True
    mask = cond.get(f"{key}_mask")
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.bool


def _concat_cond(
    cond: Mapping[str, Any], uncond: Mapping[str, Any], batch: int
) -> dict[str, Any] | None:
    """``cond`` and ``uncond`` concatenated along dim 0 (``[2B, ...]``, cond first), or None.

    Batch-1 tensors are expanded to ``batch``; text of different lengths is right-padded (mask
    with False) when :func:`_can_pad` allows. Returns None when the two cannot be merged (different
    keys, differing non-tensor values, unpaddable shapes); the caller then makes two calls.
    """
    if set(cond) != set(uncond):
        return None
    merged: dict[str, Any] = {}
    for key, c in cond.items():
        u = uncond[key]
        if not (isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor)):
            if c is u or (isinstance(c, (int, float, str)) and type(c) is type(u) and c == u):
                merged[key] = c  # None or a batch-independent python value: pass through
                continue
            return None
        if c.ndim == 0 or u.ndim == 0:
            return None
        c, u = _expand_batch(c, batch, key), _expand_batch(u, batch, key)
        if c.shape[1:] != u.shape[1:]:
            if not (_can_pad(key, c, u, cond) and _can_pad(key, c, u, uncond)):
                return None
            length = max(c.shape[1], u.shape[1])
            c, u = _pad_dim1(c, length), _pad_dim1(u, length)
        merged[key] = torch.cat([c, u], dim=0)
    return merged


def drop_condition(
    cond: Mapping[str, Any], uncond: Mapping[str, Any], drop: torch.Tensor
) -> dict[str, Any]:
    """Classifier-free-guidance training: samples where ``drop [B]`` (bool) is True get the
    unconditional input ``uncond`` (the negative prompt; batch 1 or B) instead of ``cond``.

    Keys are those of ``cond``; sequences of different lengths are right-padded (``False`` in
    the mask) to the longer one. ``ValueError`` names a key that ``uncond`` lacks or cannot fit.
    """
    b = drop.shape[0]
    out: dict[str, Any] = {}
    for key, c in cond.items():
        if not isinstance(c, torch.Tensor):
            out[key] = c
            continue
        if key not in uncond:
            raise ValueError(f"drop_condition: the unconditional input has no {key!r}")
        u = _expand_batch(uncond[key].to(c.device, c.dtype), b, key)
        if c.shape[1:] != u.shape[1:]:
            if not (_can_pad(key, c, u, cond) and _can_pad(key, c, u, uncond)):
                raise ValueError(
                    f"drop_condition: cond[{key!r}] {tuple(c.shape)} and uncond "
                    f"{tuple(u.shape)} differ and cannot be padded"
                )
            length = max(c.shape[1], u.shape[1])
            c, u = _pad_dim1(c, length), _pad_dim1(u, length)
        where = to_device(drop, c.device).view(b, *([1] * (c.ndim - 1)))
        out[key] = torch.where(where, u, c)
    return out


def _guided_velocity(
    velocity_fn: VelocityFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None,
    guidance_scale: float,
    merged: dict[str, Any] | None,
) -> torch.Tensor:
    """Velocity with CFG, ``v_u + g * (v_c - v_u)``, returned in ``x_t``'s integration dtype.

    ``merged`` is the precomputed ``[2B]`` cond (one model call); if None, two calls are made.
    """
    dtype = t.dtype
    if uncond is None:
        return velocity_fn(x_t, t, **cond).to(dtype)
    if merged is not None:
        v = velocity_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), **merged).to(dtype)  # [2B, ...]
        v_c, v_u = v.chunk(2, dim=0)
    else:
        batch = x_t.shape[0]
        uncond_b = {k: _expand_batch(v, batch, k) for k, v in uncond.items()}
        v_c = velocity_fn(x_t, t, **cond).to(dtype)
        v_u = velocity_fn(x_t, t, **uncond_b).to(dtype)
    return v_u + guidance_scale * (v_c - v_u)


def guided_velocity(
    velocity_fn: VelocityFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Classifier-free-guided velocity ``v_u + g (v_c - v_u)`` in ``t``'s dtype (fp32), with
    cond and uncond (e.g. a batch-1 negative prompt) in one batched call where possible.
    Without ``uncond`` or with ``g == 1`` it is the plain conditional velocity."""
    if uncond is None or guidance_scale == 1.0:
        return velocity_fn(x_t, t, **cond).to(t.dtype)
    merged = _concat_cond(cond, uncond, x_t.shape[0])
    return _guided_velocity(velocity_fn, x_t, t, cond, uncond, guidance_scale, merged)


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


def _resolve_schedule(
    num_steps: int | None, shift: float, timesteps: Sequence[float] | torch.Tensor | None
) -> list[float]:
    if timesteps is None:
        if num_steps is None:
            raise ValueError("give num_steps or timesteps")
        return sampling_timesteps(num_steps, shift=shift).double().tolist()
    ts = torch.as_tensor(timesteps, dtype=torch.float64).cpu()
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"timesteps must be 1-D with >= 2 values, got shape {list(ts.shape)}")
    if not bool((ts[1:] < ts[:-1]).all()) or ts.min() < 0 or ts.max() > 1:
        raise ValueError(f"timesteps must be strictly decreasing within [0, 1], got {ts.tolist()}")
    if num_steps is not None and num_steps != ts.numel() - 1:
        raise ValueError(f"num_steps={num_steps} but {ts.numel()} timesteps were given")
    return ts.tolist()


@torch.no_grad()
def euler_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    *,
    num_steps: int | None = None,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    timesteps: Sequence[float] | torch.Tensor | None = None,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Integrate the probability-flow ODE from noise (t=1) to data (t=0) with Euler steps.

    ``x_{t_next} = x_t + (t_next - t) * v(x_t, t)``. The state and the guidance arithmetic are
    kept in (at least) fp32 whatever the model dtype; the model gets ``x_t`` cast to
    ``noise.dtype`` and ``t`` as an fp32 (or fp64) ``[B]`` tensor.

    Classifier-free guidance (``uncond`` given and ``guidance_scale != 1``):
    ``v = v_u + g * (v_c - v_u)``, with cond and uncond concatenated along dim 0 into ONE model
    call of batch ``2B`` (cond first). Batch-1 tensors in ``uncond`` (e.g. a fixed
    negative-prompt embedding) are expanded to ``B``. Text of different lengths is right-padded
    with zeros to the longer length, its mask with False; padding is only done for bool tensors
    and for tensors with a bool ``f"{key}_mask"`` companion (``text`` / ``text_mask``). If the
    two dicts cannot be merged that way (different keys, unmasked sequences of different
    lengths, ...), the sampler falls back to two model calls per step. With
    ``guidance_scale == 1`` ``uncond`` is ignored.

    Args:
        velocity_fn: ``velocity_fn(x_t [B, ...], t [B], **cond) -> v [B, ...]``.
        noise: ``z ~ N(0, I)``, ``[B, ...]``; the state at ``t = timesteps[0]`` (1 by default).
        num_steps: number of Euler steps (model evaluations, ×1); optional when ``timesteps``
            is given.
        cond / uncond: keyword tensors for the model, batch dim first.
        shift: timestep shift of the default schedule (:func:`sampling_timesteps`).
        timesteps: overrides the schedule: any strictly decreasing sequence in ``[0, 1]``, e.g.
            ``[1.0, 0.5, 0.0]`` for two-step sampling of a one-step generator.
        return_trajectory: also return the states at every schedule point.

    Returns:
        The sample at the last timestep, ``noise.shape`` and ``noise.dtype``; with
        ``return_trajectory``, ``(sample, states)`` where ``states`` has ``len(schedule)``
        entries: the initial noise first and the sample last.
    """
    if noise.ndim < 1:
        raise ValueError("noise must have a batch dimension")
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs uncond")
    if guidance_scale == 1.0:
        uncond = None  # plain conditional sampling: one call of batch B
    schedule = _resolve_schedule(num_steps, shift, timesteps)
    batch = noise.shape[0]
    dtype = torch.promote_types(noise.dtype, torch.float32)
    merged = _concat_cond(cond, uncond, batch) if uncond is not None else None
    x = noise.to(dtype)
    states = [noise] if return_trajectory else []
    for t_cur, t_next in itertools.pairwise(schedule):
        t_b = torch.full((batch,), t_cur, dtype=dtype, device=noise.device)  # [B]
        x_in = x.to(noise.dtype)
        v = _guided_velocity(velocity_fn, x_in, t_b, cond, uncond, guidance_scale, merged)
        x = x + (t_next - t_cur) * v
        if return_trajectory:
            states.append(x.to(noise.dtype))
    sample = x.to(noise.dtype)
    return (sample, states) if return_trajectory else sample


def one_step_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    *,
    cond: Mapping[str, Any],
    t: float = 1.0,
) -> torch.Tensor:
    """One-step generation ``x = z - t * v(z, t, c)``; at the default ``t = 1`` this is the
    paper's eq. 4, ``x = z - G(z, c, T)``.

    Equal to :func:`euler_sample` with ``timesteps=[t, 0]`` (a single Euler step to t = 0).
    Unlike the samplers, this does NOT disable autograd, so it can build a generator's output
    inside a training step; wrap it in ``torch.no_grad()`` for inference.

    Returns:
        ``x`` with ``noise.shape`` and ``noise.dtype`` (arithmetic in at least fp32).
    """
    if not 0.0 < t <= 1.0:
        raise ValueError(f"t must be in (0, 1], got {t}")
    dtype = torch.promote_types(noise.dtype, torch.float32)
    t_b = torch.full((noise.shape[0],), t, dtype=dtype, device=noise.device)  # [B]
    v = velocity_fn(noise, t_b, **cond).to(dtype)
    return (noise.to(dtype) - t * v).to(noise.dtype)
