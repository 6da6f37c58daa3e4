"""EMA of a DeepSpeed engine's weights, correct under every ZeRO stage.

ZeRO 0-2 keep full (TP-local) parameters on every rank: the shadow is a full fp32 copy. ZeRO-3
keeps only this rank's flat partition of each parameter (``param.ds_tensor``): the shadow
averages exactly that partition, so the EMA costs 4 bytes per parameter divided by DP, and
``full_state_dict`` all-gathers the partitions (over DP) and the TP shards when exporting.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_apt.parallel.state import ParallelState
from megatron_apt.parallel.tensor_parallel import gather_tensor_over_tp, tp_partition_dim


class EngineEMA:
    def __init__(self, engine, ps: ParallelState, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay} must lie in [0, 1)")
        self.decay, self.ps = decay, ps
        self.zero3 = engine.zero_optimization_stage() == 3
        self.params = dict(engine.module.named_parameters())
        self.shadow = {n: self._local(p).detach().float().clone() for n, p in self.params.items()}

    def _local(self, p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if self.zero3 else p.data

    @torch.no_grad()
    def update(self) -> None:
        """``shadow <- decay * shadow + (1 - decay) * weights`` after a generator step."""
        for n, p in self.params.items():
            self.shadow[n].mul_(self.decay).add_(self._local(p).float(), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "") -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state {source} lacks {missing[:8]}")
        for n, t in self.shadow.items():
            if state[n].shape != t.shape:
                raise ValueError(
                    f"EMA state {source}: {n} has shape {tuple(state[n].shape)}, "
                    f"expected {tuple(t.shape)}"
                )
            t.copy_(state[n])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """TP=1 full EMA weights (collective over DP and TP; every rank gets them)."""
        out = {}
        for n, p in self.params.items():
            t = self.shadow[n]
            if self.zero3:
                t = _gather_partition(t, p, self.ps)
            dim = tp_partition_dim(p)
            out[n] = gather_tensor_over_tp(t, dim, self.ps) if dim is not None else t.clone()
        return out


def _gather_partition(part: torch.Tensor, p: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    if ps.dp_cp_size == 1:
        flat = part
    else:  # ZeRO-3 partitions over DeepSpeed's data-parallel group: DP x CP
        parts = [torch.empty_like(part) for _ in range(ps.dp_cp_size)]
        dist.all_gather(parts, part.contiguous(), group=ps.grad_group)
        flat = torch.cat(parts)
    return flat[: p.ds_numel].view(p.ds_shape)


def gathered_module_state(engine, ps: ParallelState) -> dict[str, torch.Tensor]:
    """TP=1 full fp32 weights of an engine's module (collective; ZeRO-3 gathers first)."""
    module = engine.module
    params = list(module.parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            local = {n: p.detach().float().clone() for n, p in module.named_parameters()}
    else:
        local = {n: p.detach().float().clone() for n, p in module.named_parameters()}
    named = dict(module.named_parameters())
    out = {}
    for n, t in local.items():
        dim = tp_partition_dim(named[n])
        out[n] = gather_tensor_over_tp(t, dim, ps) if dim is not None else t
    return out
