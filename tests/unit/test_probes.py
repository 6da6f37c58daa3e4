"""The conditioning probes (megatron_apt/evaluation/probes.py, tools/probe_conditioning.py).

* a model without temporal positions (an MMDiT with ``pos_embed="none"``) is equivariant to
  every frame permutation to round-off; the same model with 3D RoPE, and a Wan model, are not:
  the probe can tell the two apart;
* a model whose text is zeroed loses exactly nothing when a caption word is swapped (every
  ratio 1); the same model with its text changes its loss for each of the three attributes;
* captions outside the demo's vocabulary are refused, naming one;
* the tool end to end on shards made by tools/preprocess_data.py (identity VAE, a tiny T5) and
  a saved model file: its JSON has every timestep and attribute; a text encoder of another
  width is refused naming both paths.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest
import torch

from megatron_apt.checkpoint.io import save_model_file
from megatron_apt.data import make_synthetic_dataset
from megatron_apt.evaluation.probes import (
    caption_swap_losses,
    caption_variants,
    frame_permutation_errors,
)
from megatron_apt.models.builders import build_model
from megatron_apt.models.families import get_preset
from megatron_apt.testing.fixtures import randomize_parameters
from megatron_apt.testing.launch import REPO_ROOT
from megatron_apt.text import build_tiny_text_encoder

CAPTIONS = [
    "a red circle moving left",
    "a blue square moving up",
    "a green triangle moving right",
    "a yellow circle moving down",
    "a purple square moving left",
    "an orange triangle moving up",
]


def _model(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(get_preset(name, **overrides)).eval()
    with torch.no_grad():
        randomize_parameters(model, seed=1, std=0.2)  # no zero-initialised output layer
    return model


def _word_encoder(dim: int = 32, length: int = 8):
    """Captions -> fixed random embeddings per word (a deterministic stand-in for T5)."""

    def vec(word: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
        return torch.randn(dim, generator=torch.Generator().manual_seed(seed))

    def encode(captions):
        text = torch.zeros(len(captions), length, dim)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for i, c in enumerate(captions):
            for j, w in enumerate(c.split()[:length]):
                text[i, j], mask[i, j] = vec(w), True
        return text, mask

    return encode


def test_frame_permutations_tell_models_with_and_without_temporal_positions():
    shape, text = (4, 5, 4, 4), (6, 32)
    blind = frame_permutation_errors(_model("tiny", pos_embed="none"), shape, text, True)
    rope = frame_permutation_errors(_model("tiny"), shape, text, True)
    wan = frame_permutation_errors(_model("wan-debug"), shape, text, False)
    print(blind, rope, wan)
    assert set(blind) == {"reverse", "swap first two", "roll by one"}
    assert max(blind.values()) < 1e-5, blind
    assert min(rope.values()) > 1e-3, rope
    assert min(wan.values()) > 1e-3, wan
    with pytest.raises(ValueError, match="T >= 2"):
        frame_permutation_errors(_model("tiny"), (4, 1, 4, 4), text, True)


class _TextBlind(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t, text, mask=None):
        return self.inner(x, t, torch.zeros_like(text), mask)


def test_caption_swaps_cost_nothing_only_when_the_text_is_ignored():
    model = _model("tiny")
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(len(CAPTIONS), 4, 3, 4, 4, generator=g)
    encode = _word_encoder()
    kw = dict(timesteps=(0.3, 0.8), batch_size=4)
    used = caption_swap_losses(model, latents, CAPTIONS, encode, **kw)
    blind = caption_swap_losses(_TextBlind(model), latents, CAPTIONS, encode, **kw)
    assert sorted(used) == [0.3, 0.8]
    for t in used:
        assert set(used[t]) == {"true", "motion", "colour", "shape"}
        for k in ("motion", "colour", "shape"):
            assert blind[t][k] == blind[t]["true"], (t, k, blind[t])
            assert abs(used[t][k] / used[t]["true"] - 1) > 1e-3, (t, k, used[t])


def test_captions_outside_the_vocabulary_are_refused():
    variants = caption_variants(CAPTIONS)
    assert variants["motion"][0] == "a red circle moving right"
    assert variants["colour"][0] == "a green circle moving left"
    assert variants["shape"][0] == "a red square moving left"
    with pytest.raises(ValueError, match="not the demo's .*a cat on a mat"):
        caption_variants(["a cat on a mat", "a dog"])


def _tool(name: str = "probe_conditioning"):
    """``tools/<name>.py`` as a module (its ``main`` in this process: imports already paid)."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_tool", REPO_ROOT / "tools" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_end_to_end_on_preprocessed_shards(tmp_path, capsys):
    media = tmp_path / "media"
    make_synthetic_dataset(media, 6, "video", size=16, frames=3, fmt="gif", seed=2)
    t5 = build_tiny_text_encoder(tmp_path / "t5")
    shards = tmp_path / "shards"
    pre = _tool("preprocess_data")
    argv = ["--input", media, "--output", shards, "--text-encoder", t5, "--vae", "identity:2"]
    argv += ["--bucket", "16x16x3@8", "--max-text-length", 8, "--no-progress"]
    assert pre.main([str(a) for a in argv + ["--dtype", "float32"]]) == 0
    model = _model("tiny", in_channels=12, out_channels=12)
    ckpt = save_model_file(tmp_path / "model.safetensors", model.state_dict(), model.cfg)
    out = tmp_path / "probe.json"
    common = ["--checkpoint", ckpt, "--shards", shards, "--max-text-length", 8]
    argv = [*common, "--text-encoder", t5, "--timesteps", 0.5, 0.9, "--output", out]
    assert _tool().main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "motion x" in printed and "reverse" in printed, printed
    res = json.loads(out.read_text())
    assert res["model"] == "MMDiT" and res["num_samples"] == 6
    assert sorted(res["caption_swap_ratios"]) == ["0.5", "0.9"]
    assert set(res["caption_swap_ratios"]["0.5"]) == {"motion", "colour", "shape"}
    assert min(res["frame_permutation_errors"].values()) > 1e-3
    # a text encoder of another width than the shards'
    wide = build_tiny_text_encoder(tmp_path / "t5-wide", d_model=48)
    with pytest.raises(SystemExit, match="width 48.*width 32"):
        _tool().main([str(a) for a in [*common, "--text-encoder", wide]])
