"""FLOPs of the training phases, for every model family (2 FLOPs per multiply-add).

A family's forward FLOPs are its own (``ModelFamily.forward_flops``: the MMDiT's in
``models/mmdit/config.py``, Wan2.1's in ``models/wan/config.py``); here the phases (forward,
backward, recompute, the teacher, G and D of APT) are counted from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

PAPER_HEAD_FRACTIONS = (16 / 36, 26 / 36, 36 / 36)  # as models/discriminator.py
PHASES = ("diffusion", "consistency", "apt_d", "apt_d_frozen", "apt_g")
"""Micro-batch phases of the training stages whose FLOPs :func:`phase_flops` counts."""


def visual_tokens(cfg: Any, frames: int, height: int, width: int) -> int:
    """Tokens of a latent ``[C, frames, height, width]`` after patchify (sizes in latents)."""
    pt, ph, pw = cfg.patch_size
    return (frames // pt) * (height // ph) * (width // pw)


def default_head_layers(num_layers: int) -> tuple[int, ...]:
    """Same as :func:`megatron_apt.models.discriminator.default_head_layers` (config/ must not
    import models/)."""
    return tuple(min(num_layers, max(1, round(f * num_layers))) for f in PAPER_HEAD_FRACTIONS)


def discriminator_config(cfg: Any, head_layers: Sequence[int] | None = None) -> Any:
    """The part of the model that D runs: its blocks up to the last head (the paper's heads
    by default); an MMDiT's without the output layer's text stream after it."""
    last = max(head_layers or default_head_layers(cfg.num_layers))
    if not hasattr(cfg, "context_pre_only_last"):  # another family (Wan): the first blocks
        return dataclasses.replace(cfg, num_layers=last)
    return dataclasses.replace(
        cfg,
        num_layers=last,
        context_pre_only_last=cfg.context_pre_only_last and last == cfg.num_layers,
    )


def phase_flops(
    cfg: Any,
    phase: str,
    n_visual: int,
    n_text: int,
    recompute: int = 0,
    head_layers: Sequence[int] | None = None,
    forward: Callable[..., float] | None = None,
    discriminator: Callable[[Any, Sequence[int] | None], Any] = discriminator_config,
) -> float:
    """FLOPs per SAMPLE of one micro-batch of a training phase (``recompute``: blocks whose
    forward runs again in backward; backward = 2 forwards):

    * ``diffusion``: forward + backward (3 + r) of the model;
    * ``consistency``: the student's (3 + r), the teacher with CFG (2 forwards), the target (1);
    * ``apt_d``: G samples (1 forward, no grad), D forward + backward on ``[real; fake;
      real + sigma eps]`` (3 x (3 + r_D)); ``apt_d_frozen``: the same without D's backward;
    * ``apt_g``: G forward + backward (3 + r), D forward and backward to its input (2 + r_D).

    ``r = recompute / num_layers`` (D: of its blocks). The discriminator's heads are left out
    (< 1 % at these sizes). ``forward`` (FLOPs of one forward): the family's
    (``ModelFamily.forward_flops``) when not given; ``discriminator`` (the config of the part
    of the model D runs): :func:`discriminator_config` unless the family gives its own
    (``models/wan/memory.py``)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if forward is None:
        from megatron_apt.models.families import family_of  # config/ imports models/ lazily

        forward = family_of(cfg).forward_flops
    r = recompute / cfg.num_layers
    f_g = forward(cfg, n_visual, n_text)
    if phase == "diffusion":
        return (3 + r) * f_g
    if phase == "consistency":
        return (3 + r) * f_g + 3 * f_g
    d_cfg = discriminator(cfg, head_layers)
    f_d = forward(d_cfg, n_visual, n_text)
    r_d = min(recompute, d_cfg.num_layers) / d_cfg.num_layers
    if phase == "apt_d":
        return f_g + 3 * (3 + r_d) * f_d
    if phase == "apt_d_frozen":
        return f_g + 3 * f_d
    return (3 + r) * f_g + (2 + r_d) * f_d
