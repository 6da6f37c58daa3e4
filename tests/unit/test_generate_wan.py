"""``tools/generate.py`` on a Wan pipeline directory (issue 31, item 6), against diffusers'
own ``WanPipeline`` on the tiny random pipeline of ``megatron_apt.testing.wan_pipeline``
(CPU, fp32, seconds).

* multi-step diffusion with CFG and the directory's scheduler (``--scheduler``): our latents
  equal ``WanPipeline(..., latents=z, output_type="latent")``'s for the same noise, prompt,
  negative prompt and guidance, with ``FlowMatchEulerDiscreteScheduler(shift=3)`` (our Euler
  steps over its sigmas) and with Wan's ``UniPCMultistepScheduler`` (diffusers' object);
* one step: ``G = z - v(z, c, 1)`` with the pretrained Wan's conventions (the zero-padded
  text without a mask), ``v`` from diffusers' ``WanTransformer3DModel`` at ``t = 1000``;
  the zero-shot two-step sampler: the Euler steps through ``[1, t_mid, 0]``;
* decoded frames written as GIF / PNG / MP4 files;
* the export as a runnable ``WanPipeline`` (item 7, ``convert_checkpoint.py
  export-diffusers-pipeline``): ``WanPipeline.from_pretrained(OUT)`` with 1 step and 2 steps
  (``guidance_scale=1``) gives our one-step and zero-shot two-step latents; a base that is not
  a Wan pipeline, or whose umT5 does not fit, is refused naming it.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_apt.data.media import read_frames
from megatron_apt.inference import sample_noise
from megatron_apt.inference.schedule import read_scheduler
from megatron_apt.testing.launch import REPO_ROOT

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from megatron_apt.testing.wan_pipeline import (  # noqa: E402
    build_tiny_wan_pipeline,
    load_wan_pipeline,
)

TOOL = REPO_ROOT / "tools" / "generate.py"
PROMPT = "a red circle moving left over a blue background"
NEGATIVE = "blurry, static"
SEED = 3
FRAMES, HEIGHT, WIDTH = 5, 32, 32  # -> latents [4, 2, 4, 4], 8 tokens (patch 1 x 2 x 2)
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return build_tiny_wan_pipeline(tmp_path_factory.mktemp("wan") / "pipe")


@pytest.fixture(scope="module")
def unipc_dir(wan_dir, tmp_path_factory):
    """A scheduler of the Wan2.1 Diffusers pipelines' kind (UniPC, flow sigmas,
    flow_prediction, a flow shift), saved as a scheduler directory."""
    from diffusers import UniPCMultistepScheduler

    path = tmp_path_factory.mktemp("unipc") / "scheduler"
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(wan_dir):
    return load_wan_pipeline(wan_dir)


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("generate_tool_wan", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(tool, wan_dir, out, *flags, frames=FRAMES, checkpoint=None):
    argv = ["--checkpoint", checkpoint or wan_dir, "--text-encoder", wan_dir, "--vae", wan_dir]
    argv += ["--prompt", PROMPT, "--output", out, "--seed", SEED, "--save-latents"]
    argv += ["--frames", frames, "--height", HEIGHT, "--width", WIDTH, *flags]
    assert tool.main([str(a) for a in argv]) == 0
    summary = json.loads((out / "summary.json").read_text())
    return summary, load_file(str(out / "latents.safetensors"))["latents"]


def diffusers_latents(pipe, shape, steps, guidance, frames=FRAMES, negative=NEGATIVE):
    z = sample_noise(shape, SEED, 0)[None]
    out = pipe(
        PROMPT,
        negative_prompt=negative,
        height=HEIGHT,
        width=WIDTH,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=z.clone(),
        output_type="latent",
    )
    return out.frames


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_flow_match_euler_with_cfg_equals_wan_pipeline(tool, wan_dir, pipe, tmp_path):
    out = tmp_path / "euler"
    flags = ["--mode", "diffusion", "--steps", 3, "--guidance-scale", 5.0]
    flags += ["--negative-prompt", NEGATIVE, "--scheduler", wan_dir, "--video-format", "gif"]
    summary, ours = run(tool, wan_dir, out, *flags)
    assert summary["sampling"]["schedule"] == "flow-match-euler"
    assert summary["sampling"]["shift"] == 3.0  # the directory's scheduler
    assert summary["latent_shape"] == [4, 2, 4, 4]
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    ref = diffusers_latents(pipe, ours.shape[1:], 3, 5.0)
    assert ref.shape == ours.shape
    err = max_diff(ours, ref)
    print(f"max |ours - WanPipeline| {err:.2e}, max |latents| {ref.abs().max():.2f}")
    assert err < TOL, err
    # a negative control: without CFG the latents are far from the guided ones
    assert max_diff(diffusers_latents(pipe, ours.shape[1:], 3, 1.0), ref) > 100 * TOL
    gif = out / summary["samples"][0]["files"][0]
    assert gif.suffix == ".gif"
    frames = read_frames(gif)
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8


def test_unipc_with_cfg_equals_wan_pipeline(tool, wan_dir, pipe, unipc_dir, tmp_path):
    from diffusers import UniPCMultistepScheduler

    assert read_scheduler(unipc_dir)["schedule"] == "unipc"
    out = tmp_path / "unipc"
    flags = ["--mode", "diffusion", "--steps", 4, "--guidance-scale", 4.0]
    flags += ["--negative-prompt", NEGATIVE, "--scheduler", unipc_dir]
    summary, ours = run(tool, wan_dir, out, *flags, frames=1)  # an image: PNG
    assert summary["sampling"]["schedule"] == "unipc" and summary["sampling"]["shift"] == 3.0
    png = out / summary["samples"][0]["files"][0]
    assert png.suffix == ".png"
    original = pipe.scheduler
    pipe.scheduler = UniPCMultistepScheduler.from_pretrained(unipc_dir)
    try:
        ref = diffusers_latents(pipe, ours.shape[1:], 4, 4.0, frames=1)
        # a negative control: the same model and steps under the Euler scheduler differ
        pipe.scheduler = original
        euler = diffusers_latents(pipe, ours.shape[1:], 4, 4.0, frames=1)
    finally:
        pipe.scheduler = original
    err = max_diff(ours, ref)
    print(f"max |ours - WanPipeline| {err:.2e}, max |latents| {ref.abs().max():.2f}")
    assert err < TOL, err
    assert max_diff(euler, ref) > 100 * TOL


# MP4 needs PyAV (megatron_apt.data.media); without it the one-step video is a GIF
VIDEO = "mp4" if importlib.util.find_spec("av") is not None else "gif"


def test_one_step_is_z_minus_v_unmasked_and_two_step(tool, wan_dir, pipe, tmp_path):
    summary, one = run(tool, wan_dir, tmp_path / "one", "--video-format", VIDEO)
    assert summary["sampling"] == {"mode": "generator", "steps": 1}
    shape = one.shape[1:]
    z = sample_noise(shape, SEED, 0)[None]
    emb, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=512)
    tr = pipe.transformer

    def v(x, t):
        with torch.no_grad():
            return tr(x, torch.tensor([t]), emb, return_dict=False)[0]

    ref = z - v(z, 1000.0)
    err = max_diff(one, ref)
    print(f"one step: {err:.2e}")
    assert err < TOL, err
    # the masked text (the MMDiT's convention) is another model: a negative control
    from megatron_apt.checkpoint import load_mmdit
    from megatron_apt.text import load_text_encoder

    ours = load_mmdit(wan_dir)
    e = load_text_encoder(wan_dir).encode([PROMPT])
    with torch.no_grad():
        masked = z - ours(z, torch.ones(1), e.text, e.text_mask)
    assert max_diff(masked, ref) > 100 * TOL
    video = tmp_path / "one" / summary["samples"][0]["files"][0]
    assert video.suffix == f".{VIDEO}"
    assert read_frames(video).shape == (FRAMES, HEIGHT, WIDTH, 3)

    # zero-shot two steps: Euler through [1, t_mid, 0]
    _, two = run(tool, wan_dir, tmp_path / "two", "--steps", 2, "--t-mid", 0.6)
    x_mid = z - 0.4 * v(z, 1000.0)
    ref2 = x_mid - 0.6 * v(x_mid, 600.0)
    err = max_diff(two, ref2)
    print(f"two steps: {err:.2e}")
    assert err < TOL, err


def test_unsupported_schedulers_are_named(wan_dir, tmp_path):
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    DDIMScheduler().save_pretrained(tmp_path / "ddim")
    with pytest.raises(ValueError, match=r"ddim/scheduler_config.json: _class_name 'DDIMSch"):
        read_scheduler(tmp_path / "ddim")
    UniPCMultistepScheduler().save_pretrained(tmp_path / "eps")  # epsilon, no flow sigmas
    with pytest.raises(ValueError, match=r"eps/scheduler_config.json: use_flow_sigmas=False"):
        read_scheduler(tmp_path / "eps")
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, use_dynamic_shifting=True
    ).save_pretrained(tmp_path / "dyn")
    with pytest.raises(ValueError, match=r"use_dynamic_shifting=True, need False"):
        read_scheduler(tmp_path / "dyn")
    assert read_scheduler(wan_dir) == {
        "schedule": "flow-match-euler",
        "shift": 3.0,
        "num_train_timesteps": 1000,
    }


# -- item 7: export as a runnable WanPipeline ------------------------------------------------


@pytest.fixture(scope="module")
def convert_tool():
    spec = importlib.util.spec_from_file_location(
        "convert_tool_wan", TOOL.parent / "convert_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory):
    """A generator of ours with its own random weights (not the base's transformer)."""
    from megatron_apt.checkpoint.io import save_model_file
    from megatron_apt.models.builders import build_model
    from megatron_apt.models.wan import get_wan_preset
    from megatron_apt.testing import randomize_parameters

    cfg = get_wan_preset("wan-debug")
    model = build_model(cfg)
    randomize_parameters(model, seed=11)
    path = tmp_path_factory.mktemp("gen") / "wan-generator.safetensors"
    return save_model_file(path, model.state_dict(), cfg, role="generator")


def test_export_wan_pipeline_takes_our_one_and_two_steps(
    tool, convert_tool, wan_dir, pipe, generator_file, tmp_path
):
    out = tmp_path / "wan-apt"
    argv = ["export-diffusers-pipeline", "--input", generator_file, "--base", wan_dir]
    argv += ["--output", out, "--t-mid", "0.6"]
    assert convert_tool.main([str(a) for a in argv]) == 0
    for name in ("text_encoder", "tokenizer", "vae"):
        assert (out / name).is_symlink() and (out / name).resolve() == (wan_dir / name).resolve()
    assert not (out / "transformer").is_symlink()
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["transformer_2"] == [None, None] and index["boundary_ratio"] is None
    assert "WanPipeline" in (out / "README.md").read_text()

    exported = load_wan_pipeline(out)
    assert type(exported.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    exported.scheduler.set_timesteps(2)
    sigmas = exported.scheduler.sigmas.tolist()
    assert sigmas == pytest.approx([1.0, 0.6, 0.0], abs=1e-7), sigmas

    _, one = run(tool, wan_dir, tmp_path / "one", checkpoint=generator_file)
    _, two = run(
        tool, wan_dir, tmp_path / "two", "--steps", 2, "--t-mid", 0.6, checkpoint=generator_file
    )
    shape = one.shape[1:]
    ref1 = diffusers_latents(exported, shape, 1, 1.0, negative=None)
    ref2 = diffusers_latents(exported, shape, 2, 1.0, negative=None)
    err1, err2 = max_diff(one, ref1), max_diff(two, ref2)
    print(f"exported WanPipeline: one step {err1:.2e}, two steps {err2:.2e}")
    assert err1 < TOL and err2 < TOL, (err1, err2)
    # the exported transformer is ours, not the base's
    assert max_diff(diffusers_latents(pipe, shape, 1, 1.0, negative=None), ref1) > 100 * TOL


def test_export_refuses_a_base_that_is_not_a_fitting_wan_pipeline(
    convert_tool, wan_dir, generator_file, tmp_path, capsys
):
    import shutil

    from megatron_apt.checkpoint.pipeline_export import export_diffusers_pipeline

    sd3 = tmp_path / "sd3-base"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    argv = ["export-diffusers-pipeline", "--input", generator_file, "--base", sd3]
    assert convert_tool.main([str(a) for a in argv + ["--output", tmp_path / "x"]]) == 2
    err = capsys.readouterr().err
    assert f"--base {sd3} is not a Wan pipeline directory" in err, err
    wide = tmp_path / "wide"
    shutil.copytree(wan_dir, wide)
    config = json.loads((wide / "text_encoder" / "config.json").read_text())
    (wide / "text_encoder" / "config.json").write_text(json.dumps({**config, "d_model": 48}))
    with pytest.raises(
        ValueError,
        match=r"text_encoder/config.json: d_model 48 but the transformer takes text_dim 32",
    ):
        export_diffusers_pipeline(generator_file, wide, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
