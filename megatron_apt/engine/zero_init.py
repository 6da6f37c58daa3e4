"""ZeRO-3 partitioned construction: the trained networks are built under DeepSpeed's
``zero.Init``, so that no rank ever holds a whole fp32 copy of G and D (~64 GB for the 8B at
TP 1; issue 14, item 12).

DeepSpeed 0.19.8 (``runtime/zero/partition_parameters.py``): ``zero.Init`` wraps every
``nn.Module.__init__``; when a module's ``__init__`` returns, its own parameters are
broadcast from rank 0 of the partitioning group and split over it (``_zero_init_param``:
``dist.broadcast(param.data, ...)`` then ``param.partition()``; ``param.data`` becomes an empty
placeholder, ``param.ds_tensor`` this rank's slice, ``param.ds_shape`` the real shape). Tensor
factories are patched to the config's dtype (bf16 under ``--bf16``): random inits then draw
in bf16, other values than a whole fp32 build rounded to bf16 (fp32 runs are identical).
``deepspeed.initialize`` then finds them partitioned (``ds_id``) and does not partition
again. The partitioning group must be the one the engine's ZeRO-3 optimizer uses:
:meth:`DeepSpeedMPU.get_data_parallel_group`, DP x CP.

What touches whole weights after a submodule was built goes through
:func:`megatron_apt.models.build_options.gathered` (the models may not import DeepSpeed),
which in this context is ``zero.GatheredParameters(params, modifier_rank=0)``: the DiT init
of the replicated layers, loading ``--init-*`` model files block by block. Reads use
``modifier_rank=None`` (copying the student into the consistency teacher and target, which
are not engines and stay whole). The meta-device skeleton that checks a model file's shapes
is built with the partitioning suspended (:func:`megatron_apt.models.build_options.
unpartitioned`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_apt.config.training import BatchPlan, TrainConfig
from megatron_apt.engine.ds_config import build_deepspeed_config
from megatron_apt.engine.engines import prepare_deepspeed
from megatron_apt.models.build_options import is_partitioned, model_build
from megatron_apt.parallel.state import ParallelState

__all__ = ["copy_weights", "module_to", "partitioned_build", "uses_zero_init"]


def uses_zero_init(cfg: TrainConfig) -> bool:
    return cfg.zero_stage == 3 and cfg.zero_init


def _gather(params: list[torch.nn.Parameter], modify: bool):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


@contextlib.contextmanager
def _suspend() -> Iterator[None]:
    """zero.Init's module and tensor-factory patches off, then on again: what
    ``deepspeed.initialize`` does to build inside the context
    (partition_parameters.py: shutdown_init_context / restore_init_context)."""
    from deepspeed.runtime.zero.partition_parameters import (
        restore_init_context,
        shutdown_init_context,
    )

    shutdown_init_context()
    try:
        yield
    finally:
        restore_init_context()


@contextlib.contextmanager
def partitioned_build(
    cfg: TrainConfig, plan: BatchPlan, ps: ParallelState, ds_json: str | None = None
) -> Iterator[None]:
    """Build the modules of one engine in this context: under ZeRO-3 (and ``--zero-init``,
    the default) inside ``deepspeed.zero.Init`` over the engine's partitioning group with the
    engine's DeepSpeed config (dtype, offload); otherwise as usual."""
    if not uses_zero_init(cfg):
        yield
        return
    prepare_deepspeed()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from megatron_apt.engine.mpu import DeepSpeedMPU

    # deepspeed.comm over our torch.distributed group, as deepspeed.initialize does it
    # (deepspeed/__init__.py, initialize: dist.init_distributed(dist_backend=
    # get_accelerator().communication_backend_name(), ...)); before it, zero.Init's config
    # parsing sees no group and checks the batch sizes against a world of one
    deepspeed.comm.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(), dist_init_required=False
    )

    config = build_deepspeed_config(cfg, plan, ds_json)
    with (
        deepspeed.zero.Init(
            data_parallel_group=ps.grad_group,
            config_dict_or_path=config,
            mpu=DeepSpeedMPU(ps),
        ),
        model_build(gather=_gather, suspend=_suspend),
    ):
        yield


def module_to(module: torch.nn.Module, device: torch.device, dtype=None) -> torch.nn.Module:
    """``module.to(device, dtype)``, except that ZeRO-3 partitioned parameters stay as
    DeepSpeed placed them (their placeholders must not be replaced); buffers still move."""
    if not any(is_partitioned(p) for p in module.parameters()):
        return module.to(device) if dtype is None else module.to(device, dtype)
    for mod in module.modules():
        for name, buf in mod._buffers.items():
            if buf is not None:
                mod._buffers[name] = buf.to(device)
    return module


@torch.no_grad()
def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """``dst.load_state_dict(src.state_dict())`` for a ``src`` whose parameters may be ZeRO-3
    partitioned: gathered one module at a time (peak: one block's weights), read only."""
    dst_params = dict(dst.named_parameters())
    if set(dst_params) != {n for n, _ in src.named_parameters()}:
        raise ValueError("copy_weights: the two modules have different parameters")
    for prefix, mod in src.named_modules():
        own = list(mod.named_parameters(recurse=False))
        if not own:
            continue
        params = [p for _, p in own]
        partitioned = any(is_partitioned(p) for p in params)
        with _gather(params, False) if partitioned else contextlib.nullcontext():
            for name, p in own:
                key = f"{prefix}.{name}" if prefix else name
                dst_params[key].copy_(p.data.to(dst_params[key].dtype))
    dst_buffers = dict(dst.named_buffers())
    for name, buf in src.named_buffers():
        dst_buffers[name].copy_(buf)
