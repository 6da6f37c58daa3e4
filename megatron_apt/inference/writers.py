"""Output files of generation: one PNG per image, an MP4 (and optionally a GIF) per video, and
a JSON summary of the run next to them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from megatron_apt.data.media import write_media

__all__ = [
    "SUMMARY_FILE",
    "check_writable_size",
    "sample_stem",
    "slugify",
    "write_sample",
    "write_summary",
]

SUMMARY_FILE = "summary.json"


def slugify(text: str, max_len: int = 48) -> str:
    """Lower-case ASCII words of ``text`` joined by ``-``, cut at a word boundary near
    ``max_len``; ``"sample"`` when nothing is left."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    slug = ""
    for w in words:
        cand = f"{slug}-{w}" if slug else w
        if len(cand) > max_len:
            break
        slug = cand
    return slug or (words[0][:max_len] if words else "sample")


def sample_stem(index: int, prompt: str) -> str:
    """File name without extension: ``0007-a-red-circle-moving-left``."""
    return f"{index:04d}-{slugify(prompt)}"


def check_writable_size(frames: int, height: int, width: int) -> None:
    """``ValueError`` when videos of this size cannot be written (H.264 needs even sizes)."""
    if frames > 1 and (height % 2 or width % 2):
        raise ValueError(
            f"an MP4 (H.264, yuv420p) needs an even height and width, got {height}x{width} pixels"
        )


def write_sample(
    output: str | Path,
    index: int,
    prompt: str,
    pixels: np.ndarray,
    fps: float = 24.0,
    gif: bool = False,
    video_format: str = "mp4",
) -> list[Path]:
    """Write ``uint8 [T, H, W, 3]`` pixels: ``<stem>.png`` when ``T == 1``, else
    ``<stem>.<video_format>`` (``mp4``: H.264, lossy; ``gif``: palette, near-lossless for
    flat colours), plus ``<stem>.gif`` with ``gif``. Returns the paths written, main first."""
    if video_format not in ("mp4", "gif"):
        raise ValueError(f"video_format={video_format!r}: use 'mp4' or 'gif'")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    stem = sample_stem(index, prompt)
    if pixels.shape[0] == 1:
        return [write_media(output / f"{stem}.png", pixels)]
    paths = [write_media(output / f"{stem}.{video_format}", pixels, fps)]
    if gif and video_format != "gif":
        paths.append(write_media(output / f"{stem}.gif", pixels, fps))
    return paths


def write_summary(output: str | Path, summary: dict) -> Path:
    """``summary.json`` in ``output`` (pretty-printed)."""
    path = Path(output) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
