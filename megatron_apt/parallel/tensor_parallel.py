"""Tensor/sequence-parallel helpers on top of megatron-core's autograd mappings.

Layout conventions: activations are ``[s, b, h]`` (megatron's). In a sequence-parallel region
each TP rank holds ``s / tp`` tokens with the full hidden size; in a tensor-parallel region it
holds all ``s`` tokens with ``h / tp`` channels (whole heads).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import mappings

from megatron_apt.parallel.state import ParallelState


def reduce_grad_over_tp(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient over the TP group in backward.

    For a tensor that is identical on every TP rank but whose consumers on each rank see only
    part of the work (sequence-split tokens, or a subset of heads), so that each rank's gradient
    is a partial sum. Applied to parameters (norm weights, biases) or to small activations (the
    adaLN modulation vector), it makes the gradient complete before any data-parallel reduction
    (DeepSpeed ignores megatron's ``sequence_parallel`` parameter tag).
    """
    if ps.tp_size == 1:
        return x
    return mappings.copy_to_tensor_model_parallel_region(x, group=ps.tp_group)


def scatter_to_sequence_parallel(x_sbh: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """``[s, b, h]`` replicated -> ``[s/tp, b, h]`` (backward: all-gather)."""
    if not ps.sequence_parallel:
        return x_sbh
    if x_sbh.shape[0] % ps.tp_size:
        raise ValueError(
            f"sequence length {x_sbh.shape[0]} is not divisible by the tensor-parallel size "
            f"{ps.tp_size} (sequence parallelism splits tokens evenly)"
        )
    return mappings.scatter_to_sequence_parallel_region(x_sbh, group=ps.tp_group)


def gather_from_sequence_parallel(x_sbh: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """``[s/tp, b, h]`` -> ``[s, b, h]`` replicated; its consumer is replicated computation,
    so the backward splits the (identical) gradient instead of reduce-scattering it."""
    if not ps.sequence_parallel:
        return x_sbh
    return mappings.gather_from_sequence_parallel_region(
        x_sbh, tensor_parallel_output_grad=False, group=ps.tp_group
    )


# --------------------------------------------------------------------------------------
# Full <-> TP-sharded state dicts (megatron's `tensor_model_parallel`/`partition_dim` tags)
# --------------------------------------------------------------------------------------


def tp_partition_dim(param: torch.Tensor) -> int | None:
    """The dimension a parameter is split along over TP, or None when it is replicated."""
    if getattr(param, "tensor_model_parallel", False):
        return int(getattr(param, "partition_dim", 0))
    return None


def shard_state_dict(
    full: dict[str, torch.Tensor], model: torch.nn.Module, ps: ParallelState
) -> dict[str, torch.Tensor]:
    """Cut a TP=1 (full) state dict into this rank's shard for ``model`` (built for ``ps``)."""
    out = {}
    params = dict(model.named_parameters())
    for name, local in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        if name not in full:
            raise KeyError(f"state dict has no key {name!r}")
        value = full[name]
        dim = tp_partition_dim(params[name]) if name in params else None
        if dim is not None:
            if value.shape[dim] != local.shape[dim] * ps.tp_size:
                raise ValueError(
                    f"{name}: full shape {tuple(value.shape)} does not split into "
                    f"{ps.tp_size} x {tuple(local.shape)} along dim {dim}"
                )
            value = value.chunk(ps.tp_size, dim=dim)[ps.tp_rank]
        if value.shape != local.shape:
            raise ValueError(
                f"{name}: shape {tuple(value.shape)} does not match the model's "
                f"{tuple(local.shape)}"
            )
        out[name] = value.clone()
    return out


def gather_tensor_over_tp(local: torch.Tensor, dim: int, ps: ParallelState) -> torch.Tensor:
    if ps.tp_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(ps.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=ps.tp_group)
    return torch.cat(parts, dim=dim)


def gather_state_dict(
    model: torch.nn.Module, ps: ParallelState, grads: bool = False
) -> dict[str, torch.Tensor]:
    """The TP=1 (full) state dict of a TP-sharded ``model`` (collective over the TP group).

    With ``grads=True`` it gathers the parameters' ``.grad`` instead (zeros where None).
    """
    out = {}
    for name, p in model.named_parameters():
        t = p.detach() if not grads else (p.grad if p.grad is not None else torch.zeros_like(p))
        dim = tp_partition_dim(p)
        out[name] = gather_tensor_over_tp(t, dim, ps) if dim is not None else t.clone()
    if not grads:
        persistent = model.state_dict().keys()
        for name, b in model.named_buffers():
            if name in persistent:
                out[name] = b.detach().clone()
    return out
