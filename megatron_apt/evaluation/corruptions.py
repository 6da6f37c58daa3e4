"""Corruptions of real clips that an evaluation of one-step video generators must see: the
artefacts the paper's comparisons are about (blur, speckle), temporal ones a two-frame metric
misses (a colour that drifts mid-clip, a middle frame that freezes) and prompt mismatch (the
wrong shape for the caption). Used by the metric-sensitivity tests
(tests/unit/test_metric_sensitivity.py) to check that the headline metric sees each one.

Each corruption maps a rendered sample (its :class:`~megatron_apt.data.synthetic.ShapeSpec`,
its clip ``uint8 [T, H, W, 3]``) to a corrupted clip; the caption stays the spec's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from megatron_apt.data.synthetic import SHAPES, ShapeSpec, render

# a colour drifts to its neighbour in hue (the demo's own failure: yellow -> orange)
DRIFT_TO = {"red": "orange", "orange": "yellow", "yellow": "orange", "green": "blue",
            "blue": "purple", "purple": "red"}  # fmt: skip


def blur(spec: ShapeSpec, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every frame through a 3x3 binomial filter ([1, 2, 1] / 4 per axis, edges replicated)."""
    x = clip.astype(np.float64)
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
    out = (rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]) / 4
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def speckle(spec: ShapeSpec, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sparse high-frequency noise: 10 % of the pixels moved by N(0, 40) per channel (0-255)."""
    hit = rng.random(clip.shape[:-1])[..., None] < 0.10
    noise = rng.normal(0.0, 40.0, clip.shape) * hit
    return np.clip(np.round(clip + noise), 0, 255).astype(np.uint8)


def colour_drift(spec: ShapeSpec, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The object keeps its colour for the first half of the clip, then drifts linearly to its
    neighbour colour (:data:`DRIFT_TO`), which it reaches on the last frame."""
    t = len(clip)
    other = render(replace(spec, color=DRIFT_TO[spec.color]), clip.shape[1], t)
    w = np.clip((np.arange(t) - (t - 1) / 2) / max((t - 1) / 2, 1), 0, 1)[:, None, None, None]
    return np.round((1 - w) * clip + w * other).astype(np.uint8)


def freeze_middle(spec: ShapeSpec, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The middle frame repeats the one before it (a stutter: the object stops, then jumps)."""
    if len(clip) < 3:
        raise ValueError(f"freeze_middle needs >= 3 frames, got {len(clip)}")
    out = clip.copy()
    out[len(clip) // 2] = clip[len(clip) // 2 - 1]
    return out


def wrong_shape(spec: ShapeSpec, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Circles drawn as triangles (the same colour, motion, position and size), the demo's own
    mistake; other clips unchanged. Fewer circles and more triangles than the prompts ask for:
    the distribution of shapes changes, so the unconditional FD can see it."""
    if spec.shape != "circle":
        return clip
    return render(replace(spec, shape="triangle"), clip.shape[1], len(clip))


def shape_swap(spec: ShapeSpec, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every clip drawn as the next shape of :data:`SHAPES` (circle -> square -> triangle ->
    circle): each is wrong for its prompt, yet the distribution of shapes over all clips is the
    prompts' (a permutation), so only a metric that reads the prompt (the conditional FD,
    caption accuracy) can see it. Not in :data:`CORRUPTIONS`, which the headline must see."""
    shape = SHAPES[(SHAPES.index(spec.shape) + 1) % len(SHAPES)]
    return render(replace(spec, shape=shape), clip.shape[1], len(clip))


CORRUPTIONS: dict[str, Callable] = {
    "blur": blur,
    "speckle": speckle,
    "colour drift": colour_drift,
    "frozen middle frame": freeze_middle,
    "wrong shape": wrong_shape,
}


#: every corruption, the marginal-preserving one included
ALL_CORRUPTIONS: dict[str, Callable] = {**CORRUPTIONS, "shape swap": shape_swap}


def corrupt(
    name: str, specs: list[ShapeSpec], clips: list[np.ndarray], seed: int = 0
) -> list[np.ndarray]:
    """``ALL_CORRUPTIONS[name]`` applied to every clip (its noise drawn from ``seed``)."""
    if name not in ALL_CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {sorted(ALL_CORRUPTIONS)}")
    rng = np.random.default_rng(seed)
    return [ALL_CORRUPTIONS[name](s, c, rng) for s, c in zip(specs, clips, strict=True)]


__all__ = ["ALL_CORRUPTIONS", "CORRUPTIONS", "DRIFT_TO", "corrupt"]
