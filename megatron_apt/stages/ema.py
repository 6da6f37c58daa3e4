"""Exponential moving averages of model weights (generator EMA, consistency target network)."""

from __future__ import annotations

import copy

import torch


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy of ``model`` to hold the average (fp32 buffers stay as they are)."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    ema.eval()
    return ema


@torch.no_grad()
def ema_update_(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` over matching parameters, in place.

    The two modules must have the same parameter names and shapes (``ValueError`` otherwise);
    the update is computed in fp32 and stored in the EMA's dtype.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay {decay} outside [0, 1]")
    src = dict(model.named_parameters())
    for name, p_ema in ema.named_parameters():
        p = src.get(name)
        if p is None or p.shape != p_ema.shape:
            raise ValueError(f"EMA parameter {name!r} has no match of shape {tuple(p_ema.shape)}")
        new = p_ema.float().mul_(decay).add_(p.detach().float(), alpha=1.0 - decay)
        p_ema.copy_(new.to(p_ema.dtype))
