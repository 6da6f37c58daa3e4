"""Random draws for a micro-batch that do not depend on how the global batch is split.

A training step draws its noise, timesteps and perturbations either from one generator or from
one generator per sample (``list[torch.Generator]``); the trainer seeds sample i's generator
from the seed and the sample's global position in the data stream, so micro 2 x accumulation 2
x DP 2 and micro 8 x DP 1 see exactly the same random numbers (and a resumed run too). All
draws happen on the CPU and are moved to the data's device: identical on every accelerator
(the copies are asynchronous on a GPU: :mod:`megatron_apt.utils.transfer`).
"""

from __future__ import annotations

import torch

from megatron_apt.utils.transfer import to_device

Rng = torch.Generator | list[torch.Generator] | None


def randn_like_batch(x: torch.Tensor, rng: Rng, dtype: torch.dtype | None = None):
    """``N(0, I)`` of ``x``'s shape drawn on the CPU: from one generator, or one generator per
    sample (row i from ``rng[i]``), so a sample's noise does not depend on how the global batch
    is split into micro-batches and ranks. On a GPU the copy to ``x``'s device goes through
    pinned memory without blocking the host (:func:`megatron_apt.utils.transfer.to_device`)."""
    if isinstance(rng, list):
        if len(rng) != x.shape[0]:
            raise ValueError(f"{len(rng)} generators for a batch of {x.shape[0]}")
        out = torch.stack([torch.randn(x.shape[1:], generator=g) for g in rng])
    else:
        out = torch.randn(x.shape, generator=rng, dtype=torch.float32)
    return to_device(out, x.device, dtype or x.dtype)


def rand_batch(batch: int, rng: Rng) -> torch.Tensor:
    """``U(0, 1)`` of shape ``[B]`` (per-sample generators as in :func:`randn_like_batch`)."""
    if isinstance(rng, list):
        return torch.cat([torch.rand(1, generator=g) for g in rng])
    return torch.rand(batch, generator=rng, dtype=torch.float32)


def sample_generators(seed: int, positions: list[int] | torch.Tensor, salt: int = 0):
    """One generator per sample, seeded from ``(seed, global position, salt)``."""
    gens = []
    for pos in positions.tolist() if isinstance(positions, torch.Tensor) else positions:
        g = torch.Generator()
        g.manual_seed((seed * 1_000_003 + int(pos) * 7_919 + salt * 104_729) % (2**63 - 1))
        gens.append(g)
    return gens
