"""Probes of what a trained velocity model conditions on (``tools/probe_conditioning.py``).

Two questions a sample metric cannot answer, asked of the model itself:

* **Which words of the caption does it use?** The flow-matching loss on training latents with
  each caption's own text against the same loss with one attribute word swapped (the demo's
  colours, shapes and motions: ``left <-> right``, ``up <-> down``, the next colour, the next
  shape), at a few fixed noise levels with the same noise. A model that ignores a word loses
  nothing when it is swapped (ratio ~1); the demo's MMDiT teacher's loss grows 2.6-8x when its
  motion word is swapped, Wan's demo teacher's by under 1 % (docs/wan.md).
* **Does it know which way time runs?** The relative change of ``v(P x)`` against ``P v(x)``
  for a frame permutation ``P`` (reversal, a swap of two frames, a roll), at random inputs. A
  model without temporal position information is exactly equivariant (0); a video model that
  tells "moving left" from "moving right" must not be equivariant to reversal, since a clip
  moving left played backwards moves right.

Family-neutral: any velocity model ``model(latents, t, text, text_mask)`` of the registry;
captions are encoded again with the given text encoder for every variant, the text mask
passed only to families that use one (:attr:`ModelFamily.uses_text_mask`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from megatron_apt.data.synthetic import COLORS, MOTIONS, SHAPES
from megatron_apt.stages.diffusion import add_noise, velocity_target

_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
assert set(_OPPOSITE) == set(MOTIONS)


def _next(options: Sequence[str]) -> dict[str, str]:
    return {a: options[(i + 1) % len(options)] for i, a in enumerate(options)}


# attribute -> word -> the word that replaces it (every word of the demo's vocabulary)
CAPTION_SWAPS: dict[str, dict[str, str]] = {
    "motion": _OPPOSITE,
    "colour": _next(list(COLORS)),
    "shape": _next(SHAPES),
}

FRAME_PERMUTATIONS: dict[str, Callable[[int], list[int]]] = {
    "reverse": lambda t: list(range(t - 1, -1, -1)),
    "swap first two": lambda t: [1, 0, *range(2, t)],
    "roll by one": lambda t: [*range(1, t), 0],
}


def swap_words(caption: str, table: dict[str, str]) -> str:
    """``caption`` with every word found in ``table`` replaced (case-insensitive words)."""
    return " ".join(table.get(w.lower(), w) for w in caption.split())


def caption_variants(captions: Sequence[str]) -> dict[str, list[str]]:
    """``{"true": captions, "motion": ..., "colour": ..., "shape": ...}``; raises when a swap
    changes fewer than half of the captions (captions not in the demo's vocabulary)."""
    out = {"true": list(captions)}
    for name, table in CAPTION_SWAPS.items():
        swapped = [swap_words(c, table) for c in captions]
        changed = sum(a != b for a, b in zip(swapped, captions, strict=True))
        if changed * 2 < len(captions):
            raise ValueError(
                f"swapping the {name} word changed {changed} of {len(captions)} captions: "
                f"these captions are not the demo's (e.g. {captions[0]!r})"
            )
        out[name] = swapped
    return out


@torch.no_grad()
def caption_swap_losses(
    model: torch.nn.Module,
    latents: torch.Tensor,
    captions: Sequence[str],
    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]],
    timesteps: Sequence[float] = (0.25, 0.5, 0.75, 0.95),
    batch_size: int = 64,
    seed: int = 0,
) -> dict[float, dict[str, float]]:
    """Mean flow-matching loss per timestep and caption variant (:func:`caption_variants`):
    ``{t: {"true": loss, "motion": loss, ...}}``. ``encode(captions) -> (text, text_mask or
    None)``. Every variant sees the same latents, noise and ``t``."""
    if latents.shape[0] != len(captions):
        raise ValueError(f"{latents.shape[0]} latents but {len(captions)} captions")
    latents = latents.float()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    target = velocity_target(latents, noise)
    texts = {name: encode(caps) for name, caps in caption_variants(captions).items()}
    out: dict[float, dict[str, float]] = {}
    n = latents.shape[0]
    for t in timesteps:
        tt = torch.full((n,), float(t))
        x_t = add_noise(latents, noise, tt)
        row = {}
        for name, (text, mask) in texts.items():
            total = 0.0
            for i in range(0, n, batch_size):
                sl = slice(i, i + batch_size)
                m = None if mask is None else mask[sl]
                v = model(x_t[sl], tt[sl], text[sl], m).float()
                total += ((v - target[sl]) ** 2).mean(dim=tuple(range(1, v.dim()))).sum().item()
            row[name] = total / n
        out[float(t)] = row
    return out


@torch.no_grad()
def frame_permutation_errors(
    model: torch.nn.Module,
    latent_shape: Sequence[int],
    text_shape: Sequence[int],
    use_text_mask: bool,
    batch: int = 4,
    t: float = 0.5,
    seed: int = 0,
) -> dict[str, float]:
    """``|v(P x) - P v(x)| / |v(x)|`` per frame permutation (:data:`FRAME_PERMUTATIONS`) at
    random latents ``[batch, *latent_shape]`` (``[C, T, H, W]``, T >= 2) and random text
    ``[batch, *text_shape]``."""
    c, frames, h, w = latent_shape
    if frames < 2:
        raise ValueError(f"latent_shape {tuple(latent_shape)}: a frame permutation needs T >= 2")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, frames, h, w, generator=g)
    text = torch.randn(batch, *text_shape, generator=g)
    mask = torch.ones(batch, text_shape[0], dtype=torch.bool) if use_text_mask else None
    tt = torch.full((batch,), t)
    v = model(x, tt, text, mask).float()
    out = {}
    for name, perm_of in FRAME_PERMUTATIONS.items():
        perm = perm_of(frames)
        vp = model(x[:, :, perm], tt, text, mask).float()
        out[name] = ((vp - v[:, :, perm]).norm() / v.norm().clamp_min(1e-12)).item()
    return out
