"""diffusers' ``FlowMatchEulerDiscreteScheduler`` schedule, so that ``--mode diffusion`` samples
of an imported SD3 / SD3.5 model step through exactly the sigmas of diffusers' own pipeline.

Followed (diffusers 0.42, ``schedulers/scheduling_flow_match_euler_discrete.py``):

* ``__init__``: ``sigmas = shift(linspace(1, N, N)[::-1] / N)`` in float32, so
  ``sigma_max = 1`` and ``sigma_min = shift(1 / N)``;
* ``set_timesteps(n)``: ``linspace(sigma_max * N, sigma_min * N, n) / N``, shifted AGAIN with
  the same ``shift`` (``sigma_min`` is shifted twice), a final 0 appended;
* ``step``: ``x + (sigma_next - sigma) * v`` with the model called at ``sigma * N`` (our
  models take ``sigma`` and scale by ``timestep_scale = 1000`` themselves).

This differs from :func:`megatron_apt.stages.diffusion.sampling_timesteps` (``shift`` of
``linspace(1, 0, n + 1)``) in the last steps. One-step generation is the same under both:
``[1, 0]`` whatever the shift, i.e. ``G(z) = z - v(z, 1)``.

``UniPCMultistepScheduler`` (the scheduler of the Wan2.1 Diffusers pipelines, with
``use_flow_sigmas``, ``prediction_type="flow_prediction"`` and a ``flow_shift``; not checked
against a downloaded config here) is a
multistep predictor-corrector whose state (past model outputs, the corrector) is not an Euler
step: :func:`diffusers_scheduler_sample` drives diffusers' own scheduler object, built from the
directory's config, exactly as ``WanPipeline.__call__`` does (``pipeline_wan.py:554-641``:
``set_timesteps(n)``, ``set_begin_index(0)``, the model at ``timesteps[i]`` (integers for UniPC:
``:466`` of ``scheduling_unipc_multistep.py``), CFG ``v_u + g (v_c - v_u)``, ``step``). Our
models take ``t / num_train_timesteps``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_apt.utils.paths import read_json_object

__all__ = [
    "SCHEDULES",
    "diffusers_scheduler_sample",
    "flow_match_euler_sigmas",
    "read_flow_match_scheduler",
    "read_scheduler",
]

SCHEDULES = ("linear", "flow-match-euler", "unipc")
"""``linear``: shifted ``linspace(1, 0, n + 1)`` (ours); ``flow-match-euler``: diffusers'
sigmas, our Euler steps; ``unipc``: diffusers' ``UniPCMultistepScheduler`` object steps."""

# the diffusers schedulers whose own object :func:`diffusers_scheduler_sample` drives, and the
# config values that make them flow-matching samplers of a velocity model
_DRIVEN = {
    "UniPCMultistepScheduler": {
        "use_flow_sigmas": True,
        "prediction_type": "flow_prediction",
        "use_dynamic_shifting": False,  # needs the pipeline's ``mu``; WanPipeline passes none
    }
}

# options of FlowMatchEulerDiscreteScheduler that change the schedule; refused when set
_UNSUPPORTED = {
    "use_dynamic_shifting": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "stochastic_sampling": False,
}


def _shift(s, shift: float):
    return shift * s / (1 + (shift - 1) * s)


def flow_match_euler_sigmas(
    num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """The ``num_steps + 1`` sigmas (fp32, last 0) of ``FlowMatchEulerDiscreteScheduler(
    shift=shift, num_train_timesteps=N).set_timesteps(num_steps)``."""
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not shift > 0 or not num_train_timesteps >= 1:
        raise ValueError(
            f"need shift > 0 and num_train_timesteps >= 1, got {shift}, {num_train_timesteps}"
        )
    n = num_train_timesteps
    train = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
    train = _shift(train, shift)  # float32, as in __init__
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    sigmas = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n
    sigmas = torch.from_numpy(_shift(sigmas, shift)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def _scheduler_config_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "scheduler" if (p / "scheduler").is_dir() else p
        p = p / "scheduler_config.json"
    if not p.is_file():
        raise FileNotFoundError(f"no diffusers scheduler config at {p}")
    return p


def read_scheduler(path: str | Path) -> dict:
    """The :class:`~megatron_apt.inference.SamplingConfig` fields (``schedule``, ``shift``,
    ``num_train_timesteps``, ``scheduler_config``) of the diffusers scheduler of a pipeline
    directory (``scheduler/``), a scheduler directory or its ``scheduler_config.json``:
    ``FlowMatchEulerDiscreteScheduler`` (:func:`read_flow_match_scheduler`) or
    ``UniPCMultistepScheduler`` with flow sigmas. ``ValueError`` naming the file, key and
    value of anything else."""
    p = _scheduler_config_path(path)
    cfg = read_json_object(p)
    name = cfg.get("_class_name")
    if name == "FlowMatchEulerDiscreteScheduler":
        return {"schedule": "flow-match-euler", **read_flow_match_scheduler(p)}
    if name not in _DRIVEN:
        known = ["FlowMatchEulerDiscreteScheduler", *_DRIVEN]
        raise ValueError(f"{p}: _class_name {name!r} is not supported; supported: {known}")
    from diffusers import UniPCMultistepScheduler

    full = dict(UniPCMultistepScheduler.from_config(cfg).config)  # with diffusers' defaults
    for key, want in _DRIVEN[name].items():
        if full.get(key) != want:
            raise ValueError(
                f"{p}: {key}={full.get(key)!r}, need {want!r} (a flow-matching sampler of a "
                "velocity model, as Wan's)"
            )
    shift, n = full.get("flow_shift", 1.0), full.get("num_train_timesteps", 1000)
    if not (isinstance(shift, (int, float)) and shift > 0):
        raise ValueError(f"{p}: flow_shift must be a number > 0, got {shift!r}")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"{p}: num_train_timesteps must be an int >= 1, got {n!r}")
    config = {k: v for k, v in cfg.items() if not k.startswith("_")}
    config["_class_name"] = name
    return {
        "schedule": "unipc",
        "shift": float(shift),
        "num_train_timesteps": n,
        "scheduler_config": config,
    }


def diffusers_scheduler_sample(
    velocity_fn,
    noise: torch.Tensor,
    *,
    num_steps: int,
    scheduler_config: dict,
    cond: dict,
    uncond: dict | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Sample with diffusers' own scheduler object (a config :func:`read_scheduler` accepted),
    as ``WanPipeline.__call__`` does (module docstring); the state is kept in fp32 (the
    pipeline's ``latents``), the model gets it in ``noise.dtype`` at ``t / N``."""
    import diffusers

    from megatron_apt.stages.diffusion import guided_velocity

    config = dict(scheduler_config)
    name = config.pop("_class_name", None)
    if name not in _DRIVEN:
        raise ValueError(f"scheduler {name!r} is not one of {sorted(_DRIVEN)}")
    sched = getattr(diffusers, name).from_config(config)
    sched.set_timesteps(num_steps, device=noise.device)
    sched.set_begin_index(0)
    n = sched.config.num_train_timesteps
    batch = noise.shape[0]
    x = noise.to(torch.float32)
    for t in sched.timesteps:
        t_b = torch.full((batch,), float(t) / n, dtype=torch.float32, device=noise.device)
        v = guided_velocity(velocity_fn, x.to(noise.dtype), t_b, cond, uncond, guidance_scale)
        x = sched.step(v, t, x, return_dict=False)[0]
    return x.to(noise.dtype)


def read_flow_match_scheduler(path: str | Path) -> dict:
    """``{"shift", "num_train_timesteps"}`` of a diffusers flow-matching Euler scheduler: a
    pipeline directory (``scheduler/``), a scheduler directory or its
    ``scheduler_config.json``. ``ValueError`` naming the file and key for a scheduler whose
    schedule this module does not reproduce (another class, dynamic shifting, Karras ...)."""
    p = _scheduler_config_path(path)
    cfg = read_json_object(p)
    name = cfg.get("_class_name")
    if name != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"{p}: _class_name {name!r}, expected FlowMatchEulerDiscreteScheduler")
    for key, default in _UNSUPPORTED.items():
        if cfg.get(key, default) not in (default, None, False):
            raise ValueError(
                f"{p}: {key}={cfg[key]!r} is not supported (only the static-shift schedule "
                "is reproduced)"
            )
    shift, n = cfg.get("shift", 1.0), cfg.get("num_train_timesteps", 1000)
    if not (isinstance(shift, (int, float)) and shift > 0):
        raise ValueError(f"{p}: shift must be a number > 0, got {shift!r}")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"{p}: num_train_timesteps must be an int >= 1, got {n!r}")
    return {"shift": float(shift), "num_train_timesteps": n}
