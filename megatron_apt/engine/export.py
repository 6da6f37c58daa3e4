"""End-of-run export: consolidated TP=1 fp32 files, streamed to rank 0's host one tensor at a time.

The run's last act writes ``generator.safetensors``, ``generator_ema.safetensors`` and
``discriminator.safetensors`` (or the stage's model and its EMA) as full TP=1 fp32 weights.
Gathering a whole model on every rank first would need the full fp32 generator and its EMA on
each GPU at once, 2 x 32 GB for the paper's 8B model: an out-of-memory error after the final
checkpoint. Here each parameter is assembled by itself and only where it is written:

1. over the data-parallel (x context-parallel) group, to the group's first rank: ZeRO-1/2
   fragments by a ``dist.reduce`` of the zero-padded fragments (each element non-zero on one
   rank, the sum exact; DeepSpeed's ``get_full_hp_param`` all-reduces the same way, deepspeed
   0.19.8 ``utils/tensor_fragment.py`` line 87), ZeRO-3 partitions by a ``dist.gather``
   (``stage3.py`` ``_fp32_state_allgather`` all-gathers them), a replicated tensor as it is;
2. over the tensor-parallel group of those first ranks, to TP rank 0 (``dist.gather``, then
   concatenated along the parameter's partition dimension);
3. on global rank 0, copied to the host and appended to the file
   (:class:`megatron_apt.checkpoint.safetensors_stream.SafetensorsStream`).

A rank holds at most one parameter's assembled tensor at a time (rank 0 one full TP=1 tensor
on the device and one on the host), so the export's peak is set by the largest tensor, not by
the model (``tests/distributed/test_export_memory.py`` measures it). Every rank walks the
parameters in the same order: the function is collective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_apt.checkpoint.io import model_file_metadata
from megatron_apt.checkpoint.safetensors_stream import SafetensorsStream
from megatron_apt.engine.master_weights import MasterWeights
from megatron_apt.parallel.state import ParallelState, comm_device
from megatron_apt.parallel.tensor_parallel import tp_partition_dim

Shares = Callable[[str], torch.Tensor | None]  # parameter name -> this rank's share (or None)


def full_specs(
    master: MasterWeights, ps: ParallelState, rename: Callable[[str], str] = str
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{file key: (float32, TP=1 shape)}`` of every parameter, in the module's order."""
    out = {}
    for n in master.params:
        shape = list(master.full_shape(n))
        dim = tp_partition_dim(master.params[n])
        if dim is not None:
            shape[dim] *= ps.tp_size
        out[rename(n)] = (torch.float32, tuple(shape))
    return out


def stream_full(
    master: MasterWeights, shares: Shares, ps: ParallelState
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """``(name, tensor)`` per parameter: the full TP=1 fp32 tensor on global rank 0 (on the
    host), None on the other ranks. Collective: every rank must exhaust the iterator."""
    for n in master.params:
        local = master.gather_to_first(n, shares(n))  # TP-local, on the first DP rank only
        full = _over_tp(master.params[n], local, ps) if local is not None else None
        yield n, (full.cpu() if full is not None and dist.get_rank() == 0 else None)


def _root(group) -> int:
    """The global rank of ``group``'s first member."""
    return dist.get_global_rank(group, 0) if group is not None else 0


def _over_tp(param, local: torch.Tensor, ps: ParallelState) -> torch.Tensor | None:
    """The TP=1 tensor on TP rank 0 (of the DP roots' TP group); None on the other TP ranks."""
    dim = tp_partition_dim(param)
    if ps.tp_size == 1 or dim is None:
        return local if ps.tp_rank == 0 else None
    local = local.to(comm_device(ps.tp_group)).contiguous()
    first = ps.tp_rank == 0
    parts = [torch.empty_like(local) for _ in range(ps.tp_size)] if first else None
    dist.gather(local, parts, dst=_root(ps.tp_group), group=ps.tp_group)
    return torch.cat(parts, dim=dim) if first else None


def export_file(
    path: Path,
    master: MasterWeights,
    shares: Shares,
    ps: ParallelState,
    metadata: dict[str, str] | None = None,
    rename: Callable[[str], str] = str,
) -> None:
    """Write the full weights given by ``shares`` to ``path`` on rank 0 (collective)."""
    tensors = stream_full(master, shares, ps)
    if dist.get_rank() != 0:
        for _ in tensors:  # the other ranks take part in each parameter's gathers
            pass
        return
    with SafetensorsStream(path, full_specs(master, ps, rename), metadata) as out:
        for name, tensor in tensors:
            out.write(rename(name), tensor)


def export_model_files(trainer, root: Path) -> None:
    """The trainer's end-of-run files (module docstring); collective, rank 0 writes."""
    cfg, ps = trainer.cfg, trainer.ps
    for name, eng in trainer.engines.items():
        master = MasterWeights(eng, ps)
        if name == "discriminator":  # backbone + heads, for inspection and tests
            export_file(root / "discriminator.safetensors", master, master.local, ps)
            continue
        role = cfg.stage if name == "model" else name
        model_cfg = (eng.module.model if name == "generator" else eng.module).cfg

        def rename(n: str) -> str:
            return n.removeprefix("model.")

        meta = model_file_metadata(model_cfg, role=role)
        export_file(root / f"{role}.safetensors", master, master.local, ps, meta, rename)
        extra = {"ema_decay": cfg.ema_decay, "step": trainer.step}
        meta = model_file_metadata(model_cfg, role=role, extra=extra)
        shadow = trainer.emas[name].shadow
        export_file(root / f"{role}_ema.safetensors", master, shadow.get, ps, meta, rename)
    dist.barrier()
