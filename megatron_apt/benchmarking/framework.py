"""The framework's own overhead (``tools/benchmark.py --phases trainer-apt``): one APT update
through the trainer against the same update in plain torch, both built in this process and
timed with their repeats interleaved.

* ``trainer``: :meth:`megatron_apt.engine.trainer.Trainer.run_update` of an APT run built as
  ``pretrain_apt.py`` builds it (world of one, gloo): two DeepSpeed engines (ZeRO stage, fp32
  or bf16 as asked), micro-batches drawn from the synthetic stream, gradient accumulation to
  the global batch, the all-reduced non-finite check per micro-batch, D's health metrics,
  gradient norms, G's fp32 EMA. Logging (one all-reduce per log interval) and checkpoints are
  not in the timed call.
* ``plain``: the same networks (the trainer's heads, APT settings, accumulation) with two
  ``torch.optim.RMSprop`` and a fixed batch: :func:`workloads.apt_update_call`.

The ratio ``trainer / plain`` is what the framework costs per update at this size; the profile
(``--profile``) says where it goes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from megatron_apt.config.training import DataConfig, OptimConfig, TrainConfig, parse_head_layers
from megatron_apt.models.discriminator import DiscriminatorConfig
from megatron_apt.models.specs import get_spec

__all__ = ["profile_calls", "trainer_apt_calls", "trainer_config"]

PROFILE_TOP = 25  # functions kept per contender, by cumulative time


def trainer_config(
    model,
    latent: tuple[int, int, int],
    text_len: int,
    micro_batch: int,
    accumulation: int = 1,
    zero_stage: int = 2,
    bf16: bool = False,
    compile: bool = False,
    layer_spec: str = "local",
    seed: int = 0,
    deepspeed_config: str | os.PathLike | None = None,
) -> TrainConfig:
    """An APT run of ``model`` (a config of any family) on synthetic latents of shape
    ``latent`` (T, H, W in latent units), one process: the benchmark's workload through the
    trainer. ``deepspeed_config``: a JSON merged over both engines' DeepSpeed configs
    (``--deepspeed-config-{g,d}``)."""
    ds_json = None if deepspeed_config is None else str(deepspeed_config)
    t, h, w = latent
    return TrainConfig(
        recipe="benchmark-apt",
        stage="apt",
        model=model,
        layer_spec=layer_spec,
        zero_stage=zero_stage,
        zero_init=False,
        bf16=bf16,
        compile=compile,
        micro_batch_size=micro_batch,
        global_batch_size=micro_batch * accumulation,
        train_iters=10**9,  # never reached: the benchmark calls run_update
        optim=OptimConfig(lr=1e-6),
        ema_decay=0.99,
        data=DataConfig(frames=t, height=h, width=w, text_len=text_len, num_samples=4096),
        seed=seed,
        deepspeed_config_g=ds_json,
        deepspeed_config_d=ds_json,
        exit_signal_handler=False,
        log_interval=10**9,
    )


def trainer_apt_calls(
    cfg: TrainConfig, device: torch.device | None = None
) -> dict[str, Callable[[], object]]:
    """``{"trainer": ..., "plain": ...}``: one APT update each (see the module docstring).
    ``ValueError`` when the trainer's device (the backend's: CUDA under NCCL, else the CPU)
    is not ``device``."""
    from megatron_apt.benchmarking.workloads import apt_update_call
    from megatron_apt.engine.trainer import Trainer

    trainer = Trainer(cfg)
    if device is not None and trainer.device.type != torch.device(device).type:
        raise ValueError(
            f"the trainer runs on {trainer.device} (its process-group backend's device), not "
            f"on {device}; MEGATRON_APT_BACKEND=gloo keeps it on the CPU"
        )
    batch, _ = trainer.stream.next()  # the plain update's fixed batch: the trainer's shapes
    batch = trainer._text_convention(batch)  # as the trainer feeds it (Wan: no text mask)
    dtype = trainer.dtype
    batch = {k: v.to(trainer.device) for k, v in batch.items()}
    batch["latents"] = batch["latents"].to(dtype)
    heads = DiscriminatorConfig(
        head_layers=parse_head_layers(cfg.d_head_layers, cfg.model.num_layers)
    )
    plain = apt_update_call(
        cfg.model,
        get_spec(cfg.layer_spec),
        dtype,
        trainer.device,
        batch,
        compile=cfg.compile,
        apt_cfg=trainer.apt,
        disc_cfg=heads,
        accumulation=trainer.plan.accumulation,
        lr=cfg.optim.lr,
        eps=cfg.optim.eps,
    )
    return {"trainer": trainer.run_update, "plain": plain}


def profile_calls(fns: dict[str, Callable[[], object]], calls: int) -> dict[str, dict]:
    """Where the time of each function goes: cProfile over ``calls`` calls (after the
    benchmark's warm-up). Per contender: the total, and the :data:`PROFILE_TOP` functions by
    cumulative time with their own (``tottime``) and cumulative seconds per call."""
    import cProfile
    import pstats

    out = {}
    for name, fn in fns.items():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        stats = pstats.Stats(prof)
        rows = []
        for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
            where = f"{_short(file)}:{line}({func})"
            rows.append(
                {
                    "function": where,
                    "calls_per_update": ncalls / calls,
                    "own_s": tottime / calls,
                    "cumulative_s": cumtime / calls,
                }
            )
        rows.sort(key=lambda r: r["cumulative_s"], reverse=True)
        out[name] = {"total_s": stats.total_tt / calls, "top": rows[:PROFILE_TOP]}
    return out


def _short(path: str) -> str:
    """A source path from its package on (``deepspeed/runtime/engine.py``)."""
    for anchor in ("site-packages/", "megatron_apt/", "tools/"):
        if anchor in path:
            return (anchor if anchor != "site-packages/" else "") + path.split(anchor, 1)[1]
    return path
