"""tools/generate.py with the DiT tensor-parallel over 2 gloo processes under torchrun writes the
same samples as one process: every rank loads its TP shard of the TP=1 model file, draws the
same per-sample noise and gets rank 0's text embeddings; rank 0 decodes and writes."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_apt.checkpoint.io import save_model_file
from megatron_apt.config import get_preset
from megatron_apt.data.media import read_frames
from megatron_apt.models import MMDiT
from megatron_apt.testing import randomize_parameters
from megatron_apt.testing.launch import REPO_ROOT, run_launcher
from megatron_apt.text import build_tiny_text_encoder
from megatron_apt.vae import build_tiny_vae

WORKER = Path(__file__).with_name("generate_tp_worker.py")
PROMPTS = ["a red circle moving left", "a blue square spinning", "a green star"]


def load_tool():
    spec = importlib.util.spec_from_file_location("generate_tool", REPO_ROOT / "tools/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate_tp")
    cfg = get_preset("tiny")
    model = MMDiT(cfg)
    randomize_parameters(model, seed=11)
    args = ["--checkpoint", save_model_file(root / "g.safetensors", model.state_dict(), cfg)]
    args += ["--text-encoder", build_tiny_text_encoder(root / "t5"), "--max-text-length", "16"]
    args += ["--vae", build_tiny_vae(root / "vae", "video"), "--frames", "5"]
    args += ["--height", "16", "--width", "16", "--batch-size", "2", "--save-latents"]
    args = [str(a) for a in args] + [a for p in PROMPTS for a in ("--prompt", p)]
    assert load_tool().main([*args, "--output", str(root / "tp1")]) == 0
    run_launcher(
        WORKER,
        [*args, "--output", str(root / "tp2")],
        nproc=2,
        launcher="torchrun",
        marker="GENERATE-TP-DONE",
    )
    return root / "tp1", root / "tp2"


def test_tp2_writes_the_samples_of_tp1(runs):
    ref, tp = runs
    summaries = [json.loads((d / "summary.json").read_text()) for d in runs]
    assert [s["tensor_parallel_size"] for s in summaries] == [1, 2]
    assert summaries[0]["samples"] == summaries[1]["samples"]
    lat_ref, lat_tp = (load_file(str(d / "latents.safetensors"))["latents"] for d in runs)
    assert lat_ref.shape == (3, 4, 2, 4, 4) and lat_ref.abs().max() > 0.1
    torch.testing.assert_close(lat_tp, lat_ref, rtol=0, atol=1e-5)  # fp32 round-off
    for rec in summaries[0]["samples"]:
        a, b = (read_frames(d / rec["files"][0]).astype(int) for d in runs)
        assert a.shape == (5, 16, 16, 3) and a.std() > 0
        assert np.abs(a - b).max() <= 1, rec


def test_only_rank0_writes(runs):
    _, tp = runs
    names = sorted(p.name for p in tp.iterdir())
    assert names == sorted(
        ["latents.safetensors", "summary.json"]
        + [f"{i:04d}-{'-'.join(p.split())}.mp4" for i, p in enumerate(PROMPTS)]
    )
