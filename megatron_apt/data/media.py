"""Captioned media on disk: finding inputs, reading frames, writing PNG / MP4 / GIF.

Inputs (:func:`list_inputs`):

* a folder of media files, each with a caption in a ``.txt`` file of the same stem
  (``clip.mp4`` + ``clip.txt``), searched recursively;
* a folder with a ``captions.jsonl`` (``{"path": ..., "caption": ...}`` per line, paths relative
  to the folder);
* a manifest ``.jsonl`` file of the same form (paths relative to the manifest's folder).

Images: PNG, JPEG, WebP, BMP (Pillow). Videos: MP4, WebM, MOV, MKV, AVI (PyAV) and animated
GIF (read through imageio, written with Pillow). Frames are ``uint8 [T, H, W, 3]`` RGB.

PyAV (``av``) and imageio are imported where a video is decoded or encoded, not with this
module: training, checkpoint conversion and benchmarking import it (through
``megatron_apt.data`` and the writers) and run on machines without them (the GPU image has no
PyAV). A missing one raises :class:`MediaLibraryMissing` naming the package and its install
command.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTS",
    "VIDEO_EXTS",
    "MediaError",
    "MediaItem",
    "MediaLibraryMissing",
    "list_inputs",
    "media_kind",
    "read_frames",
    "video_fps",
    "write_media",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
CAPTIONS_FILE = "captions.jsonl"


# the optional media libraries: import name -> (what needs it, the pip requirement of setup.py)
MEDIA_LIBRARIES = {
    "av": ("PyAV, the video decoder/encoder of MP4, WebM, MOV, MKV and AVI files", "av>=12"),
    "imageio.v3": ("imageio, the reader of animated GIFs", "imageio>=2.34"),
}


class MediaError(RuntimeError):
    """A media file that cannot be read (message names the file)."""


class MediaLibraryMissing(ImportError):
    """An optional media library (PyAV or imageio) is not installed; the message names the
    package and how to install it. Not a :class:`MediaError`: it is not the file's fault, and
    readers that skip unreadable files must not skip every video for it."""


def _media_library(name: str, path: Path):
    """Import the optional library ``name`` (``av`` or ``imageio.v3``) for ``path``."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        what, requirement = MEDIA_LIBRARIES[name]
        package = name.split(".")[0]
        raise MediaLibraryMissing(
            f"{path}: needs the {package!r} package ({what}), which is not installed: "
            f"pip install '{requirement}' (a requirement of setup.py; training, checkpoint "
            f"conversion and benchmarking do not need it)"
        ) from err


@dataclass(frozen=True)
class MediaItem:
    """One captioned input: ``path`` of an image or video and its caption."""

    path: str
    caption: str


def media_kind(path: str | Path) -> str | None:
    """``"image"``, ``"video"`` or None (not a media file), from the extension."""
    ext = Path(path).suffix.lower()
    return "image" if ext in IMAGE_EXTS else "video" if ext in VIDEO_EXTS else None


def _read_jsonl(path: Path) -> tuple[list[MediaItem], list[dict]]:
    items, skipped = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(MediaItem(str(path.parent / row["path"]), str(row["caption"])))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            skipped.append({"path": f"{path}:{n}", "reason": f"bad manifest line: {err!r}"})
    return items, skipped


def _read_folder(root: Path) -> tuple[list[MediaItem], list[dict]]:
    items, skipped = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and media_kind(p)):
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            items.append(MediaItem(str(path), caption_file.read_text().strip()))
        else:
            skipped.append({"path": str(path), "reason": f"no caption file {caption_file.name}"})
    return items, skipped


def list_inputs(source: str | Path) -> tuple[list[MediaItem], list[dict]]:
    """Captioned inputs of a folder or manifest (see the module docstring), sorted by path.
    Returns ``(items, skipped)``; ``skipped`` lists ``{"path", "reason"}`` of unusable entries
    (a media file without caption, a bad manifest line)."""
    source = Path(source)
    if source.is_file() and source.suffix == ".jsonl":
        items, skipped = _read_jsonl(source)
    elif source.is_dir() and (source / CAPTIONS_FILE).is_file():
        items, skipped = _read_jsonl(source / CAPTIONS_FILE)
    elif source.is_dir():
        items, skipped = _read_folder(source)
    else:
        raise FileNotFoundError(f"input {source} is neither a folder nor a .jsonl manifest")
    for item in items:
        if not media_kind(item.path):
            skipped.append({"path": item.path, "reason": "unknown media extension"})
    items = sorted((i for i in items if media_kind(i.path)), key=lambda i: i.path)
    return items, skipped


def video_fps(path: str | Path) -> float | None:
    """Frame rate of a video file (frames per second), or None when the container has none."""
    path = Path(path)
    lib = _video_library(path)
    try:
        if path.suffix.lower() == ".gif":
            ms = lib.immeta(path).get("duration")
            return 1000.0 / ms if ms else None
        with lib.open(str(path)) as container:
            rate = container.streams.video[0].average_rate
        return float(rate) if rate else None
    except Exception as err:
        raise MediaError(f"cannot read {path}: {err}") from err


def read_frames(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Decode ``uint8 [T, H, W, 3]`` RGB frames (``T = 1`` for images); for videos at most
    ``max_frames`` from the start (decoding stops there). Raises :class:`MediaError`."""
    path = Path(path)
    lib = None if media_kind(path) == "image" else _video_library(path)
    try:
        if lib is None:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))[None]
        frames = []
        for frame in _iter_video(path, lib):
            frames.append(_to_rgb(frame))
            if max_frames is not None and len(frames) >= max_frames:
                break
        if not frames:
            raise ValueError("no frames")
        return np.stack(frames)
    except Exception as err:
        raise MediaError(f"cannot read {path}: {err}") from err


def _video_library(path: Path):
    """The library that decodes ``path``: imageio's v3 API for a GIF, PyAV for the rest."""
    return _media_library("imageio.v3" if path.suffix.lower() == ".gif" else "av", path)


def _iter_video(path: Path, lib):
    """Decoded frames of a video through ``lib`` (:func:`_video_library`), one thread."""
    if path.suffix.lower() == ".gif":
        yield from lib.imiter(path)
        return
    with lib.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=-1)
    return np.ascontiguousarray(frame[..., :3]).astype(np.uint8)


def write_media(path: str | Path, frames: np.ndarray, fps: float = 8.0) -> Path:
    """Write ``uint8 [T, H, W, 3]`` frames: an image (``T = 1``; PNG/JPEG/...), an MP4/other
    video (H.264 through PyAV; even H and W) or an animated GIF, chosen by extension."""
    path = Path(path)
    kind = media_kind(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if kind == "image":
        if frames.shape[0] != 1:
            raise ValueError(f"{path}: an image takes 1 frame, got {frames.shape[0]}")
        Image.fromarray(frames[0]).save(path)
    elif path.suffix.lower() == ".gif":
        _write_gif(path, frames, fps)
    elif kind == "video":
        _write_video(path, frames, fps)
    else:
        raise ValueError(f"{path}: unknown media extension")
    return path


def _palette_frame(frame: np.ndarray) -> Image.Image:
    """``uint8 [H, W, 3]`` -> a palette image, exact when the frame has at most 256 colours
    (its own colours as the palette: no quantization, ~10x faster than Pillow's median cut on
    noisy frames); Pillow's quantization for frames with more."""
    colours, index = np.unique(frame.reshape(-1, 3), axis=0, return_inverse=True)
    if len(colours) > 256:
        return Image.fromarray(frame)
    image = Image.fromarray(index.reshape(frame.shape[:2]).astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(colours)] = colours
    image.putpalette(palette.reshape(-1).tolist())
    return image


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    """Animated GIF (looping), one local palette per frame (lossless up to 256 colours)."""
    images = [_palette_frame(f) for f in frames]
    images[0].save(
        path,
        save_all=True,
        append_images=images[1:],
        duration=1000.0 / fps,
        loop=0,
        optimize=False,
    )


def _write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """H.264 (yuv420p, so H and W must be even) through PyAV, single-threaded."""
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"{path}: H.264 needs even height and width, got {frames.shape[1:3]}")
    av = _media_library("av", path)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"threads": "1", "crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
