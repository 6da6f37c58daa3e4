"""DeepSpeed engine creation: one per trained network, the recipe's optimizer, ZeRO over DP."""

from __future__ import annotations

import os

import torch

from megatron_apt.config.training import BatchPlan, OptimConfig, TrainConfig, lr_factor
from megatron_apt.engine.ds_config import build_deepspeed_config
from megatron_apt.engine.mpu import DeepSpeedMPU
from megatron_apt.engine.rmsprop import ChunkedRMSprop
from megatron_apt.engine.safe_checkpoint import install as install_safe_checkpoint
from megatron_apt.parallel.state import ParallelState


def prepare_deepspeed() -> None:
    """CPU runs: pick DeepSpeed's CPU accelerator quietly and skip the JIT-compiled
    shared-memory comm op (30-75 s of compile, not needed with gloo)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_optimizer(params: list, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The client optimizer DeepSpeed wraps (ZeRO partitions its states): RMSprop (the
    paper's), Adam (bias-corrected, no weight decay; ``adam_betas=(0, 0.9)`` is the paper's
    "equivalent" of RMSprop(alpha 0.9), see :class:`OptimConfig`) or AdamW."""
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(optim.adam_betas), eps=optim.eps)
    if optim.name == "adamw":
        return torch.optim.AdamW(
            params,
            lr=lr,
            betas=tuple(optim.adam_betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
    if optim.name == "rmsprop":
        # torch's RMSprop, stepped slice by slice on CPU (bit-identical, no per-step temporary
        # of the flat ZeRO partition's size): megatron_apt/engine/rmsprop.py
        return ChunkedRMSprop(
            params, lr=lr, alpha=optim.rmsprop_alpha, eps=optim.eps, weight_decay=optim.weight_decay
        )
    raise ValueError(f"optimizer={optim.name!r}: choose 'rmsprop', 'adam' or 'adamw'")


def idle_zero_notice(zero_stage: int, dp_cp_size: int, bf16: bool = False) -> str | None:
    """A one-line notice when ZeRO-1/2 has nothing to shard: over a data-parallel (x context-
    parallel) group of one rank, DeepSpeed still copies every gradient into its reduction bucket
    during the backward and flattens the partition at each step (deepspeed 0.19.8
    ``runtime/zero/stage_1_and_2.py``), work ZeRO-0 does not do; docs/performance.md measures it.
    Under ``bf16`` ZeRO-1 is DeepSpeed's ``BF16_Optimizer`` (fp32 gradient accumulation,
    :func:`megatron_apt.engine.ds_config.grad_accum_dtype`), which has no reduction buckets,
    and ZeRO-0 cannot accumulate in fp32: no notice at ZeRO-1, and ZeRO-2's points to ZeRO-1.
    ZeRO-3 is left alone: its partitioned build (``zero.Init``) is what a user may want even on
    one rank, to build a model larger than one device's memory with CPU offload."""
    if zero_stage not in (1, 2) or dp_cp_size != 1 or (bf16 and zero_stage == 1):
        return None
    instead = (
        "--zero-stage 1 (under --bf16 DeepSpeed's BF16_Optimizer: one flat fp32 gradient "
        "buffer, no buckets) trains the same model"
        if bf16
        else "--zero-stage 0 trains the same model without those copies"
    )
    return (
        f"note: ZeRO-{zero_stage} over one data-parallel rank shards nothing but still copies "
        f"gradients into buckets and flat partitions every update; {instead} "
        "(docs/performance.md)"
    )


def create_engine(
    module: torch.nn.Module,
    cfg: TrainConfig,
    plan: BatchPlan,
    ps: ParallelState,
    lr: float,
    ds_json: str | None = None,
):
    """A DeepSpeed engine for ``module`` with the recipe's optimizer (the paper's RMSprop,
    alpha 0.9, no weight decay; Adam; or AdamW for the pre-stages) over its trainable parameters,
    ZeRO sharding over ``ps``'s data-parallel group, weights-only checkpoint loading."""
    prepare_deepspeed()
    import deepspeed

    opt = build_optimizer([p for p in module.parameters() if p.requires_grad], cfg.optim, lr)
    config = build_deepspeed_config(cfg, plan, ds_json)
    # DeepSpeed steps the scheduler at every optimizer step and checkpoints its state.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(cfg.optim, step, cfg.train_iters)
    )
    engine, *_ = deepspeed.initialize(
        model=module,
        optimizer=opt,
        lr_scheduler=sched,
        config=config,
        mpu=DeepSpeedMPU(ps),
        dist_init_required=False,
    )
    install_safe_checkpoint(engine)
    if engine.optimizer is not opt and not hasattr(engine.optimizer, "_global_grad_norm"):
        # BF16_Optimizer (ZeRO-1 under bf16) creates _global_grad_norm in its first step only
        # (deepspeed 0.19.8 runtime/bf16_optimizer.py line 400); every other wrapper sets it in
        # __init__. Without it the trainer (grad_norm.deepspeed_has_norm) would take it for a
        # bare client optimizer on the first update and compute the norm from param.grad, which
        # there holds the last micro-batch's bf16 gradient only (the sum is in its fp32 buffer).
        engine.optimizer._global_grad_norm = None
    if cfg.zero_stage == 0 and not cfg.bf16 and ps.dp_cp_size == 1:
        # One rank per gradient: DeepSpeed's ZeRO-0 all-reduce would flatten every gradient,
        # all-reduce it over a group of one and copy it back (deepspeed 0.19.8
        # runtime/engine.py allreduce_gradients -> buffered_allreduce_fallback), two passes
        # over the gradients for nothing; DeepSpeed skips it the same way without a backend
        # (engine.py, `if self.dist_backend is None: self.enable_backward_allreduce = False`).
        engine.enable_backward_allreduce = False
    return engine
