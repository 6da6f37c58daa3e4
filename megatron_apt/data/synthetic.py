"""Synthetic captioned data: coloured shapes moving on a plain background, and a scorer.

Every sample is one shape (circle, square or triangle) of one colour on a dark grey background;
in videos it moves in a straight line (left, right, up or down) by about a third of the frame;
images are static. Captions state colour, shape and motion: ``"a red circle moving left"``
(``"a red circle"`` for images). Samples are a deterministic function of ``(seed, index)``.

:func:`score_sample` checks pixels against a caption by estimating the three attributes:
colour (nearest palette colour to the median foreground pixel), shape (fill ratio of the
foreground's bounding box: square ~1, circle ~pi/4, triangle ~1/2) and motion (displacement
of the foreground centroid from the first to the last frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_apt.data.media import write_media

__all__ = [
    "BACKGROUND",
    "COLORS",
    "MOTIONS",
    "SHAPES",
    "ShapeSpec",
    "estimate_attributes",
    "make_synthetic_dataset",
    "parse_caption",
    "random_spec",
    "render",
    "score_sample",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 70, 235),
    "yellow": (235, 225, 30),
    "purple": (160, 40, 220),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down")  # videos; images are "still"
BACKGROUND = (24, 24, 24)
_DIRECTION = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


@dataclass(frozen=True)
class ShapeSpec:
    """One sample: attributes, start center ``(cx, cy)`` and half-size ``radius`` in pixels,
    and total ``travel`` in pixels from the first to the last frame."""

    color: str
    shape: str
    motion: str
    cx: float
    cy: float
    radius: float
    travel: float

    @property
    def caption(self) -> str:
        base = f"a {self.color} {self.shape}"
        return base if self.motion == "still" else f"{base} moving {self.motion}"


def random_spec(seed: int, index: int, size: int, video: bool) -> ShapeSpec:
    """Deterministic random sample ``index`` for a ``size x size`` frame."""
    rng = np.random.default_rng([seed, index])
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    motion = str(rng.choice(MOTIONS)) if video else "still"
    radius = size * rng.uniform(0.17, 0.23)
    travel = size * rng.uniform(0.28, 0.34) if video else 0.0
    dx, dy = _DIRECTION[motion]
    lo, hi = radius + 1, size - radius - 2  # center range that keeps the shape inside
    cx = rng.uniform(lo - min(dx, 0) * travel, hi - max(dx, 0) * travel)
    cy = rng.uniform(lo - min(dy, 0) * travel, hi - max(dy, 0) * travel)
    return ShapeSpec(color, shape, motion, float(cx), float(cy), float(radius), float(travel))


def _shape_mask(
    shape: str,
    cx: float,
    cy: float,
    r: float,
    size: int | tuple[int, int],
    supersample: int = 1,
) -> np.ndarray:
    """``[H, W]`` coverage (``size`` = H = W, or ``(H, W)``) of a shape centered at
    ``(cx, cy)`` with half-size r: boolean for ``supersample=1`` (pixel centers), else the
    float share of ``supersample^2`` sub-pixel centers inside the shape (anti-aliased edges)."""
    h, w = (size, size) if isinstance(size, int) else size
    ss = supersample
    y, x = (np.mgrid[0 : h * ss, 0 : w * ss].astype(np.float64) + 0.5) / ss  # sample points
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "triangle":  # apex up, base 2r at the bottom: half the bounding box
        inside = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r} (expected one of {SHAPES})")
    if supersample == 1:
        return inside
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))


def render(spec: ShapeSpec, size: int, frames: int = 1, antialias: int = 4) -> np.ndarray:
    """Pixels ``uint8 [frames, size, size, 3]`` of ``spec``; the shape moves linearly from its
    start center by ``travel`` pixels over the clip. ``antialias``: sub-pixel samples per axis
    (4: edges blend with the background by coverage, as a camera's would; 1: pixel-exact,
    hard edges)."""
    if antialias < 1:
        raise ValueError(f"antialias must be >= 1, got {antialias}")
    bg, fg = np.array(BACKGROUND, np.float64), np.array(COLORS[spec.color], np.float64)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    dx, dy = _DIRECTION[spec.motion]
    for t in range(frames):
        frac = t / (frames - 1) if frames > 1 else 0.0
        cx, cy = spec.cx + dx * spec.travel * frac, spec.cy + dy * spec.travel * frac
        cover = _shape_mask(spec.shape, cx, cy, spec.radius, size, antialias)[..., None]
        out[t] = np.round(bg + (fg - bg) * cover).astype(np.uint8)
    return out


def make_synthetic_dataset(
    output: str | Path,
    num: int,
    kind: str = "video",
    size: int = 32,
    frames: int = 9,
    fmt: str | None = None,
    fps: float = 8.0,
    seed: int = 0,
    antialias: int = 4,
) -> list[Path]:
    """Write ``num`` media files ``{kind}_{i:05d}.{fmt}`` with same-stem ``.txt`` captions into
    ``output``; return the media paths. ``fmt``: png/jpg (images), mp4/gif (videos); default
    png for images, mp4 for videos."""
    if kind not in ("image", "video"):
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    fmt = fmt or ("png" if kind == "image" else "mp4")
    frames = 1 if kind == "image" else frames
    if kind == "video" and frames < 2:
        raise ValueError(f"a video needs at least 2 frames, got {frames}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num):
        spec = random_spec(seed, i, size, video=kind == "video")
        path = write_media(
            out / f"{kind}_{i:05d}.{fmt}", render(spec, size, frames, antialias), fps
        )
        path.with_suffix(".txt").write_text(spec.caption + "\n")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------------------------


def parse_caption(caption: str) -> dict[str, str | None]:
    """``{"color", "shape", "motion"}`` named in a caption (None if absent; motion defaults
    to ``"still"``)."""
    words = caption.lower().replace(",", " ").split()
    pick = lambda options: next((w for w in words if w in options), None)
    return {"color": pick(COLORS), "shape": pick(SHAPES), "motion": pick(MOTIONS) or "still"}


def _to_thwc_uint8(pixels: np.ndarray | torch.Tensor) -> np.ndarray:
    """``[3, T, H, W]`` float in [-1, 1] (or uint8), or ``[T, H, W, 3]`` -> uint8 THWC."""
    x = pixels.detach().float().cpu().numpy() if isinstance(pixels, torch.Tensor) else pixels
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None] if x.shape[-1] == 3 else x[:, None]
    channels_first = x.shape[0] == 3 and (x.shape[-1] != 3 or x.dtype != np.uint8)
    x = np.moveaxis(x, 0, -1) if channels_first else x
    if x.dtype != np.uint8:
        x = (x + 1.0) * 127.5 if x.min() < 0 else x * 255.0 if x.max() <= 1.0 else x
        x = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return x


def _background(x: np.ndarray) -> np.ndarray:
    """Background colour ``[3]``: the median of the border pixels of every frame."""
    edges = (x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1])
    return np.median(np.concatenate([e.reshape(-1, 3) for e in edges]), axis=0)


def _alpha(x: np.ndarray, bg: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """``[T, H, W]`` coverage in [0, 1]: each pixel projected on the line from the background
    colour to the shape's colour (anti-aliased and blurred edges get fractional coverage)."""
    d = rgb - bg
    return np.clip(((x.astype(np.float64) - bg) @ d) / max(float(d @ d), 1e-6), 0.0, 1.0)


def _nearest_color(rgb: np.ndarray, bg: np.ndarray) -> str:
    """The palette colour whose direction from the background is closest (cosine) to
    ``rgb``'s: a colour blended with the background (blur, partial coverage) keeps its
    direction."""
    palette = np.array(list(COLORS.values()), dtype=np.float64) - bg
    v = rgb - bg
    cos = palette @ v / (np.linalg.norm(palette, axis=1) * max(np.linalg.norm(v), 1e-6))
    return list(COLORS)[int(np.argmax(cos))]


def _template_error(alpha: np.ndarray, shape: str) -> float:
    """Squared error between a frame's coverage ``[H, W]`` and ``shape`` rendered with the
    same area and centroid (4x4 supersampled)."""
    area = alpha.sum()
    ys, xs = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]] + 0.5
    cy, cx = (alpha * ys).sum() / area, (alpha * xs).sum() / area
    r = np.sqrt(area / {"circle": np.pi, "square": 4.0, "triangle": 2.0}[shape])
    if shape == "triangle":  # centroid of the apex-up triangle lies r/3 below its box center
        cy -= r / 3
    return float(((_shape_mask(shape, cx, cy, r, alpha.shape, 4) - alpha) ** 2).sum())


def _classify_shape(alpha: np.ndarray) -> str:
    """The shape whose template fits the coverage best, summed over the frames with enough
    foreground (at least 2 pixels' worth)."""
    frames = [a for a in alpha if a.sum() >= 2.0]
    if not frames:
        return "none"
    errors = {s: sum(_template_error(a, s) for a in frames) for s in SHAPES}
    return min(errors, key=errors.get)


def _classify_motion(alpha: np.ndarray) -> str:
    """Direction of the coverage centroid's displacement from the first to the last frame."""
    if alpha.shape[0] < 2 or alpha[0].sum() < 1.0 or alpha[-1].sum() < 1.0:
        return "still"
    ys, xs = np.mgrid[0 : alpha.shape[1], 0 : alpha.shape[2]]
    (y0, x0), (y1, x1) = (
        ((a * ys).sum() / a.sum(), (a * xs).sum() / a.sum()) for a in (alpha[0], alpha[-1])
    )
    dx, dy = x1 - x0, y1 - y0
    if max(abs(dx), abs(dy)) < max(1.0, 0.05 * alpha.shape[-1]):
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def estimate_attributes(pixels: np.ndarray | torch.Tensor) -> dict[str, str]:
    """Estimated ``{"color", "shape", "motion"}`` of a clip ``[3, T, H, W]`` (float in [-1, 1]
    or uint8) or ``[T, H, W, 3]``; ``"none"`` when no foreground is found.

    Foreground: pixels whose L1 distance to the background colour (border median) exceeds 90.
    Colour: the palette colour in the direction (from the background) of the median of the
    strongest quarter of them (edge pixels blend with the background). Shape and motion read
    the coverage map (:func:`_alpha`): the best-fitting template of equal area and centroid,
    and the centroid's displacement.
    """
    x = _to_thwc_uint8(pixels)
    bg = _background(x)
    dist = np.abs(x.astype(np.float64) - bg).sum(-1)  # [T, H, W]
    fg = dist > 90
    if not fg.any():
        return {"color": "none", "shape": "none", "motion": "still"}
    strong = fg & (dist >= np.quantile(dist[fg], 0.75))
    rgb = np.median(x[strong].astype(np.float64), axis=0)
    color = _nearest_color(rgb, bg)
    alpha = _alpha(x, bg, rgb) * (dist > 30)  # faint noise on the background is not a shape
    return {"color": color, "shape": _classify_shape(alpha), "motion": _classify_motion(alpha)}


def score_sample(pixels: np.ndarray | torch.Tensor, caption: str) -> dict[str, bool]:
    """Whether the clip shows the caption's colour, shape and motion:
    ``{"color": bool, "shape": bool, "motion": bool}`` (layouts as :func:`estimate_attributes`)."""
    want, got = parse_caption(caption), estimate_attributes(pixels)
    return {k: want[k] == got[k] for k in ("color", "shape", "motion")}
