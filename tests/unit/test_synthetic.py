"""Synthetic coloured-shapes data: rendering, captions, files on disk, and the scorer's accuracy
(clean samples, samples through PNG / MP4 / GIF, noise)."""

import importlib.util
import json
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
import torch

from megatron_apt.data import make_synthetic_dataset, read_frames, render, score_sample
from megatron_apt.data.buckets import (
    BucketPreset,
    choose_preset,
    get_preset,
    resize_center_crop,
    sample_frame_indices,
)
from megatron_apt.data.media import MediaItem, list_inputs, video_fps
from megatron_apt.data.synthetic import (
    BACKGROUND,
    COLORS,
    MOTIONS,
    SHAPES,
    estimate_attributes,
    parse_caption,
    random_spec,
)
from megatron_apt.testing.launch import REPO_ROOT


def accuracy(samples):
    """Mean per-attribute accuracy of ``score_sample`` over ``(pixels, caption)`` pairs."""
    scores = [score_sample(p, c) for p, c in samples]
    return {k: float(np.mean([s[k] for s in scores])) for k in ("color", "shape", "motion")}


def test_captions_name_colour_shape_and_motion():
    specs = [random_spec(0, i, 32, video=True) for i in range(200)]
    assert {s.color for s in specs} == set(COLORS) and {s.shape for s in specs} == set(SHAPES)
    assert {s.motion for s in specs} == set(MOTIONS)
    s = specs[0]
    assert s.caption == f"a {s.color} {s.shape} moving {s.motion}"
    assert parse_caption(s.caption) == {"color": s.color, "shape": s.shape, "motion": s.motion}
    image = random_spec(0, 0, 32, video=False)
    assert image.caption == f"a {image.color} {image.shape}" and image.motion == "still"
    assert random_spec(0, 3, 32, True) == random_spec(0, 3, 32, True)  # deterministic


def test_render_moves_the_shape_in_the_stated_direction():
    spec = random_spec(0, 1, 32, video=True)
    frames = render(spec, 32, 9)  # [T, H, W, 3] uint8
    assert frames.shape == (9, 32, 32, 3) and frames.dtype == np.uint8
    fg = (frames != frames[0, 0, 0]).any(-1)
    assert fg[:, 0].sum() == fg[:, -1].sum() == 0  # stays inside the frame
    assert estimate_attributes(frames)["motion"] == spec.motion
    wide = np.pad(frames, ((0, 0), (0, 0), (8, 16), (0, 0)), mode="edge")  # [9, 32, 56, 3]
    assert all(score_sample(wide, spec.caption).values())


@pytest.mark.parametrize("video", [True, False])
def test_scorer_is_accurate_on_clean_samples(video):
    specs = [random_spec(1, i, 32, video) for i in range(150)]
    frames = 9 if video else 1
    # Model-side layout: [3, T, H, W] float in [-1, 1].
    pix = [torch.from_numpy(render(s, 32, frames)).permute(3, 0, 1, 2) / 127.5 - 1 for s in specs]
    acc = accuracy(zip(pix, (s.caption for s in specs)))
    assert min(acc.values()) > 0.95, acc


def test_antialiased_edges_blend_by_coverage():
    """antialias=4: interior pixels carry the colour, edge pixels lie on the line from the
    background to it (fractional coverage); antialias=1 gives hard, two-valued edges."""
    spec = random_spec(0, 5, 16, video=True)
    bg, fg = np.array(BACKGROUND, float), np.array(COLORS[spec.color], float)
    soft, hard = render(spec, 16, 5), render(spec, 16, 5, antialias=1)
    assert len(np.unique(hard.reshape(-1, 3), axis=0)) == 2
    t = ((soft.astype(float) - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))  # coverage
    partial = (t > 0.05) & (t < 0.95)
    assert partial.any() and (t > 0.99).any()
    recon = bg + t[..., None] * (fg - bg)  # every pixel is a blend of the two colours
    assert np.abs(recon - soft).max() <= 1.0
    with pytest.raises(ValueError, match="antialias"):
        render(spec, 16, 5, antialias=0)


def _box_blur(x: np.ndarray) -> np.ndarray:
    f = x.astype(float)
    nb = np.roll(f, 1, 1) + np.roll(f, -1, 1) + np.roll(f, 1, 2) + np.roll(f, -1, 2)
    return np.clip(0.5 * f + 0.125 * nb, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("degrade", ["none", "blur", "noise"])
def test_scorer_reads_small_antialiased_clips(degrade):
    """The demo's 16x16 clips: coverage templates and colour directions keep the scorer exact
    on anti-aliased shapes of 3 px radius, also blurred (colours blend with the background)
    or with noise (the old bounding-box fill ratio scored 0.88 shape accuracy on clean ones)."""
    rng = np.random.default_rng(0)
    specs = [random_spec(1, i, 16, True) for i in range(120)]
    clips = [render(s, 16, 5) for s in specs]
    if degrade == "blur":
        clips = [_box_blur(c) for c in clips]
    if degrade == "noise":
        clips = [np.clip(c + rng.normal(0, 12, c.shape), 0, 255).astype(np.uint8) for c in clips]
    acc = accuracy(zip(clips, (s.caption for s in specs)))
    assert min(acc.values()) >= 0.97, acc


def test_scorer_is_near_chance_on_noise():
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8) for _ in range(150)]
    acc = accuracy(zip(noise, (random_spec(2, i, 32, True).caption for i in range(150))))
    assert acc["color"] < 0.35 and acc["shape"] < 0.5 and acc["motion"] < 0.35, acc


@pytest.mark.parametrize(("kind", "fmt"), [("image", "png"), ("video", "mp4"), ("video", "gif")])
def test_files_on_disk_keep_their_captions_true(tmp_path, kind, fmt):
    paths = make_synthetic_dataset(tmp_path, 24, kind=kind, size=32, frames=9, fmt=fmt, seed=4)
    items, skipped = list_inputs(tmp_path)
    assert not skipped and [i.path for i in items] == [str(p) for p in paths]
    frames = [read_frames(p) for p in paths]
    assert frames[0].shape == ((1 if kind == "image" else 9), 32, 32, 3)
    if kind == "video":
        assert abs(video_fps(paths[0]) - 8.0) < 0.5
    acc = accuracy(zip(frames, (i.caption for i in items)))
    assert min(acc.values()) > 0.95, acc


def test_bucket_fitting_keeps_the_content():
    spec = random_spec(5, 0, 64, video=True)
    clip = render(spec, 64, 17)  # 17 frames at 16 fps -> video-32 takes 9 frames at 8 fps
    idx = sample_frame_indices(len(clip), 16.0, get_preset("video-32"))
    assert idx == list(range(0, 17, 2))
    small = resize_center_crop(clip[idx], 32, 32)
    assert small.shape == (9, 32, 32, 3)
    assert all(score_sample(small, spec.caption).values())
    assert sample_frame_indices(5, 8.0, get_preset("video-32")) is None  # too short
    wide = resize_center_crop(np.zeros((1, 40, 80, 3), np.uint8), 32, 32)
    assert wide.shape == (1, 32, 32, 3)


def test_make_synthetic_data_cli(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_synthetic_data", REPO_ROOT / "tools" / "make_synthetic_data.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--output", str(tmp_path), "--num", "3", "--kind", "video", "--format", "gif"]
    assert tool.main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"video_{i:05d}.{ext}" for i in range(3) for ext in ("gif", "txt")
    ]


def test_bucket_presets_and_aspect_choice():
    assert get_preset("video-720p") == BucketPreset("video-720p", 1280, 720, 49, 24.0)
    assert get_preset("48x32x9@8") == BucketPreset("48x32x9@8", 48, 32, 9, 8.0)
    with pytest.raises(ValueError, match="unknown bucket 'video-9000'"):
        get_preset("video-9000")
    presets = [get_preset(n) for n in ("image-1024", "image-1344x768", "video-720p")]
    assert choose_preset(presets, "image", 1920, 1080).name == "image-1344x768"
    assert choose_preset(presets, "image", 500, 600).name == "image-1024"
    assert choose_preset(presets[:2], "video", 1280, 720) is None


def test_inputs_from_manifest_and_folder(tmp_path):
    make_synthetic_dataset(tmp_path / "m", 2, "image", fmt="png")
    (tmp_path / "m" / "image_00001.txt").unlink()  # no caption
    items, skipped = list_inputs(tmp_path / "m")
    assert [Path(i.path).name for i in items] == ["image_00000.png"]
    assert skipped == [{"path": str(tmp_path / "m" / "image_00001.png"), "reason": ANY}]
    manifest = tmp_path / "m" / "list.jsonl"
    rows = [{"path": "image_00001.png", "caption": "a red square"}, {"caption": "x"}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items, skipped = list_inputs(manifest)
    assert items == [MediaItem(str(tmp_path / "m" / "image_00001.png"), "a red square")]
    assert skipped[0]["path"] == f"{manifest}:2" and "bad manifest line" in skipped[0]["reason"]


def test_gif_is_lossless_up_to_256_colours_and_loops(tmp_path):
    """Generated samples are noisy: each 16x16 frame has up to 256 colours, all kept exactly
    (a per-frame palette, no quantization); larger frames still write (quantized)."""
    from PIL import Image

    from megatron_apt.data.media import write_media

    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)  # 256 colours per frame
    path = write_media(tmp_path / "noise.gif", clip, fps=8)
    assert np.array_equal(read_frames(path), clip)
    with Image.open(path) as im:
        assert im.n_frames == 5 and im.info["loop"] == 0
        assert abs(im.info["duration"] - 125) <= 10  # GIF stores centiseconds
    big = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)  # 1024 colours per frame
    back = read_frames(write_media(tmp_path / "big.gif", big, fps=8))
    assert back.shape == big.shape and np.abs(back.astype(int) - big).mean() < 40
