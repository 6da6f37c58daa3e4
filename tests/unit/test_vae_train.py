"""tools/train_vae.py and megatron_apt.vae.train: the saved VAE loads through ``load_vae``,
its normalization makes the training latents zero-mean / unit-variance per channel, the
reported PSNR is the one recomputed through the loaded wrapper, training lowers the error,
and bad inputs get errors that name the file or value."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_apt.data.media import write_media
from megatron_apt.data.synthetic import make_synthetic_dataset, random_spec, render
from megatron_apt.vae import DiffusersImageVAE, load_vae
from megatron_apt.vae.train import REPORT_FILE, VAETrainConfig, load_frames, train_vae

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import train_vae as train_vae_tool  # noqa: E402

SMALL = dict(block_out_channels=(8, 16), norm_num_groups=4, batch_size=16, log_interval=10)


def _frames(n_clips: int = 24, seed: int = 0) -> torch.Tensor:
    clips = np.concatenate([render(random_spec(seed, i, 16, True), 16, 3) for i in range(n_clips)])
    return torch.from_numpy(clips).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, 16, 16]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "vae"
    frames = _frames()
    report = train_vae(frames, out, VAETrainConfig(steps=40, holdout=0.25, **SMALL), log=print)
    return out, frames, report


def test_saved_vae_loads_and_normalizes_training_latents(trained):
    out, frames, report = trained
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        REPORT_FILE,
    ]
    assert not out.with_name("vae.tmp").exists()
    vae = load_vae(str(out))
    assert isinstance(vae, DiffusersImageVAE) and vae.latent_channels == 4
    assert vae.latent_shape(3, 16, 16) == (4, 3, 8, 8)
    n_train = report["train_frames"]
    assert n_train + report["holdout_frames"] == frames.shape[0] == 72
    # the training frames' posterior means, normalized by the config's statistics
    z = vae.encode(frames[:n_train].unsqueeze(2)).squeeze(2)  # one frame per clip: [N, C, 8, 8]
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["scaling_factor"] == 1.0
    assert cfg["latents_mean"] == pytest.approx(report["latents_mean"])
    assert len(cfg["latents_std"]) == 4 and min(cfg["latents_std"]) > 0


def test_reported_psnr_is_recomputed_through_the_wrapper(trained):
    out, frames, report = trained
    vae = load_vae(str(out))
    hold = frames[report["train_frames"] :]
    pixels = hold.unsqueeze(2)  # [N, 3, 1, 16, 16]: one frame per "clip"
    rec = vae.decode(vae.encode(pixels))
    psnr = 10 * math.log10(4 / float(((rec - pixels) ** 2).mean()))
    assert psnr == pytest.approx(report["psnr_holdout_db"], abs=0.02)


def test_training_lowers_the_reconstruction_error(tmp_path, trained):
    _, frames, report = trained
    once = train_vae(frames, tmp_path / "v1", VAETrainConfig(steps=1, holdout=0.25, **SMALL))
    assert report["psnr_holdout_db"] > once["psnr_holdout_db"] + 3, (report, once)


def test_output_is_replaced_whole(tmp_path):
    out = tmp_path / "vae"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    train_vae(_frames(4), out, VAETrainConfig(steps=1, holdout=0.0, **SMALL))
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()


def test_bad_inputs_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAETrainConfig(block_out_channels=(6, 16), norm_num_groups=4).validate()
    with pytest.raises(ValueError, match="steps >= 1"):
        VAETrainConfig(steps=0).validate()
    with pytest.raises(ValueError, match="not divisible by the compression 2"):
        train_vae(torch.zeros(4, 3, 15, 16), tmp_path / "v", VAETrainConfig(steps=1, **SMALL))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        train_vae(torch.zeros(4, 1, 16, 16), tmp_path / "v", VAETrainConfig(steps=1, **SMALL))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no captioned media"):
        load_frames(empty)
    mixed = tmp_path / "mixed"
    make_synthetic_dataset(mixed, 2, "image", size=16)
    odd = write_media(mixed / "odd.png", np.zeros((1, 8, 8, 3), np.uint8))
    odd.with_suffix(".txt").write_text("a thing\n")
    with pytest.raises(ValueError, match="odd.png: frame size 8x8 differs"):
        load_frames(mixed)


def test_cli_trains_a_loadable_vae(tmp_path, capsys):
    data = tmp_path / "data"
    make_synthetic_dataset(data, 6, "video", size=16, frames=2, fmt="gif")
    out = tmp_path / "vae"
    argv = ["--input", str(data), "--output", str(out), "--steps", "3", "--channels", "8,16",
            "--norm-groups", "4", "--latent-channels", "2", "--log-interval", "1"]  # fmt: skip
    assert train_vae_tool.main(argv) == 0
    log = capsys.readouterr().out
    assert "12 frames from 6 files" in log and "step 3/3" in log and "PSNR" in log
    assert load_vae(str(out)).latent_shape(2, 16, 16) == (2, 2, 8, 8)
    with pytest.raises(SystemExit) as err:
        train_vae_tool.main(["--input", str(tmp_path / "nope"), "--output", str(out)])
    assert err.value.code == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_vae_tool.main(["--input", str(data), "--output", str(out), "--channels", "8,x"])


def test_reconstruct_tool_keeps_captions_and_order(tmp_path, trained):
    import reconstruct

    from megatron_apt.data.media import list_inputs, read_frames

    data = tmp_path / "data"
    make_synthetic_dataset(data, 5, "video", size=16, frames=3, fmt="gif")
    items, _ = list_inputs(data)
    # the identity VAE reconstructs exactly: a known answer for the whole read/write path
    ident = tmp_path / "ident"
    assert reconstruct.main(["--vae", "identity:2", "--input", str(data), "--output",
                             str(ident), "--max-files", "4", "--batch-size", "3"]) == 0  # fmt: skip
    got, _ = list_inputs(ident)
    assert [g.caption for g in got] == [i.caption for i in items[:4]]
    for g, i in zip(got, items):
        np.testing.assert_array_equal(read_frames(g.path), read_frames(i.path))
    # a trained VAE: same captions, close but not equal pixels
    out = tmp_path / "rec"
    assert reconstruct.main(["--vae", str(trained[0]), "--input", str(data),
                             "--output", str(out)]) == 0  # fmt: skip
    got, _ = list_inputs(out)
    assert [g.caption for g in got] == [i.caption for i in items]
    a, b = read_frames(got[0].path).astype(float), read_frames(items[0].path).astype(float)
    assert a.shape == b.shape and 0 < np.abs(a - b).mean() < 40
    with pytest.raises(SystemExit) as err:
        reconstruct.main(["--vae", str(tmp_path / "missing"), "--input", str(data),
                          "--output", str(out)])  # fmt: skip
    assert err.value.code == 2
