"""Context parallelism (Ulysses): the joint sequence split over the context-parallel group.

Layout: every CP rank holds a contiguous ``1/cp`` of the visual tokens and of the (padded)
text tokens, ``[x_r; c_r]`` (under sequence parallelism each TP rank holds ``1/tp`` of that).
Everything outside the attention is token-wise and runs on the local tokens. The attention
needs all tokens: an all-to-all over the CP group trades the sequence split for a head split
(``[S/cp, b, H, d] -> [S, b, H/cp, d]``), every rank attends over the whole sequence with
``H/cp`` heads, and the inverse all-to-all restores the sequence split (DeepSpeed-Ulysses,
Jacobs et al. 2023). The gathered sequence is ordered ``[x_0; c_0; x_1; c_1; ...]``; attention
does not care about the order of keys as long as the key mask follows it
(:func:`cp_key_mask`), and RoPE is applied before the all-to-all with each rank's own
positions.

Gradients: activations get exact gradients through the all-to-alls and the final all-gather
(whose backward keeps this rank's slice). Parameters used on the local tokens only get this
rank's share of the gradient, a partial sum over CP; the data-parallel reduction runs over the
``dp x cp`` group with the loss multiplied by ``cp`` (megatron's scheme), which sums the
shares. Modules that run on gathered (replicated) tokens after the model, such as the
discriminator's heads, would be counted ``cp`` times: :func:`replicated_over_cp` scales their
parameter gradients by ``1/cp`` and leaves the gradient of their input unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import mappings

from megatron_apt.parallel.state import ParallelState


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    inputs = [t.contiguous() for t in x.chunk(world, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(world)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def sequence_to_heads(x: torch.Tensor, ps: ParallelState, head_dim: int) -> torch.Tensor:
    """``[S/cp, ..., H, ...]`` -> ``[S, ..., H/cp, ...]`` (dim 0 = sequence, ``head_dim`` =
    heads): the sequence gathered over the CP group, the heads scattered."""
    if ps.cp_size == 1:
        return x
    if x.shape[head_dim] % ps.cp_size:
        raise ValueError(
            f"{x.shape[head_dim]} attention heads per tensor-parallel rank are not divisible by "
            f"context_parallel_size={ps.cp_size} (Ulysses splits heads over the CP group)"
        )
    return _AllToAll.apply(x, ps.cp_group, head_dim, 0)


def heads_to_sequence(x: torch.Tensor, ps: ParallelState, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`sequence_to_heads`: ``[S, ..., H/cp, ...]`` -> ``[S/cp, ..., H, ...]``."""
    if ps.cp_size == 1:
        return x
    return _AllToAll.apply(x, ps.cp_group, 0, head_dim)


def split_for_cp(x: torch.Tensor, ps: ParallelState, dim: int) -> torch.Tensor:
    """This CP rank's contiguous chunk of a replicated tensor along ``dim`` (backward: the
    gradient of the other chunks is zero here; the parameters upstream get partial sums)."""
    if ps.cp_size == 1:
        return x
    if x.shape[dim] % ps.cp_size:
        raise ValueError(
            f"length {x.shape[dim]} along dim {dim} is not divisible by "
            f"context_parallel_size={ps.cp_size}"
        )
    return x.chunk(ps.cp_size, dim=dim)[ps.cp_rank]


def gather_from_cp(x_sbh: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """``[s/cp, ...]`` -> ``[s, ...]`` on every CP rank; backward keeps this rank's slice of the
    (replicated) gradient."""
    if ps.cp_size == 1:
        return x_sbh
    return mappings.gather_from_sequence_parallel_region(
        x_sbh.contiguous(), tensor_parallel_output_grad=False, group=ps.cp_group
    )


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; gradient multiplied by ``scale`` in backward."""
    return _ScaleGrad.apply(x, scale) if scale != 1.0 else x


def replicated_over_cp(fn, ps: ParallelState, *inputs: torch.Tensor) -> torch.Tensor:
    """``fn(*inputs)`` for a module that runs identically on every CP rank (on gathered
    tokens): its parameters' gradients come out ``1/cp`` of the full one, so that the sum over
    CP in the data-parallel reduction counts them once; the inputs' gradients are unchanged."""
    if ps.cp_size == 1:
        return fn(*inputs)
    inputs = tuple(scale_grad(t, float(ps.cp_size)) for t in inputs)
    return scale_grad(fn(*inputs), 1.0 / ps.cp_size)


def cp_key_mask(vis_len: int, text_mask: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Key mask ``[B, N + L]`` in the order of the gathered sequence ``[x_0; c_0; x_1; ...]``
    (visual tokens always valid; ``text_mask [B, L]`` with ``L`` divisible by ``cp``), built
    where ``text_mask`` lives (the host, for the model's host-mask contract)."""
    b = text_mask.shape[0]
    vis = text_mask.new_ones(b, vis_len // ps.cp_size, dtype=torch.bool)
    parts = []
    for chunk in text_mask.bool().chunk(ps.cp_size, dim=1):
        parts += [vis, chunk]
    return torch.cat(parts, dim=1)
