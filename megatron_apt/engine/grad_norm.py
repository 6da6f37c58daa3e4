"""The 2-norm of the full gradient of an optimizer step (over TP shards and data parallel).

What DeepSpeed 0.19.8 provides (no gradient clipping in the recipes, so the norm is only read):

* ZeRO-1/2: ``DeepSpeedZeroOptimizer.step`` computes it before stepping whenever
  ``zero_optimization.compute_grad_norm`` is on (the default) and stores it in
  ``_global_grad_norm`` (``runtime/zero/stage_1_and_2.py`` ``step``, ``scaled_global_norm`` ->
  ``get_grad_norm_direct``): each rank squares its partition of the DP-averaged gradient,
  counting tensor-parallel parameters on every TP rank and replicated ones on TP rank 0 only,
  and sums over the data-parallel group (ours: DP x CP) and the model-parallel (TP) group.
* ZeRO-3: the same per partition in ``stage3.py`` ``step`` -> ``_get_norm_groups``.
* ZeRO-0 with BF16: the BF16/FP16 wrapper optimizers set ``_global_grad_norm`` too.
* The engine copies the optimizer's ``_global_grad_norm`` after every optimizer step
  (``runtime/engine.py`` ``_take_model_step``) and returns it from ``get_global_grad_norm()``.
* ZeRO-0 in fp32: the client optimizer runs bare (no wrapper, no ``_global_grad_norm``), so
  ``get_global_grad_norm()`` stays ``None``. Then :func:`grad_norm_of_grads` computes it from
  ``p.grad`` after the boundary backward, where DeepSpeed has already averaged the gradients
  over its data-parallel group.

Replicated parameters are counted once: their gradients are identical on the TP ranks
(the models route them through ``copy_to_tensor_model_parallel_region``), which DeepSpeed
assumes as well. ``tests/distributed/test_training_equivalence.py`` checks the logged norms
against a single-process plain-torch norm at ZeRO 0, 2 and 3, with DP 2, TP 2 and CP 2.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_apt.parallel.state import ParallelState


def deepspeed_has_norm(engine) -> bool:
    """Whether the engine's optimizer records the global norm (every ZeRO stage >= 1 and the
    mixed-precision wrappers; not a bare fp32 client optimizer at ZeRO-0)."""
    return hasattr(engine.optimizer, "_global_grad_norm")


@torch.no_grad()
def grad_norm_of_grads(module: torch.nn.Module, ps: ParallelState) -> torch.Tensor:
    """``||g||_2`` of the full gradient held in ``p.grad`` (full, DP-averaged gradients, as
    after DeepSpeed's ZeRO-0 all-reduce): TP-sharded parameters (megatron's
    ``tensor_model_parallel`` tag) summed over the TP group, replicated ones counted once.
    A float64 0-dim tensor on the parameters' device (no host sync). Collective over the TP
    group when TP > 1."""
    device = next(module.parameters()).device  # NCCL reduces device tensors only
    grads = [
        p.grad.detach()
        for p in module.parameters()
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or ps.tp_rank == 0)
    ]
    sq = torch.zeros((), dtype=torch.float64, device=device)
    if grads:  # per-tensor norms accumulated in fp32 in one call, their squares summed in fp64
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        sq += torch.stack(norms).double().square().sum()
    if ps.tp_size > 1:
        dist.all_reduce(sq, group=ps.tp_group)
    return sq.sqrt()


def engine_grad_norm(engine, device: torch.device) -> torch.Tensor:
    """The norm DeepSpeed recorded at the last optimizer step (NaN if none) as a float64 0-dim
    tensor on ``device``, without reading it on the host."""
    norm = engine.get_global_grad_norm()
    if isinstance(norm, torch.Tensor):
        return norm.detach().reshape(()).to(device, torch.float64)
    value = float("nan") if norm is None else float(norm)
    return torch.tensor(value, dtype=torch.float64, device=device)
