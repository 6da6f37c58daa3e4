"""The paper's whole chain on the Wan2.1 family, end to end on a tiny random Wan pipeline built
locally: examples/wan_apt.sh (import -> preprocess 16 captioned 5 x 16 x 16 clips through
Wan's VAE and umT5, and their first frames as stills -> consistency 2 updates -> image APT 2
updates -> video APT 2 updates, on 2 processes -> export a WanPipeline), run twice.

* the exported pipeline loads with ``WanPipeline.from_pretrained`` and its one step
  (``num_inference_steps=1, guidance_scale=1``, our noise as ``latents``) equals
  ``tools/generate.py --steps 1`` of the video stage's EMA generator (1e-4 in latents);
* the stills are the clips' first frames: Wan's VAE is causal, so a still's latent equals the
  clip's first latent frame, bitwise;
* the video stage starts where the paper says (G from the image stage's EMA, D restarted from
  the diffusion weights with new heads). Observed through the trainer's test hook
  ``MEGATRON_APT_TEST_WEIGHTS_DIR`` (megatron_apt/testing/hooks.py), which saves every
  rank's trained parameters just before each update: entry 0 is the state the video stage's
  first update starts from, after every init file was loaded and the engines were built (a
  run of 0 updates does not exist; a separate build would check another process's init, not
  the chain's). A launcher wrapper sets the variable for the two APT stages only (their own
  folders). Asserted bitwise: G(0) = image-apt/generator_ema.safetensors (and not the
  consistency EMA, nor the image stage's raw G); D's backbone(0) = the import (and not the
  image stage's trained D); D's heads(0) = the image stage's heads(0) (the same fresh
  initialization: same seed, same build) and not the image stage's trained heads;
* a stage whose launch exits 0 without its end-of-run export (a preempted run) stops the
  script (exit 3) before the next stage;
* a second run of the script trains nothing: the import and the export are kept, the
  preprocessing finds every unit done, each training stage is skipped (its
  ``chain-done.txt`` holds the same arguments), no update is logged, no trainer starts, and
  the stages' files keep their bytes and times. (A stage launched again resumes from its last
  checkpoint: ``--load`` = ``--save``, the trainer's resume tested elsewhere.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from megatron_apt.data import make_synthetic_dataset  # noqa: E402
from megatron_apt.inference.pipeline import sample_noise  # noqa: E402
from megatron_apt.testing.hooks import (  # noqa: E402
    VIDEO_START_SAME,
    engine_weights,
    max_abs_diff,
    read_weights_dump,
    video_stage_start_diffs,
)
from megatron_apt.testing.launch import REPO_ROOT, launcher_env  # noqa: E402
from megatron_apt.testing.wan_pipeline import (  # noqa: E402
    build_tiny_wan_pipeline,
    load_wan_pipeline,
)

GENERATE = REPO_ROOT / "tools" / "generate.py"
FRAMES, SIZE = 5, 16  # 4k+1 frames for Wan's causal VAE: latents [4, 2, 2, 2]
PROMPTS = ["a red circle moving left", "a blue square moving up"]
SEED = 5
# --ema-decay 0.5: the EMAs move visibly in 2 updates (the recipes' 0.995 would move them by
# ~1e-7), so "G starts from the image EMA, not from another file" is a check that can fail
TINY_TRAIN = (
    "--model wan-debug --layer-spec local --fp32 --zero-stage 2 --micro-batch-size 4 "
    "--global-batch-size 8 --train-iters 2 --log-interval 1 --ema-decay 0.5"
)
WRAPPER = """#!/usr/bin/env bash
case " $* " in
    *" --recipe wan2.1-t2v-1.3b-image-apt "*) stage=image ;;
    *" --recipe wan2.1-t2v-1.3b-video-apt "*) stage=video ;;
    *) stage= ;;
esac
# the first run of a stage only: a resumed one would overwrite its history
if [ -n "$stage" ] && [ ! -e "{dumps}/$stage" ]; then
    export MEGATRON_APT_TEST_WEIGHTS_DIR="{dumps}/$stage"
fi
port=$({python} -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); \\
print(s.getsockname()[1])")  # a free port per launch
exec {torchrun} --nproc-per-node 2 --master-port "$port" "$@"
"""


def _run_script(env: dict, rc: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "examples" / "wan_apt.sh")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout[-4000:] + "\n--- stderr ---\n" + proc.stderr[-5000:]
    assert proc.returncode == rc, log
    return proc


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan-chain")
    wan_dir = build_tiny_wan_pipeline(root / "pipe")
    media, out, dumps = root / "media", root / "out", root / "dumps"
    make_synthetic_dataset(media, 16, "video", size=SIZE, frames=FRAMES, fmt="gif", seed=3)
    launch = root / "launch.sh"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launch.write_text(WRAPPER.format(dumps=dumps, torchrun=torchrun, python=sys.executable))
    launch.chmod(0o755)
    env = launcher_env(
        {
            "BASE": str(wan_dir),
            "MEDIA": str(media),
            "OUT": str(out),
            "PYTHON": sys.executable,
            "LAUNCH": str(launch),
            "PREPROCESS_LAUNCH": sys.executable,
            "PREPROCESS_DEVICE": "cpu",
            "PREPROCESS_ARGS": "--no-progress",
            "VIDEO_BUCKET": f"{SIZE}x{SIZE}x{FRAMES}@8",
            "IMAGE_BUCKET": f"{SIZE}x{SIZE}",
            "NEGATIVE_PROMPT": "",  # WanPipeline's own default
            "TRAIN_ARGS": TINY_TRAIN,
        }
    )
    t0 = time.perf_counter()
    first = _run_script(env)
    t1 = time.perf_counter()
    print(f"first run {t1 - t0:.0f} s")
    return {"wan": wan_dir, "out": out, "dumps": dumps, "env": env, "first": first}


def test_chain_trains_every_stage_from_the_right_files(chain):
    out, proc = chain["out"], chain["first"]
    log = proc.stdout[-3000:] + "\n--- stderr ---\n" + proc.stderr[-3000:]
    assert proc.stdout.count("TRAINING-DONE rank=0 stage=consistency steps=2") == 1, log
    assert proc.stdout.count("TRAINING-DONE rank=0 stage=apt steps=2") == 2, log
    assert "holds role" not in proc.stderr, log  # every init file had the expected role
    video = json.loads((out / "video-shards" / "index.json").read_text())
    image = json.loads((out / "image-shards" / "index.json").read_text())
    assert (video["num_samples"], video["text_length"], image["num_samples"]) == (16, 512, 16)
    assert list(video["buckets"]) == ["4x2x2x2"] and list(image["buckets"]) == ["4x1x2x2"]
    # the stills are the clips' first frames: a causal VAE's first latent frame, bitwise
    v = load_file(str(out / "video-shards" / video["shards"][0]["file"]))["latents"]
    i = load_file(str(out / "image-shards" / image["shards"][0]["file"]))["latents"]
    assert torch.equal(i, v[:, :, :1]) and not torch.equal(i, v[:, :, 1:])
    # the consistency teacher's negative prompt: NEGATIVE_PROMPT="" (one EOS token)
    negative = load_file(str(out / "video-shards" / "negative_prompt.safetensors"))
    assert negative["text_mask"].sum().item() == 1


def _dump(chain, stage: str, step: int) -> dict[str, torch.Tensor]:
    history = read_weights_dump(chain["dumps"] / stage)
    assert sorted(history) == [0, 1, 2], sorted(history)
    return history[step]


def test_video_stage_starts_from_the_image_ema_and_the_diffusion_weights(chain):
    out = chain["out"]
    start, image_start = _dump(chain, "video", 0), _dump(chain, "image", 0)
    consistency = load_file(str(out / "consistency" / "consistency_ema.safetensors"))
    imported = load_file(str(out / "wan.safetensors"))
    diffs = video_stage_start_diffs(start, image_start, out / "image-apt", consistency, imported)
    print(json.dumps(diffs, indent=1))
    for name, value in diffs.items():
        if name in VIDEO_START_SAME:
            assert value == 0.0, (name, diffs)
        else:
            assert value > 1e-6, (name, diffs)
    g = engine_weights(start, "generator/model.")
    # and the video stage trained: its G moved from where it started
    final = load_file(str(out / "video-apt" / "generator.safetensors"))
    assert max_abs_diff(g, final, g) > 1e-6


def _generate(chain, checkpoint, out):
    """``tools/generate.py --steps 1`` (in this process: its imports are already paid)."""
    spec = importlib.util.spec_from_file_location("generate_wan_chain", GENERATE)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--checkpoint", checkpoint, "--text-encoder", chain["wan"], "--vae", chain["wan"]]
    argv += ["--frames", FRAMES, "--height", SIZE, "--width", SIZE, "--batch-size", 2]
    argv += [x for p in PROMPTS for x in ("--prompt", p)]
    argv += ["--seed", SEED, "--steps", 1, "--save-latents", "--output", out]
    assert tool.main([str(a) for a in argv]) == 0
    latents = load_file(str(out / "latents.safetensors"))["latents"]  # [B, C, T, H, W]
    noise = torch.stack([sample_noise(latents.shape[1:], SEED, i) for i in range(len(PROMPTS))])
    return latents, noise


def _one_step(pipe, noise):
    call = dict(height=SIZE, width=SIZE, num_frames=FRAMES, guidance_scale=1.0)
    return pipe(
        PROMPTS, num_inference_steps=1, latents=noise.clone(), output_type="latent", **call
    ).frames


def test_exported_pipeline_samples_the_video_stage_one_step(chain, tmp_path):
    out = chain["out"]
    generator = out / "video-apt" / "generator_ema.safetensors"
    ours, noise = _generate(chain, generator, tmp_path / "ours")
    pipe = load_wan_pipeline(out / "pipeline")
    latents = _one_step(pipe, noise)
    err = (latents - ours).abs().max().item()
    base = _one_step(load_wan_pipeline(chain["wan"]), noise)
    other = (base - latents).abs().max().item()
    print(f"exported WanPipeline vs generate.py: {err:.2e} (max |latents| "
          f"{latents.abs().max():.2f}); the base pipeline differs by {other:.2e}")  # fmt: skip
    assert latents.shape == ours.shape == (2, 4, 2, 2, 2)
    assert err <= 1e-4, err
    assert other > 1e-3, other  # the exported transformer is the post-trained one


def test_a_second_run_trains_nothing(chain):
    out, env = chain["out"], chain["env"]
    files = [
        out / "wan.safetensors",
        out / "consistency" / "consistency_ema.safetensors",
        out / "image-apt" / "generator_ema.safetensors",
        out / "video-apt" / "generator_ema.safetensors",
        out / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors",
    ]
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    t0 = time.perf_counter()
    second = _run_script(env)
    print(f"second run {time.perf_counter() - t0:.0f} s")
    log = second.stdout[-3000:] + "\n--- stderr ---\n" + second.stderr[-3000:]
    assert "TRAINING-DONE" not in second.stdout and "step 1/2" not in second.stdout, log
    assert second.stdout.count("done, skipped") == 3, log
    assert second.stdout.count("exists, kept") == 1 and "(newer than" in second.stdout, log
    assert second.stderr.count("0 units written, 1 already done") == 2, log
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before

    args = (out / "video-apt" / "chain-done.txt").read_text()
    assert "--recipe wan2.1-t2v-1.3b-video-apt" in args and TINY_TRAIN in args, args


def test_a_stage_that_stops_before_its_end_stops_the_chain(chain):
    """A launch that exits 0 without the stage's end-of-run export (a preempted run saves a
    checkpoint and exits 0) must not let the chain go on from older files: here the video
    stage, made to run again (its chain-done.txt removed), under a launcher that does nothing
    (``true``; preprocessing too, to keep this quick)."""
    out = chain["out"]
    (out / "video-apt" / "chain-done.txt").unlink()
    env = {**chain["env"], "LAUNCH": "true", "PREPROCESS_LAUNCH": "true"}
    proc = _run_script(env, rc=3)
    log = proc.stdout[-3000:] + "\n--- stderr ---\n" + proc.stderr[-3000:]
    assert proc.stdout.count("done, skipped") == 2 and "6/6" not in proc.stdout, log
    assert "video-apt: the run stopped before its end" in proc.stderr, log
    assert not (out / "video-apt" / "chain-done.txt").exists()
