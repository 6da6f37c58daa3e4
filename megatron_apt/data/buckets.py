"""Shape buckets of the pixel data: size, frame count and frame rate, and fitting media to them.

A *bucket preset* names a pixel shape (``image-1024``: 1024x1024, 1 frame; ``video-720p``:
1280x720, 49 frames = 2 s at 24 fps). Preprocessing maps every input to a preset of its kind
(images to image presets, videos to video presets; the preset with the closest aspect ratio
when several are given), resizes it to cover the preset and center-crops. The latent shape
``(C, T', H', W')`` that the VAE makes of a preset is the *bucket* of the shard format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "BUCKET_PRESETS",
    "BucketPreset",
    "choose_preset",
    "get_preset",
    "resize_center_crop",
    "sample_frame_indices",
]


@dataclass(frozen=True)
class BucketPreset:
    """Pixel shape of one bucket. ``fps`` is the frame rate clips are resampled to (None for
    images); a video bucket takes the first ``frames / fps`` seconds of each clip."""

    name: str
    width: int
    height: int
    frames: int = 1
    fps: float | None = None

    @property
    def kind(self) -> str:
        return "image" if self.frames == 1 else "video"

    @property
    def aspect(self) -> float:
        return self.width / self.height


BUCKET_PRESETS: dict[str, BucketPreset] = {
    p.name: p
    for p in (
        BucketPreset("image-32", 32, 32),
        BucketPreset("image-64", 64, 64),
        BucketPreset("image-256", 256, 256),
        BucketPreset("image-512", 512, 512),
        BucketPreset("image-1024", 1024, 1024),
        BucketPreset("image-1344x768", 1344, 768),
        BucketPreset("image-768x1344", 768, 1344),
        BucketPreset("video-32", 32, 32, frames=9, fps=8.0),
        BucketPreset("video-64", 64, 64, frames=17, fps=8.0),
        BucketPreset("video-480p", 848, 480, frames=49, fps=24.0),
        BucketPreset("video-720p", 1280, 720, frames=49, fps=24.0),
        BucketPreset("video-720p-portrait", 720, 1280, frames=49, fps=24.0),
    )
}


def get_preset(name: str) -> BucketPreset:
    """A preset by name, or ``WxH`` / ``WxHxF@FPS`` for a custom one (e.g. ``48x32x9@8``)."""
    if name in BUCKET_PRESETS:
        return BUCKET_PRESETS[name]
    try:
        size, _, fps = name.partition("@")
        dims = [int(d) for d in size.split("x")]
        frames = dims[2] if len(dims) == 3 else 1
        if len(dims) not in (2, 3) or min(dims) < 1 or (frames > 1 and not fps):
            raise ValueError
        return BucketPreset(name, dims[0], dims[1], frames, float(fps) if fps else None)
    except ValueError:
        raise ValueError(
            f"unknown bucket {name!r}: use one of {sorted(BUCKET_PRESETS)} or WxH (image) / "
            "WxHxFRAMES@FPS (video)"
        ) from None


def choose_preset(
    presets: Sequence[BucketPreset], kind: str, width: int, height: int
) -> BucketPreset | None:
    """The preset of ``kind`` whose aspect ratio is closest (in log scale) to
    ``width / height``; None when no preset has that kind."""
    fitting = [p for p in presets if p.kind == kind]
    if not fitting:
        return None
    return min(fitting, key=lambda p: abs(math.log(p.aspect * height / width)))


def sample_frame_indices(
    num_frames: int, src_fps: float | None, preset: BucketPreset
) -> list[int] | None:
    """Source frame indices for a clip of ``preset.frames`` frames at ``preset.fps``, from the
    start of the source (nearest frame in time); None when the source is too short.
    ``src_fps`` None means the source runs at the preset's rate."""
    if preset.frames == 1:
        return [0] if num_frames >= 1 else None
    step = (src_fps or preset.fps) / preset.fps  # source frames per target frame
    idx = [int(round(k * step)) for k in range(preset.frames)]
    return idx if idx[-1] < num_frames else None


def resize_center_crop(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """``[T, h, w, 3]`` uint8 -> ``[T, height, width, 3]`` uint8: resize (Lanczos) so that the
    frame covers ``width x height``, then crop the center."""
    _, h, w, _ = frames.shape
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    left, top = (new_w - width) // 2, (new_h - height) // 2
    out = np.empty((frames.shape[0], height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        img = Image.fromarray(frame)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
        out[i] = np.asarray(img.crop((left, top, left + width, top + height)))
    return out
