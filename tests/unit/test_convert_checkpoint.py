"""Checkpoint conversion (one process): a tiny random diffusers SD3 transformer imported into our
formats gives diffusers' velocity; exported back it loads in diffusers with every tensor equal;
resharding round-trips exactly; bad inputs fail with the file or key named and write nothing."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatron_apt.checkpoint import convert, load_mmdit
from megatron_apt.checkpoint.diffusers_sd3 import WEIGHTS_NAME
from megatron_apt.checkpoint.io import save_model_file
from megatron_apt.models import MMDiT
from megatron_apt.models.mmdit import get_preset
from megatron_apt.testing.diffusers_ref import tiny_sd3_transformer
from megatron_apt.testing.launch import REPO_ROOT

pytest.importorskip("diffusers")

TOOL = REPO_ROOT / "tools" / "convert_checkpoint.py"


def tiny_sd3(qk_norm="rms_norm", dual=()):
    """The diffusers tester-size SD3 transformer with every weight randomized."""
    return tiny_sd3_transformer(qk_norm, dual, randomize=True)


def sd3_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 10, generator=g)  # [B, C, H, W]
    text, pooled = torch.randn(2, 7, 32, generator=g), torch.randn(2, 24, generator=g)
    return x, text, pooled, torch.tensor([0.25, 0.9])


def velocity_diff(ours, ref) -> tuple[float, float]:
    x, text, pooled, sigma = sd3_inputs()
    with torch.no_grad():
        v_ref = ref(
            hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
            timestep=sigma * 1000,
        ).sample  # fmt: skip
        v = ours(x[:, :, None], sigma, text, None, pooled)[:, :, 0]
    return (v - v_ref).abs().max().item(), v_ref.abs().max().item()


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    model = tiny_sd3()
    d = tmp_path_factory.mktemp("sd3") / "transformer"
    model.save_pretrained(d)
    return model, d


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def no_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp" in p.name or ".old" in p.name)


def test_import_tp1_velocity_matches_diffusers(sd3, tmp_path):
    ref, d = sd3
    out = convert.import_diffusers(d, tmp_path / "sd3.safetensors")
    sharded = d.parent / "sharded-weights"  # diffusers' own sharded layout (index json)
    ref.save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert max_diff(convert.read_checkpoint(sharded)[0], convert.read_checkpoint(d)[0]) == 0
    # the imported file, the diffusers directory directly, a pipeline root (transformer/)
    for source in (out, d, d.parent):
        model = load_mmdit(source)
        diff, scale = velocity_diff(model, ref)
        print(f"TP=1 velocity from {source.name}: max |diff| {diff:.2e} (max |v| {scale:.2f})")
        assert scale > 0.1 and diff < 1e-5


def test_export_diffusers_round_trip_is_exact(sd3, tmp_path):
    from diffusers import SD3Transformer2DModel

    ref, d = sd3
    convert.import_diffusers(d, tmp_path / "tp2", tp_size=2)
    out = convert.export_diffusers(tmp_path / "tp2", tmp_path / "back")
    back = SD3Transformer2DModel.from_pretrained(out).eval()
    a, b = ref.state_dict(), back.state_dict()
    assert set(a) == set(b) and "pos_embed.pos_embed" in a
    unequal = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not unequal, unequal
    assert set(load_file(str(out / WEIGHTS_NAME))) == set(load_file(str(d / WEIGHTS_NAME)))
    assert json.loads((out / "config.json").read_text())["_class_name"] == "SD3Transformer2DModel"
    assert velocity_diff(load_mmdit(out), ref)[0] < 1e-5


def test_reshard_round_trip_2_1_2(sd3, tmp_path):
    _, d = sd3
    first = convert.import_diffusers(d, tmp_path / "a-tp2", tp_size=2)
    one = convert.reshard(first, tmp_path / "b.safetensors", 1)
    second = convert.reshard(one, tmp_path / "c-tp2", 2)
    for r in range(2):
        x, y = (load_file(str(p / convert.shard_name(r))) for p in (first, second))
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
    split = {k for k, v in json.loads((second / convert.SHARDED_INDEX).read_text())[
        "tensors"].items() if v["partition_dim"] is not None}  # fmt: skip
    assert "blocks.0.visual.qkv.weight" in split and "blocks.0.visual.adaln.weight" not in split
    info = convert.inspect(second)
    assert info["tp_layout"]["tp_size"] == 2
    assert info["num_parameters"] == MMDiT(info_cfg(info)).num_parameters()


def info_cfg(info):
    from megatron_apt.models.families import config_from_dict

    return config_from_dict(info["config"])


# ---- bad inputs: a clear error naming the file / key, nothing written -------------------


def test_dual_attention_is_refused(tmp_path):
    d = tmp_path / "sd35m"
    tiny_sd3(dual=(0,)).save_pretrained(d)
    with pytest.raises(ValueError, match="dual_attention_layers"):
        convert.import_diffusers(d, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


def test_missing_key_is_named(sd3, tmp_path):
    _, d = sd3
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((d / "config.json").read_text())
    sd = load_file(str(d / WEIGHTS_NAME))
    del sd["transformer_blocks.1.attn.add_k_proj.bias"]
    save_file(sd, str(bad / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn\.add_k_proj\.bias"):
        convert.import_diffusers(bad, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists() and not no_leftovers(tmp_path)


def test_corrupt_safetensors_is_named(sd3, tmp_path):
    _, d = sd3
    out = convert.import_diffusers(d, tmp_path / "tp2", tp_size=2)
    shard = out / convert.shard_name(1)
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match="tp_rank_01.safetensors"):
        convert.reshard(out, tmp_path / "re", 1)
    with pytest.raises(ValueError, match="tp_rank_01.safetensors"):
        load_mmdit(out)
    assert not (tmp_path / "re").exists() and not no_leftovers(tmp_path)


def test_other_architecture_is_refused(sd3, tmp_path):
    _, d = sd3
    # a model file whose tensors belong to another config (rope3d tiny vs the SD3 weights)
    state, _, _ = convert.read_checkpoint(d)
    f = save_model_file(tmp_path / "wrong.safetensors", state, get_preset("tiny"))
    with pytest.raises(ValueError, match=r"unexpected keys \['pooled_embed"):
        load_mmdit(f)
    # a diffusers directory whose config.json disagrees with its weights
    bad = tmp_path / "three-layers"
    bad.mkdir()
    config = json.loads((d / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    (bad / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match=r"transformer_blocks\.2\."):
        convert.import_diffusers(bad, tmp_path / "x.safetensors")
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        convert.import_diffusers(flux, tmp_path / "y.safetensors")
    # a rope3d video model has no diffusers equivalent
    g = save_model_file(tmp_path / "video.safetensors", MMDiT(get_preset("tiny")).state_dict(),
                        get_preset("tiny"))  # fmt: skip
    with pytest.raises(ValueError, match="pos_embed='rope3d'"):
        convert.export_diffusers(g, tmp_path / "video-diffusers")
    assert not (tmp_path / "video-diffusers").exists() and not no_leftovers(tmp_path)


def test_existing_output_needs_overwrite(sd3, tmp_path):
    _, d = sd3
    out = convert.import_diffusers(d, tmp_path / "m.safetensors")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert.import_diffusers(d, out)
    convert.import_diffusers(d, tmp_path / "dir", tp_size=2)
    convert.import_diffusers(d, tmp_path / "dir", tp_size=4, overwrite=True)
    assert convert.read_sharded_index(tmp_path / "dir")["tp_size"] == 4
    assert not no_leftovers(tmp_path)


def load_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_cli(sd3, tmp_path, capsys):
    _, d = sd3
    tool = load_tool()
    argv = ["import-diffusers", "--input", d, "--output", tmp_path / "ck"]
    assert tool.main([*map(str, argv), "--tensor-model-parallel-size", "2"]) == 0
    capsys.readouterr()
    assert tool.main(["inspect", str(tmp_path / "ck"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "tp-sharded" and info["tp_layout"]["tp_size"] == 2
    assert info["tensors"]["patch_embed.weight"]["shape"] == [64, 16]
    assert info["tp_layout"]["split"]["blocks.1.visual.fc2.weight"] == 1
    argv = ["export-diffusers", "--input", tmp_path / "nowhere", "--output", tmp_path / "o"]
    assert tool.main(list(map(str, argv))) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # the script itself, as a user runs it
    p = subprocess.run(
        [sys.executable, str(TOOL), "inspect", str(tmp_path / "ck")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "tp-sharded checkpoint, role sd3" in p.stdout and "split dim 0" in p.stdout


class NoLargeAllocations(TorchDispatchMode):
    """Fails any torch op that returns a real (non-meta) tensor above ``limit`` bytes."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                size = t.numel() * t.element_size()
                assert size <= self.limit, f"{func} allocated {size / 2**20:.0f} MiB"
        return out


def test_a_config_implied_tensor_the_weights_lack_is_refused_first(sd3, tmp_path):
    """Issue 31 item 3: a 1 MB SD3 directory whose config.json claims pos_embed_max_size
    1600 and whose weights lack pos_embed.pos_embed used to load by building the table
    (1600^2 positions x hidden); now the missing tensor is named, from the safetensors
    headers, before any large allocation (the Wan case: test_convert_wan.py)."""
    _, d = sd3
    bad = tmp_path / "claims-1600"
    bad.mkdir()
    config = json.loads((d / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "pos_embed_max_size": 1600}))
    sd = load_file(str(d / WEIGHTS_NAME))
    del sd["pos_embed.pos_embed"]
    save_file(sd, str(bad / WEIGHTS_NAME))
    assert (bad / WEIGHTS_NAME).stat().st_size < 2 * 2**20  # the table: 1600^2 x 64 x 4 B
    with NoLargeAllocations(limit=16 << 20):
        with pytest.raises(ValueError, match=r"missing keys \['pos_embed\.pos_embed'\]"):
            convert.import_diffusers(bad, tmp_path / "out.safetensors")
        with pytest.raises(ValueError, match=rf"{bad} \(weights vs its config.json\)"):
            load_mmdit(bad)
    assert not (tmp_path / "out.safetensors").exists()
    # the guard itself sees such a table being built (a small one against a smaller limit)
    from megatron_apt.models.embeddings import sincos_2d_table

    with pytest.raises(AssertionError, match="allocated"), NoLargeAllocations(limit=1 << 20):
        sincos_2d_table(64, 160)
