"""Pictures of a run: sample grids (PNG), animated grids (GIF/MP4) and training curves (PNG).

Samples are ``uint8 [T, H, W, 3]`` clips (what :func:`megatron_apt.data.media.read_frames`
returns). Small clips are upscaled with nearest-neighbour so that pixels stay visible.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from megatron_apt.data.media import write_media

__all__ = [
    "METRIC_GROUPS",
    "animated_grid",
    "comparison_grid",
    "frame_strip_grid",
    "plot_curves",
    "plot_health",
    "read_events",
    "read_metrics",
    "upscale",
]


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscale of ``[..., H, W, C]`` by an integer ``factor``."""
    if factor < 1:
        raise ValueError(f"upscale factor must be >= 1, got {factor}")
    return frames.repeat(factor, axis=-3).repeat(factor, axis=-2)


def _check(samples: Sequence[np.ndarray]) -> tuple[int, int, int]:
    if not samples:
        raise ValueError("no samples to draw")
    shapes = {s.shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"samples differ in shape: {sorted(shapes)}")
    t, h, w, c = samples[0].shape
    if c != 3 or samples[0].dtype != np.uint8:
        raise ValueError(f"samples must be uint8 [T, H, W, 3], got {samples[0].dtype} {shapes}")
    return t, h, w


def frame_strip_grid(
    samples: Sequence[np.ndarray], factor: int = 8, gap: int = 2, background: int = 255
) -> np.ndarray:
    """One row per sample, one column per frame: ``uint8 [H', W', 3]`` for a PNG."""
    t, h, w = _check(samples)
    hh, ww = h * factor, w * factor
    out = np.full((len(samples) * (hh + gap) - gap, t * (ww + gap) - gap, 3), background, np.uint8)
    for i, clip in enumerate(samples):
        big = upscale(clip, factor)
        for j in range(t):
            out[i * (hh + gap) : i * (hh + gap) + hh, j * (ww + gap) : j * (ww + gap) + ww] = big[j]
    return out


def comparison_grid(
    rows: Mapping[str, Sequence[np.ndarray]],
    factor: int = 4,
    gap: int = 2,
    clip_gap: int = 8,
    label_width: int = 190,
) -> np.ndarray:
    """One labelled row per method, its clips side by side (each clip: its frames left to right):
    ``uint8 [H', W', 3]``. Every row must hold clips of one shape; rows are cut to the shortest."""
    from PIL import Image, ImageDraw

    n = min(len(v) for v in rows.values())
    t, h, w = _check([c for v in rows.values() for c in v[:n]])
    hh, ww = h * factor, w * factor
    clip_w = t * (ww + gap) - gap
    width = label_width + n * (clip_w + clip_gap) - clip_gap
    out = np.full((len(rows) * (hh + clip_gap) - clip_gap, width, 3), 255, np.uint8)
    for r, clips in enumerate(rows.values()):
        y = r * (hh + clip_gap)
        for i, clip in enumerate(clips[:n]):
            x0 = label_width + i * (clip_w + clip_gap)
            big = upscale(clip, factor)
            for j in range(t):
                x = x0 + j * (ww + gap)
                out[y : y + hh, x : x + ww] = big[j]
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    for r, name in enumerate(rows):
        draw.text((6, r * (hh + clip_gap) + hh // 2 - 6), name, fill=(0, 0, 0))
    return np.asarray(img)


def animated_grid(
    samples: Sequence[np.ndarray],
    columns: int | None = None,
    factor: int = 6,
    gap: int = 2,
    background: int = 255,
) -> np.ndarray:
    """Clips tiled in a ``rows x columns`` grid, frame by frame: ``uint8 [T, H', W', 3]``."""
    t, h, w = _check(samples)
    columns = columns or math.ceil(math.sqrt(len(samples)))
    rows = math.ceil(len(samples) / columns)
    hh, ww = h * factor, w * factor
    out = np.full((t, rows * (hh + gap) - gap, columns * (ww + gap) - gap, 3), background, np.uint8)
    for i, clip in enumerate(samples):
        r, c = divmod(i, columns)
        out[:, r * (hh + gap) : r * (hh + gap) + hh, c * (ww + gap) : c * (ww + gap) + ww] = (
            upscale(clip, factor)
        )
    return out


def write_grids(
    samples: Sequence[np.ndarray], output: str | Path, stem: str, fps: float = 4.0
) -> list[Path]:
    """``<stem>.png`` (frame strips), ``<stem>.gif`` and ``<stem>.mp4`` (animated grid)."""
    from PIL import Image

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{stem}.png"
    Image.fromarray(frame_strip_grid(samples)).save(png)
    anim = animated_grid(samples)
    if anim.shape[1] % 2 or anim.shape[2] % 2:  # H.264 (yuv420p) wants even sizes
        anim = np.pad(anim, ((0, 0), (0, anim.shape[1] % 2), (0, anim.shape[2] % 2), (0, 0)))
    paths = [png, write_media(out / f"{stem}.gif", anim, fps)]
    if anim.shape[0] > 1:
        paths.append(write_media(out / f"{stem}.mp4", anim, fps))
    return paths


def _records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    return out


def read_metrics(path: str | Path) -> list[dict]:
    """Metric records of a ``metrics.jsonl`` (megatron_apt.utils.metrics) by step; the last
    record of a step wins (a resumed or rolled-back run logs its steps again). Event records
    (an ``"event"`` key: collapse, rollback, stop) are left out: see :func:`read_events`."""
    by_step: dict[int, dict] = {}
    for rec in _records(path):
        if "event" not in rec:
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def read_events(path: str | Path) -> list[dict]:
    """The event records of a ``metrics.jsonl`` in the order they were written."""
    return [rec for rec in _records(path) if "event" in rec]


def plot_curves(
    runs: Mapping[str, str | Path],
    output: str | Path,
    keys: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """One panel per run (``{title: metrics.jsonl}``), the chosen ``keys`` of each (default:
    every key whose name starts with ``loss`` or ``d_`` but D's accuracies) against the step;
    writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (title, path) in zip(axes[0], runs.items(), strict=True):
        records = read_metrics(path)
        names = (keys or {}).get(title) or sorted(
            {k for r in records for k in r if k.startswith(("loss", "d_")) and "_acc_" not in k}
        )
        for name in names:
            pts = [(r["step"], r[name]) for r in records if name in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=name, linewidth=1.4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# Panels of :func:`plot_health`: title -> (keys, log scale)
METRIC_GROUPS: dict[str, tuple[tuple[str, ...], bool]] = {
    "losses": (("loss", "loss_g", "loss_d", "loss_r1"), False),
    "D logits": (("d_real", "d_fake", "d_fake_g", "logit_gap"), False),
    "D accuracy": (("d_acc_real", "d_acc_fake"), False),
    "gradient norms": (("grad_norm", "grad_norm_g", "grad_norm_d"), True),
}
EVENT_COLORS = {"collapse": "tab:orange", "rollback": "tab:red", "stop": "black"}


def plot_health(
    runs: Mapping[str, str | Path],
    output: str | Path,
    groups: Mapping[str, tuple[Sequence[str], bool]] = METRIC_GROUPS,
) -> Path:
    """One row per run (``{title: metrics.jsonl}``), one panel per key group that the run
    logged (losses, D's logits, D's accuracy on real/fake with the 0.5 line, gradient norms
    on a log scale); events (collapse, rollback, stop) as vertical lines. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {title: (read_metrics(p), read_events(p)) for title, p in runs.items()}
    present = [
        g
        for g, (keys, _) in groups.items()
        if any(k in r for recs, _ in data.values() for r in recs for k in keys)
    ]
    if not present:
        raise ValueError(
            f"none of the metrics {sorted(k for ks, _ in groups.values() for k in ks)} logged"
        )
    fig, axes = plt.subplots(
        len(runs), len(present), figsize=(4.2 * len(present), 3.2 * len(runs)), squeeze=False
    )
    for row, (title, (records, events)) in zip(axes, data.items(), strict=True):
        for ax, group in zip(row, present, strict=True):
            keys, log = groups[group]
            for name in keys:
                pts = [(r["step"], r[name]) for r in records if name in r]
                if pts:
                    ax.plot(*zip(*pts, strict=True), label=name, linewidth=1.4)
            if group == "D accuracy":
                ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
            if log:
                ax.set_yscale("log")
            for ev in events:
                color = EVENT_COLORS.get(ev["event"], "gray")
                ax.axvline(ev["step"], color=color, linestyle="--", linewidth=1, alpha=0.8)
            ax.set_title(f"{title}: {group}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
