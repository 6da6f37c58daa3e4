"""tools/generate.py with the DiT tensor-parallel (or context-parallel) over 2 gloo processes
under torchrun writes the same samples as one process: every rank loads its TP shard of the
TP=1 model file, draws the same per-sample noise and gets rank 0's text embeddings; rank 0
decodes and writes."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_apt.checkpoint.io import save_model_file
from megatron_apt.data.media import read_frames
from megatron_apt.models import MMDiT
from megatron_apt.models.mmdit import get_preset
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
    for name, extra in (("tp2", []), ("cp2", ["--context-parallel-size", "2"])):
        run_launcher(
            WORKER,
            [*args, *extra, "--output", str(root / name)],
            nproc=2,
            launcher="torchrun",
            marker="GENERATE-TP-DONE",
        )
    return root / "tp1", root / "tp2", root / "cp2"


@pytest.mark.parametrize(("which", "layout"), [(1, (2, 1)), (2, (1, 2))], ids=["tp2", "cp2"])
def test_parallel_run_writes_the_samples_of_one_process(runs, which, layout):
    """TP=2, and context parallel 2 (tokens split, Ulysses all-to-all), against 1 process."""
    pair = (runs[0], runs[which])
    summaries = [json.loads((d / "summary.json").read_text()) for d in pair]
    got = [(s["tensor_parallel_size"], s["context_parallel_size"]) for s in summaries]
    assert got == [(1, 1), layout]
    assert summaries[0]["samples"] == summaries[1]["samples"]
    lat_ref, lat_par = (load_file(str(d / "latents.safetensors"))["latents"] for d in pair)
    assert lat_ref.shape == (3, 4, 2, 4, 4) and lat_ref.abs().max() > 0.1
    torch.testing.assert_close(lat_par, lat_ref, rtol=0, atol=1e-5)  # fp32 round-off
    for rec in summaries[0]["samples"]:
        a, b = (read_frames(d / rec["files"][0]).astype(int) for d in pair)
        assert a.shape == (5, 16, 16, 3) and a.std() > 0
        assert np.abs(a - b).max() <= 1, rec


@pytest.mark.parametrize("which", [1, 2], ids=["tp2", "cp2"])
def test_only_rank0_writes(runs, which):
    tp = runs[which]
    names = sorted(p.name for p in tp.iterdir())
    assert names == sorted(
        ["latents.safetensors", "summary.json"]
        + [f"{i:04d}-{'-'.join(p.split())}.mp4" for i, p in enumerate(PROMPTS)]
    )
