"""Pictures of a run (grids, curves), CFG training by condition dropout, the optimizers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_apt.config.training import OptimConfig
from megatron_apt.data.media import read_frames
from megatron_apt.engine.engines import build_optimizer
from megatron_apt.evaluation.figures import (
    animated_grid,
    frame_strip_grid,
    plot_curves,
    plot_health,
    read_events,
    read_metrics,
    upscale,
    write_grids,
)
from megatron_apt.inference.writers import write_sample
from megatron_apt.stages.diffusion import drop_condition


def _clips(n=3, t=2, h=4, w=4):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (t, h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_frame_strip_grid_places_every_frame_of_every_sample():
    clips = _clips()
    g = frame_strip_grid(clips, factor=2, gap=1, background=7)
    assert g.shape == (3 * 8 + 2, 2 * 8 + 1, 3)
    for i, clip in enumerate(clips):
        for j in range(2):
            tile = g[i * 9 : i * 9 + 8, j * 9 : j * 9 + 8]
            assert np.array_equal(tile, upscale(clip[j], 2))
    assert (g[8] == 7).all()  # the gap row


def test_animated_grid_tiles_clips_and_pads_missing_cells():
    clips = _clips(n=3)
    a = animated_grid(clips, columns=2, factor=1, gap=0, background=0)
    assert a.shape == (2, 8, 8, 3)
    assert np.array_equal(a[:, 0:4, 4:8], clips[1]) and np.array_equal(a[:, 4:8, 0:4], clips[2])
    assert (a[:, 4:8, 4:8] == 0).all()
    with pytest.raises(ValueError, match="differ in shape"):
        animated_grid([clips[0], clips[0][:1]])


def test_write_grids_writes_png_gif_mp4(tmp_path):
    paths = write_grids(_clips(n=4, t=3, h=6, w=6), tmp_path, "apt-1-step")
    assert [p.suffix for p in paths] == [".png", ".gif", ".mp4"]
    assert read_frames(paths[1]).shape[0] == 3 and read_frames(paths[2]).shape[0] == 3


def test_read_metrics_last_record_of_a_step_wins_and_bad_line_is_named(tmp_path):
    f = tmp_path / "metrics.jsonl"
    recs = [{"step": 1, "loss_g": 3.0}, {"step": 2, "loss_g": 2.0}, {"step": 2, "loss_g": 1.0}]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert [r["loss_g"] for r in read_metrics(f)] == [3.0, 1.0]
    out = plot_curves({"APT": f}, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    f.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        read_metrics(f)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        read_metrics(tmp_path / "nowhere.jsonl")


def test_health_panels_and_events(tmp_path):
    f = tmp_path / "metrics.jsonl"
    recs = [
        {"step": s, "loss_d": 1.0 / s, "d_acc_real": 0.5 + s / 10, "d_acc_fake": 0.6,
         "logit_gap": 0.1 * s, "grad_norm_g": 0.5 * s, "grad_norm_d": 2.0}
        for s in (1, 2, 3)
    ]  # fmt: skip
    recs.insert(3, {"step": 3, "event": "collapse", "condition": "saturated"})
    recs.append({"step": 3, "event": "rollback", "to_step": 1, "lr_scale": 0.5})
    recs.append({"step": 2, "loss_d": 9.0})  # after the rollback: step 2 again
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert [r["step"] for r in read_metrics(f)] == [1, 2, 3]  # events are not metrics
    assert read_metrics(f)[1] == {"step": 2, "loss_d": 9.0}
    assert [e["event"] for e in read_events(f)] == ["collapse", "rollback"]
    out = plot_health({"APT": f, "again": f}, tmp_path / "health.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import tools.make_figures as make_figures  # the CLI draws the same panels

    out_dir = tmp_path / "fig"
    assert make_figures.main(["--output", str(out_dir), "--metrics", f"APT={f}", "--health"]) == 0
    assert (out_dir / "loss_curves.png").exists() and (out_dir / "loss_curves_health.png").exists()
    f.write_text(json.dumps({"step": 1, "lr": 1.0}) + "\n")
    with pytest.raises(ValueError, match="none of the metrics"):
        plot_health({"APT": f}, tmp_path / "none.png")


def test_write_sample_gif_as_main_file_is_near_lossless(tmp_path):
    clip = np.zeros((3, 8, 8, 3), np.uint8)
    clip[:, 2:6, 2:6] = (230, 30, 30)
    clip[1, 0, 0] = (30, 70, 235)
    paths = write_sample(tmp_path, 0, "a red square", clip, fps=8, video_format="gif")
    assert [p.suffix for p in paths] == [".gif"]
    assert np.abs(read_frames(paths[0]).astype(int) - clip).max() <= 2
    with pytest.raises(ValueError, match="video_format='webm'"):
        write_sample(tmp_path, 1, "x", clip, video_format="webm")


def test_drop_condition_swaps_in_the_negative_prompt_per_sample():
    cond = {
        "text": torch.ones(3, 4, 2),
        "text_mask": torch.tensor([[1, 1, 0, 0]] * 3, dtype=torch.bool),
    }
    uncond = {"text": torch.full((1, 6, 2), -1.0), "text_mask": torch.ones(1, 6, dtype=torch.bool)}
    out = drop_condition(cond, uncond, torch.tensor([False, True, False]))
    assert out["text"].shape == (3, 6, 2)  # padded to the longer sequence
    assert (out["text"][1] == -1).all() and out["text_mask"][1].all()
    assert (out["text"][0, :4] == 1).all() and (out["text"][0, 4:] == 0).all()
    assert out["text_mask"][0].tolist() == [True, True, False, False, False, False]
    with pytest.raises(ValueError, match="no 'pooled_text'"):
        drop_condition({**cond, "pooled_text": torch.ones(3, 5)}, uncond, torch.zeros(3).bool())


def test_build_optimizer_paper_rmsprop_and_adamw():
    p = [torch.nn.Parameter(torch.ones(2))]
    rms = build_optimizer(p, OptimConfig(), lr=1e-3)
    assert isinstance(rms, torch.optim.RMSprop) and rms.defaults["alpha"] == 0.9
    assert rms.defaults["weight_decay"] == 0.0
    adam = build_optimizer(p, OptimConfig(name="adamw", eps=1e-6), lr=2e-4)
    assert isinstance(adam, torch.optim.AdamW) and adam.defaults["eps"] == 1e-6
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        build_optimizer(p, OptimConfig(name="sgd"), lr=1.0)
