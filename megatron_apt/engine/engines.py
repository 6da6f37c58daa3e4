"""DeepSpeed engine creation: one per trained network, RMSprop, ZeRO over data parallel only."""

from __future__ import annotations

import os

import torch

from megatron_apt.config.training import BatchPlan, TrainConfig
from megatron_apt.engine.ds_config import build_deepspeed_config
from megatron_apt.engine.mpu import DeepSpeedMPU
from megatron_apt.engine.safe_checkpoint import install as install_safe_checkpoint
from megatron_apt.parallel.state import ParallelState


def prepare_deepspeed() -> None:
    """CPU runs: pick DeepSpeed's CPU accelerator quietly and skip the JIT-compiled
    shared-memory comm op (30-75 s of compile, not needed with gloo)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def create_engine(
    module: torch.nn.Module,
    cfg: TrainConfig,
    plan: BatchPlan,
    ps: ParallelState,
    lr: float,
    ds_json: str | None = None,
):
    """A DeepSpeed engine for ``module`` with RMSprop(alpha=0.9, no weight decay) over its
    trainable parameters, ZeRO sharding over ``ps``'s data-parallel group, weights-only
    checkpoint loading."""
    prepare_deepspeed()
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.RMSprop(
        params,
        lr=lr,
        alpha=cfg.optim.rmsprop_alpha,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    config = build_deepspeed_config(cfg, plan, ds_json)
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=opt, config=config, mpu=DeepSpeedMPU(ps), dist_init_required=False
    )
    install_safe_checkpoint(engine)
    return engine
