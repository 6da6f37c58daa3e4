"""tools/generate.py and megatron_apt.inference with tiny models: a playable MP4 with the right
frames and size, PNGs for images, per-sample seeding that ignores the batch size, the zero-shot
two-step sampler, diffusion mode with CFG, the Table 8 timing and clear errors."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_apt.checkpoint import load_mmdit
from megatron_apt.checkpoint.io import save_model_file
from megatron_apt.data.media import read_frames, video_fps
from megatron_apt.inference import (
    GenerationPipeline,
    SamplingConfig,
    format_timing_table,
    sample_noise,
    sample_stem,
    slugify,
)
from megatron_apt.models import MMDiT
from megatron_apt.models.mmdit import get_preset
from megatron_apt.testing import randomize_parameters
from megatron_apt.testing.launch import REPO_ROOT
from megatron_apt.text import TextEncoder, build_tiny_text_encoder
from megatron_apt.vae import build_tiny_vae, load_vae

TOOL = REPO_ROOT / "tools" / "generate.py"
PROMPTS = ["a red circle moving left", "a blue square spinning", "a green star"]


def save_tiny_model(path, role="generator", seed=3, **overrides):
    cfg = get_preset("tiny", **overrides)
    model = MMDiT(cfg)
    randomize_parameters(model, seed=seed)
    return save_model_file(path, model.state_dict(), cfg, role=role)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    (root / "garbage.safetensors").write_bytes(b"not a checkpoint")
    return {
        "generator": save_tiny_model(root / "generator.safetensors"),
        "diffusion": save_tiny_model(root / "diffusion.safetensors", role="diffusion", seed=5),
        "wide": save_tiny_model(root / "wide.safetensors", in_channels=16),
        "rgb12": save_tiny_model(root / "rgb12.safetensors", in_channels=12, out_channels=12),
        "t5": build_tiny_text_encoder(root / "t5"),
        "image_vae": build_tiny_vae(root / "vae_image", "image"),
        "video_vae": build_tiny_vae(root / "vae_video", "video"),
        "t5_weights": root / "t5" / "model.safetensors",  # safetensors, not a model file
        "garbage": root / "garbage.safetensors",
    }


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("generate_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_args(assets, out, vae="image_vae", checkpoint="generator", prompts=PROMPTS[:2]):
    args = ["--checkpoint", assets[checkpoint], "--text-encoder", assets["t5"]]
    args += ["--vae", assets[vae], "--output", out, "--max-text-length", "16"]
    for p in prompts:
        args += ["--prompt", p]
    return [str(a) for a in args]


def run_tool(tool, argv):
    """tools/generate.py's main in this process; returns its summary.json."""
    assert tool.main(argv) == 0
    out = argv[argv.index("--output") + 1]
    with open(f"{out}/summary.json") as f:
        return json.load(f)


def saved_latents(out):
    return load_file(str(out / "latents.safetensors"))["latents"]


# ---------------------------------------------------------------------------------------------
# The CLI end to end (one real subprocess) and in-process runs
# ---------------------------------------------------------------------------------------------


def test_cli_writes_playable_mp4_with_timing_table(assets, tmp_path):
    out = tmp_path / "video"
    argv = base_args(assets, out, vae="video_vae")
    argv += ["--frames", "5", "--height", "16", "--width", "16", "--fps", "8", "--gif"]
    proc = subprocess.run(
        [sys.executable, str(TOOL), *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_samples"] == 2 and summary["pixel_shape"] == {
        "frames": 5,
        "height": 16,
        "width": 16,
    }
    assert summary["latent_shape"] == [4, 2, 4, 4]  # Wan: 1 + 4k frames -> 1 + k, 4x spatial
    for rec in summary["samples"]:
        mp4, gif = (out / name for name in rec["files"])
        assert mp4.name == f"{sample_stem(rec['index'], rec['prompt'])}.mp4"
        frames = read_frames(mp4)  # decoded back with PyAV
        assert frames.shape == (5, 16, 16, 3) and frames.dtype == np.uint8
        assert video_fps(mp4) == pytest.approx(8.0)
        assert read_frames(gif).shape == (5, 16, 16, 3)
    # the Table 8 timing: every component, seconds, share
    for label in ("Text Encoder", "DiT", "VAE", "Total"):
        assert label in proc.stdout
    seconds = summary["seconds"]
    assert seconds["total"] == pytest.approx(
        seconds["text_encoder"] + seconds["dit"] + seconds["vae"], abs=1e-5
    )
    assert all(seconds[k] > 0 for k in ("text_encoder", "dit", "vae"))


def test_image_png(tool, assets, tmp_path):
    out = tmp_path / "img"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green star\n\n  a white ring  \n")
    argv = base_args(assets, out) + ["--height", "16", "--width", "24", "--warmup", "1"]
    summary = run_tool(tool, argv + ["--prompts-file", str(prompts)])
    assert summary["latent_shape"] == [4, 1, 8, 12]
    names = [f for rec in summary["samples"] for f in rec["files"]]
    assert names == [
        "0000-a-red-circle-moving-left.png",
        "0001-a-blue-square-spinning.png",
        "0002-a-green-star.png",
        "0003-a-white-ring.png",
    ]
    for name in names:
        px = read_frames(out / name)
        assert px.shape == (1, 16, 24, 3) and px.std() > 0


def test_identity_vae_pixels_are_the_latents(tool, assets, tmp_path):
    """identity:2: the PNG is the pixel-shuffled latents mapped from [-1, 1] to uint8."""
    out = tmp_path / "identity"
    argv = base_args(assets, out, checkpoint="rgb12") + ["--vae", "identity:2"]
    summary = run_tool(tool, argv + ["--height", "8", "--width", "12", "--save-latents"])
    assert summary["latent_shape"] == [12, 1, 4, 6]
    latents = saved_latents(out)  # [2, 12, 1, 4, 6]
    pixels = torch.nn.functional.pixel_shuffle(latents[:, :, 0], 2)  # [2, 3, 8, 12]
    want = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    for rec, expected in zip(summary["samples"], want.numpy()):
        assert np.array_equal(read_frames(out / rec["files"][0])[0], expected)


def test_seed_determinism_is_batch_size_invariant(tool, assets, tmp_path):
    def run(name, batch, seed=7):
        out = tmp_path / name
        argv = base_args(assets, out, prompts=PROMPTS) + ["--height", "16", "--width", "16"]
        argv += ["--seed", str(seed), "--batch-size", str(batch), "--save-latents"]
        summary = run_tool(tool, argv)
        pngs = [read_frames(out / rec["files"][0]) for rec in summary["samples"]]
        return saved_latents(out), np.stack(pngs).astype(int)

    lat_a, px_a = run("a", batch=2)
    lat_b, px_b = run("b", batch=2)
    assert torch.equal(lat_a, lat_b) and np.array_equal(px_a, px_b)  # same seed: same pixels
    lat_c, px_c = run("c", batch=1)
    torch.testing.assert_close(lat_c, lat_a, rtol=0, atol=1e-5)  # batch size does not matter
    assert np.abs(px_c - px_a).max() <= 1  # (uint8 rounding of fp32 round-off)
    lat_d, _ = run("d", batch=2, seed=8)
    assert (lat_d - lat_a).abs().max() > 0.1  # another seed, another sample
    assert (lat_a[0] - lat_a[1]).abs().max() > 0.1  # per-sample noise


def test_two_step_differs_from_one_step(tool, assets, tmp_path):
    def run(name, *extra):
        out = tmp_path / name
        argv = base_args(assets, out) + ["--height", "16", "--width", "16", "--save-latents"]
        return run_tool(tool, argv + list(extra)), saved_latents(out)

    s1, one = run("one")
    s2, two = run("two", "--steps", "2", "--t-mid", "0.4")
    assert s2["sampling"] == {"mode": "generator", "steps": 2, "t_mid": 0.4, "renoise": False}
    assert (one - two).abs().max() > 1e-2
    _, renoised = run("renoise", "--steps", "2", "--t-mid", "0.4", "--renoise")
    assert (renoised - two).abs().max() > 1e-2


def test_diffusion_mode_with_cfg(tool, assets, tmp_path):
    def run(name, guidance):
        out = tmp_path / name
        argv = base_args(assets, out, checkpoint="diffusion")
        argv += ["--height", "16", "--width", "16", "--save-latents", "--mode", "diffusion"]
        argv += ["--steps", "3", "--shift", "3", "--guidance-scale", str(guidance)]
        argv += ["--negative-prompt", "blurry, low quality"]
        return run_tool(tool, argv), saved_latents(out)

    summary, guided = run("cfg", 4.0)
    assert summary["sampling"] == {
        "mode": "diffusion",
        "steps": 3,
        "guidance_scale": 4.0,
        "negative_prompt": "blurry, low quality",
        "shift": 3.0,
        "schedule": "linear",
    }
    _, plain = run("nocfg", 1.0)
    assert (guided - plain).abs().max() > 1e-2  # the guidance does something


# ---------------------------------------------------------------------------------------------
# The library
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(assets):
    model = load_mmdit(assets["diffusion"])
    encoder = TextEncoder.from_pretrained(assets["t5"], max_length=16)
    return GenerationPipeline(model, load_vae(str(assets["image_vae"])), encoder)


def test_one_euler_step_is_the_generator(pipeline):
    """Diffusion mode with 1 step and no CFG is exactly G(z, c) = z - v(z, c, 1)."""
    emb = pipeline.encode_text(PROMPTS[:2])
    noise = torch.stack([sample_noise((4, 1, 4, 4), 0, i) for i in range(2)])
    gen = pipeline.sample_latents(emb, noise, SamplingConfig(steps=1))
    euler = pipeline.sample_latents(
        emb, noise, SamplingConfig(mode="diffusion", steps=1, guidance_scale=1.0)
    )
    torch.testing.assert_close(gen, euler, rtol=0, atol=1e-6)


def test_cfg_combines_cond_and_negative(pipeline):
    """One Euler step with CFG g: z - (v_u + g (v_c - v_u)) with u = the negative prompt."""
    emb, neg = pipeline.encode_text(PROMPTS[:2]), pipeline.encode_text(["ugly"])
    noise = torch.stack([sample_noise((4, 1, 4, 4), 1, i) for i in range(2)])
    cfg = SamplingConfig(mode="diffusion", steps=1, guidance_scale=3.0, negative_prompt="ugly")
    got = pipeline.sample_latents(emb, noise, cfg, negative=neg)
    t = torch.ones(2)
    v_c = pipeline.model(noise, t, emb.text, emb.text_mask)
    v_u = pipeline.model(noise, t, neg.text.expand(2, -1, -1), neg.text_mask.expand(2, -1))
    torch.testing.assert_close(got, noise - (v_u + 3.0 * (v_c - v_u)), rtol=1e-5, atol=1e-5)


def test_noise_is_a_function_of_seed_and_index():
    a = sample_noise((4, 2, 3, 3), seed=5, index=2)
    assert torch.equal(a, sample_noise((4, 2, 3, 3), seed=5, index=2))
    for other in (sample_noise((4, 2, 3, 3), 5, 3), sample_noise((4, 2, 3, 3), 6, 2)):
        assert not torch.equal(a, other)
    assert not torch.equal(sample_noise((4, 2, 3, 3), 2, 5), a)  # not seed + index
    with pytest.raises(ValueError, match="seed"):
        sample_noise((1,), seed=-1, index=0)


def test_timing_table_and_names():
    table = format_timing_table({"text_encoder": 0.28, "dit": 2.65, "vae": 3.10}, 1)
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert "6.030" in rows["Total"] and "43.9%" in rows["DiT"] and "51.4%" in rows["VAE"]
    assert slugify("A Red circle, moving LEFT!") == "a-red-circle-moving-left"
    assert slugify("!!!") == "sample" and len(slugify("word " * 40)) <= 48
    assert sample_stem(12, "x y") == "0012-x-y"


def test_sampling_config_errors():
    with pytest.raises(ValueError, match="1 step or 2"):
        SamplingConfig(steps=4)
    with pytest.raises(ValueError, match="t_mid"):
        SamplingConfig(steps=2, t_mid=1.0)
    with pytest.raises(ValueError, match="mode"):
        SamplingConfig(mode="consistency")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vae, size, checkpoint, message",
    [
        ("image_vae", ["--height", "18", "--width", "16"], "generator", "multiples of 4x4"),
        ("image_vae", ["--height", "15", "--width", "16"], "generator", "divisible by 2"),
        ("video_vae", ["--frames", "6", "--height", "16", "--width", "16"], "generator", "1 + 4"),
        ("image_vae", ["--latent-shape", "1x3x4"], "generator", "patch size"),
        ("image_vae", ["--height", "16", "--width", "16"], "wide", "latent channels"),
        ("image_vae", ["--height", "16", "--width", "16"], "t5_weights", "not a megatron-apt"),
        ("image_vae", ["--height", "16", "--width", "16"], "garbage", "not a readable"),
    ],
)
def test_clear_errors(tool, assets, tmp_path, capsys, vae, size, checkpoint, message):
    argv = base_args(assets, tmp_path / "err", vae=vae, checkpoint=checkpoint) + size
    assert tool.main(argv) == 2
    assert message in capsys.readouterr().err


def test_flag_errors(tool, assets, tmp_path, capsys):
    argv = base_args(assets, tmp_path / "err") + ["--height", "16", "--width", "16"]
    with pytest.raises(SystemExit) as exc:
        tool.main(argv + ["--guidance-scale", "5"])  # generator mode takes no CFG
    assert exc.value.code == 2 and "--mode diffusion" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(base_args(assets, tmp_path / "err"))  # no size
    assert "--height" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mode", "diffusion", "--guidance-scale", "nan"], "--guidance-scale must be a finite"),
        (["--fps", "0"], "--fps must be a positive number"),
    ],
)
def test_non_finite_and_zero_values_are_refused(tool, assets, tmp_path, capsys, flags, message):
    """Issue 16, item 13: a NaN guidance scale wrote a NaN image and exited 0; --fps 0 passed."""
    argv = base_args(assets, tmp_path / "err", checkpoint="diffusion")
    with pytest.raises(SystemExit) as exc:
        tool.main(argv + ["--height", "16", "--width", "16", *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_non_utf8_prompts_file_is_named(tool, assets, tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a red circle\n\xff\xfe broken\n")
    argv = base_args(assets, tmp_path / "err", prompts=[]) + ["--prompts-file", str(bad)]
    assert tool.main(argv + ["--height", "16", "--width", "16"]) == 2
    assert f"--prompts-file {bad} is not UTF-8 text" in capsys.readouterr().err
