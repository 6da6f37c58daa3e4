"""EMA of a DeepSpeed engine's fp32 master weights, correct under every ZeRO stage and precision.

The shadow averages the optimizer's fp32 masters (:mod:`megatron_apt.engine.master_weights`),
never the module's bf16 copies, and is laid out like them: the full (TP-local) parameters
without ZeRO, this rank's flat fragment under ZeRO 1/2, this rank's partition under ZeRO-3. So
the EMA costs 4 bytes per parameter divided by DP under ZeRO 1-3, an update needs no
communication, and :meth:`EngineEMA.full_state_dict` assembles the full weights (over DP) and
gathers the TP shards when exporting.

The consistency target is such an EMA of the student (:class:`TargetEMA`), written into the
target network after each update.
"""

from __future__ import annotations

import json

import torch

from megatron_apt.checkpoint.training_ckpt import EMA_FRAGMENTS
from megatron_apt.engine.master_weights import MasterWeights
from megatron_apt.parallel.state import ParallelState
from megatron_apt.parallel.tensor_parallel import gather_tensor_over_tp, tp_partition_dim


class EngineEMA:
    def __init__(self, engine, ps: ParallelState, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay} must lie in [0, 1)")
        self.decay, self.ps = decay, ps
        self.master = MasterWeights(engine, ps)
        self.params = self.master.params
        self.shadow = self.master.local_state()

    @torch.no_grad()
    def update(self) -> None:
        """``shadow <- decay * shadow + (1 - decay) * master`` after a step: the same two
        elementwise ops per tensor as a loop of ``mul_``/``add_`` (bit-identical), in two
        ``torch._foreach_*`` calls instead of two Python-dispatched ops per parameter."""
        names = list(self.shadow)
        shadows = [self.shadow[n] for n in names]
        torch._foreach_mul_(shadows, self.decay)
        torch._foreach_add_(shadows, [self.master.local(n) for n in names], alpha=1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.shadow.items()}

    def file_metadata(self) -> dict[str, str]:
        """What an offline reader needs to reassemble this rank's shadow file: under ZeRO 1/2
        the start of each fragment in its flattened parameter
        (``megatron_apt.checkpoint.training_ckpt``)."""
        starts = {
            n: self.master.params[n]._hp_mapping.lp_fragment_address.start
            for n in self.shadow
            if self.master.layout[n] == "fragment"
        }
        return {EMA_FRAGMENTS: json.dumps(starts)} if starts else {}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "") -> None:
        """This rank's shadow. A tensor of the parameter's full shape where this rank holds a
        share (an EMA file of an earlier version, which kept full shadows under ZeRO 1/2) is
        cut to the share."""
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state {source} lacks {missing[:8]}")
        for n, t in self.shadow.items():
            v, full = state[n], self.master.full_shape(n)
            if v.shape != t.shape and tuple(v.shape) == full:
                v = self.master.localize(n, v)
            if v.shape != t.shape:
                raise ValueError(
                    f"EMA state {source}: {n} has shape {tuple(v.shape)}, "
                    f"expected {tuple(t.shape)} (this rank's share of {full})"
                )
            t.copy_(v)

    def tp_local_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's TP shard of the full EMA weights (collective over DP)."""
        return self.master.assemble(self.shadow)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """TP=1 full EMA weights (collective over DP and TP; every rank gets them)."""
        return _gather_tp(self.tp_local_state_dict(), self.params, self.ps)


class TargetEMA(EngineEMA):
    """The consistency target: an fp32 EMA of the student's masters (decay ``mu``), copied into
    ``module`` (the network that computes the target, in the run's dtype) after each update.

    Without ZeRO in fp32 the shadow *is* the module's parameters (no second copy, and the same
    arithmetic as lerping the module in place)."""

    def __init__(self, engine, ps: ParallelState, decay: float, module: torch.nn.Module):
        super().__init__(engine, ps, decay)
        self.module = module
        own = dict(module.named_parameters())
        if set(own) != set(self.params):
            raise ValueError("the target network's parameters differ from the student's")
        self.aliased = all(
            self.master.layout[n] == "full" and own[n].dtype == torch.float32 for n in self.params
        )
        if self.aliased:
            for n, p in own.items():
                p.data.copy_(self.shadow[n])
                self.shadow[n] = p.data
        else:
            self.write()

    @torch.no_grad()
    def write(self) -> None:
        """Copy the shadow into the target network (collective over DP unless aliased)."""
        if self.aliased:
            return
        full = self.master.assemble(self.shadow)
        for n, p in self.module.named_parameters():
            p.copy_(full[n])

    def update(self) -> None:
        super().update()
        self.write()

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "") -> None:
        super().load_state_dict(state, source)
        self.write()

    @torch.no_grad()
    def reset_from_module(self) -> None:
        """Shadow from the target network's weights (a checkpoint that stored only them)."""
        own = dict(self.module.named_parameters())
        for n, t in self.shadow.items():
            t.copy_(self.master.localize(n, own[n]))


def _gather_tp(tensors: dict, params: dict, ps: ParallelState) -> dict[str, torch.Tensor]:
    out = {}
    for n, t in tensors.items():
        dim = tp_partition_dim(params[n])
        out[n] = gather_tensor_over_tp(t, dim, ps) if dim is not None else t
    return out
