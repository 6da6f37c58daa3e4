"""Wan2.1 checkpoint conversion (issue 31, phase 2; one process, CPU, fp32): a tiny random
diffusers ``WanTransformer3DModel`` saved with ``save_pretrained`` (one file and sharded, and
as a pipeline's ``transformer/``) imports into our formats with diffusers' velocity, exports
back to a directory ``WanTransformer3DModel.from_pretrained`` loads with an identical state
dict, and reshards TP 2 -> 1 -> 2 exactly; the family comes from ``config.json``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_apt.checkpoint import convert, load_mmdit
from megatron_apt.checkpoint.diffusers_dir import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from megatron_apt.models.wan import WanDiT, get_wan_preset
from megatron_apt.testing.wan_ref import tiny_wan_transformer

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """(reference model, pipeline root with transformer/, a sharded copy of transformer/)."""
    ref = tiny_wan_transformer(get_wan_preset("wan-debug"))
    root = tmp_path_factory.mktemp("wan") / "Wan2.1-tiny"
    ref.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    sharded = root.parent / "sharded"
    ref.save_pretrained(sharded, max_shard_size="50KB")
    return ref, root, sharded


def velocity_diff(ours, ref) -> tuple[float, float]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 10, 6, generator=g)  # a 3 x 5 x 3 token grid
    text, t = torch.randn(2, 7, 32, generator=g), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v_ref = ref(hidden_states=x, timestep=t * 1000, encoder_hidden_states=text).sample
        v = ours(x, t, text)
    return (v - v_ref).abs().max().item(), v_ref.abs().max().item()


def test_import_pipeline_root_transformer_and_shards(wan, tmp_path):
    ref, root, sharded = wan
    assert (sharded / WEIGHTS_INDEX_NAME).is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    out = convert.import_diffusers(root, tmp_path / "wan.safetensors")
    state, cfg, meta = convert.read_checkpoint(out)
    assert cfg == get_wan_preset("wan-debug") and meta["role"] == "diffusers"
    for source in (sharded, root / "transformer"):
        other = convert.read_checkpoint(source)[0]
        assert set(other) == set(state) and all(torch.equal(other[k], state[k]) for k in state)
    for source in (out, root, sharded):
        model = load_mmdit(source)
        assert isinstance(model, WanDiT)
        diff, scale = velocity_diff(model, ref)
        print(f"Wan velocity from {source.name}: max |diff| {diff:.2e} (max |v| {scale:.2f})")
        assert scale > 0.5 and diff < 1e-5


def test_export_round_trip_is_exact(wan, tmp_path, monkeypatch):
    from diffusers import WanTransformer3DModel

    # Without `accelerate` (not installed here) diffusers 0.42.1 refuses any class with
    # _keep_in_fp32_modules (modeling_utils.py:1081 sets low_cpu_mem_usage=False, :1231
    # raises); the fp32 islands only matter when loading in another dtype: fp32 here.
    monkeypatch.setattr(WanTransformer3DModel, "_keep_in_fp32_modules", None)
    ref, root, _ = wan
    tp2 = convert.import_diffusers(root, tmp_path / "tp2", tp_size=2)
    out = convert.export_diffusers(tp2, tmp_path / "back")
    back = WanTransformer3DModel.from_pretrained(out).eval()
    a, b = ref.state_dict(), back.state_dict()
    assert set(a) == set(b)
    unequal = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not unequal, unequal
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(ref.config)
    assert json.loads((out / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    assert set(load_file(str(out / WEIGHTS_NAME))) == set(a)


def test_reshard_round_trip_2_1_2(wan, tmp_path):
    _, root, _ = wan
    first = convert.import_diffusers(root, tmp_path / "a-tp2", tp_size=2)
    one = convert.reshard(first, tmp_path / "b.safetensors", 1)
    second = convert.reshard(one, tmp_path / "c-tp2", 2)
    for r in range(2):
        x, y = (load_file(str(p / convert.shard_name(r))) for p in (first, second))
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
    index = json.loads((second / convert.SHARDED_INDEX).read_text())
    assert index["config"]["family"] == "wan"
    dims = {k: v["partition_dim"] for k, v in index["tensors"].items()}
    assert dims["blocks.0.self_attn.qkv.weight"] == 0 and dims["blocks.0.cross_attn.kv.bias"] == 0
    assert dims["blocks.0.fc2.weight"] == 1 and dims["blocks.0.scale_shift_table"] is None
    assert dims["blocks.1.self_attn.q_norm.weight"] == 0  # the across-heads RMSNorm: split
    info = convert.inspect(second)
    assert info["family"] == "wan" and info["tp_layout"]["tp_size"] == 2
    assert info["num_parameters"] == WanDiT(get_wan_preset("wan-debug")).num_parameters()
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by TP=3"):
        convert.reshard(one, tmp_path / "d-tp3", 3)


def test_cli(wan, tmp_path, capsys):
    import importlib.util

    from megatron_apt.testing.launch import REPO_ROOT

    spec = importlib.util.spec_from_file_location("cc", REPO_ROOT / "tools/convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    _, root, _ = wan
    argv = ["import-diffusers", "--input", str(root), "--output", str(tmp_path / "ck")]
    assert tool.main([*argv, "--tensor-model-parallel-size", "2"]) == 0
    capsys.readouterr()
    assert tool.main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "tp-sharded checkpoint, role diffusers, wan" in out and "ffn 96" in out
    argv = ["export-diffusers", "--input", str(tmp_path / "ck"), "--output", str(tmp_path / "o")]
    assert tool.main(argv) == 0 and (tmp_path / "o" / "config.json").is_file()


# ---- bad inputs: a clear error naming the file / key, nothing written -------------------


def copy_dir(src, dst, config=None, drop=()):
    dst.mkdir()
    config = config or json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config))
    sd = load_file(str(src / WEIGHTS_NAME))
    save_file({k: v for k, v in sd.items() if k not in drop}, str(dst / WEIGHTS_NAME))
    return dst


def test_unknown_class_is_named_with_its_file(wan, tmp_path):
    _, root, _ = wan
    config = json.loads((root / "transformer" / "config.json").read_text())
    bad = copy_dir(root / "transformer", tmp_path / "i2v", {**config, "_class_name": "WanVACE"})
    with pytest.raises(ValueError, match=rf"{bad}/config.json: _class_name is 'WanVACE'"):
        convert.import_diffusers(bad, tmp_path / "out")
    del config["_class_name"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{bad}/config.json has no _class_name"):
        convert.import_diffusers(bad, tmp_path / "out")
    i2v = copy_dir(root / "transformer", tmp_path / "i2v2", {**config, "_class_name":
                   "WanTransformer3DModel", "image_dim": 1280})  # fmt: skip
    with pytest.raises(ValueError, match=rf"{i2v}/config.json: image-to-video fields"):
        convert.import_diffusers(i2v, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_tensor_is_named(wan, tmp_path):
    _, root, _ = wan
    key = "blocks.1.attn2.norm_k.weight"
    bad = copy_dir(root / "transformer", tmp_path / "bad", drop=(key,))
    with pytest.raises(ValueError, match=rf"weights vs its config.json.*missing keys \['{key}'\]"):
        convert.import_diffusers(bad, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_sd3_only_exports_refuse_a_wan_model(wan, tmp_path):
    from megatron_apt.checkpoint.pipeline_export import export_diffusers_pipeline
    from megatron_apt.models.mmdit.diffusers_mapping import mmdit_to_sd3_config

    _, root, _ = wan
    f = convert.import_diffusers(root, tmp_path / "wan.safetensors")
    # the pipeline export writes a WanPipeline for a Wan model (test_generate_wan.py)
    with pytest.raises(ValueError, match=r"no-base is not a Wan pipeline directory"):
        export_diffusers_pipeline(f, tmp_path / "no-base", tmp_path / "pipe")
    with pytest.raises(ValueError, match="a WanConfig has no diffusers SD3Transformer2DModel"):
        mmdit_to_sd3_config(get_wan_preset("wan-debug"))
    assert not (tmp_path / "pipe").exists()


def test_bf16_load_keeps_the_fp32_islands(wan):
    """``load_mmdit(dtype=bf16)`` keeps the parameters diffusers keeps in fp32 (time embedder,
    modulation tables, cross-attention LayerNorm: ``_keep_in_fp32_modules``) in fp32 and the
    rest in bf16; its velocity equals a bf16 model built directly and loaded alike."""
    ref, root, _ = wan
    model = load_mmdit(root, dtype=torch.bfloat16)
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    want = {
        n
        for n, _ in model.named_parameters()
        if n.startswith("time_embed.") or "scale_shift_table" in n or ".cross_norm." in n
    }
    assert fp32 == want and want, sorted(fp32 ^ want)[:6]
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in want)
    direct = WanDiT(get_wan_preset("wan-debug"), params_dtype=torch.bfloat16)
    direct.load_state_dict(load_mmdit(root).state_dict())  # copies into each param's dtype
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 4, 1, 4, 6, generator=g), torch.randn(1, 5, 32, generator=g)
    t = torch.tensor([0.5])
    with torch.no_grad():
        v, v_direct = (
            model(x.bfloat16(), t, text.bfloat16()),
            direct(x.bfloat16(), t, text.bfloat16()),
        )
    assert torch.equal(v, v_direct)
