"""The model-family registry (issue 31, phase 2): one table that everything above ``models/``
looks families up in; configs serialized with their family's name (old MMDiT files without
it still load); ``models/`` imports no checkpoint code and no DeepSpeed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_apt.checkpoint.io import check_config_matches, read_model_file, save_model_file
from megatron_apt.models.builders import build_model, build_skeleton
from megatron_apt.models.families import (
    FAMILIES,
    config_from_dict,
    config_to_dict,
    family_for_diffusers_class,
    family_of,
    get_family,
    get_preset,
)
from megatron_apt.models.mmdit import get_preset as mmdit_preset
from megatron_apt.models.wan import get_wan_preset
from megatron_apt.testing.launch import REPO_ROOT

PACKAGE = REPO_ROOT / "megatron_apt"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports in functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("layer", ["models", "stages", "parallel"])
def test_layering_rules(layer):
    """models/ never imports checkpoint/ (the builders -> io -> convert -> builders circle is
    gone); models/, stages/, parallel/ never import DeepSpeed."""
    bad = []
    for f in sorted((PACKAGE / layer).rglob("*.py")):
        for mod in imported_modules(f):
            if mod == "deepspeed" or mod.startswith("deepspeed."):
                bad.append(f"{f.relative_to(REPO_ROOT)} imports {mod}")
            if layer == "models" and mod.startswith("megatron_apt.checkpoint"):
                bad.append(f"{f.relative_to(REPO_ROOT)} imports {mod}")
    assert not bad, bad


def test_the_scan_sees_lazy_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from megatron_apt.checkpoint import io\n    import deepspeed\n")
    assert {"megatron_apt.checkpoint", "deepspeed"} <= imported_modules(f)


def test_config_imports_models_lazily():
    """config/ imports models/ only inside functions, and the MMDiT's config and planner terms
    import without torch (the training config, the recipes and tools/plan_memory.py for an
    MMDiT stay light); the family registry imports without megatron-core."""
    code = (
        "import sys\n"
        "import megatron_apt.config.fp8, megatron_apt.config.memory, megatron_apt.config.recipes\n"
        "assert not [m for m in sys.modules if m.startswith('megatron_apt.models')]\n"
        "from megatron_apt.config.recipes import get_recipe\n"
        "import megatron_apt.models.mmdit.memory\n"
        "assert type(get_recipe('mmdit-8b-video-apt').model).family == 'mmdit'\n"
        "assert 'torch' not in sys.modules and 'megatron' not in sys.modules\n"
        # pretrain_apt.py's imports (the registry, every family's config): no megatron-core, so
        # that a config error is reported in seconds; the model classes load on first use
        "import megatron_apt.models.families, megatron_apt.models.wan\n"
        "assert not [m for m in sys.modules if m.startswith(('megatron.', 'deepspeed'))]\n"
        "from megatron_apt.models.wan import WanDiT\n"
        "assert 'megatron.core' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd3", "wan-debug"])
def test_registry_counts_and_builds(preset):
    cfg = get_preset(preset)
    fam = family_of(cfg)
    model = build_model(cfg)
    assert type(model).__name__ == {"mmdit": "MMDiT", "wan": "WanDiT"}[fam.name]
    n = sum(p.numel() for p in model.parameters())
    assert (
        fam.count_parameters(cfg) == n == sum(p.numel() for p in build_skeleton(cfg).parameters())
    )
    flops = fam.forward_flops(cfg, 60, 7)
    assert flops > 0 and fam.forward_flops(cfg, 60, 7, batch=2) == 2 * flops


def test_wan_flops_match_torch_flop_counter():
    """The analytic Wan count against torch's FlopCounterMode on the debug model, exactly:
    the counter also sees the per-sample time embedding (which the formula leaves out) and
    does not see CPU SDPA (which the formula counts: 4 * queries * keys * width per layer)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_wan_preset("wan-debug")
    model = build_model(cfg)
    b, nv, nt, d = 2, 3 * 5 * 3, 7, cfg.hidden_size
    x, text = torch.randn(b, 4, 3, 10, 6), torch.randn(b, nt, cfg.text_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([0.3, 0.6]), text)
    attention = b * cfg.num_layers * 4 * d * (nv * nv + nv * nt)
    time_embed = b * 2 * (cfg.freq_dim * d + d * d + d * 6 * d)
    want = family_of(cfg).forward_flops(cfg, nv, nt, batch=b)
    assert counter.get_total_flops() == want - attention + time_embed


@pytest.mark.parametrize("name", sorted({n for f in FAMILIES.values() for n in f.presets}))
def test_every_preset_counts_on_meta(name):
    """The analytic count of every preset of every family equals its meta skeleton (the
    14B and 8B ones included: nothing allocated)."""
    cfg = get_preset(name)
    skeleton = build_skeleton(cfg)
    assert family_of(cfg).count_parameters(cfg) == sum(p.numel() for p in skeleton.parameters())


def test_preset_names_are_unique_across_families():
    names = [n for f in FAMILIES.values() for n in f.presets]
    assert len(names) == len(set(names)), names


def test_config_serialization_carries_the_family():
    for cfg in (mmdit_preset("tiny-sd3"), get_wan_preset("wan-debug")):
        d = config_to_dict(cfg)
        assert d["family"] == family_of(cfg).name
        assert config_from_dict(d) == cfg
    old = mmdit_preset("tiny").to_dict()  # written before the registry: no "family"
    assert "family" not in old and config_from_dict(old) == mmdit_preset("tiny")
    with pytest.raises(ValueError, match=r"unknown model family 'flux'; known: \['mmdit', 'wan'\]"):
        config_from_dict({**old, "family": "flux"})
    with pytest.raises(ValueError, match="unknown WanConfig fields"):
        config_from_dict({**old, "family": "wan"})
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown model family"):
        get_family("nope")


def test_unknown_diffusers_class_names_the_file():
    assert family_for_diffusers_class("WanTransformer3DModel").name == "wan"
    assert family_for_diffusers_class("SD3Transformer2DModel").name == "mmdit"
    with pytest.raises(ValueError, match=r"x/config.json: _class_name is 'FluxTransformer2DModel'"):
        family_for_diffusers_class("FluxTransformer2DModel", "x/config.json")


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def test_a_wan_model_file_round_trips_with_its_family(tmp_path):
    cfg = get_wan_preset("wan-debug")
    model = build_model(cfg)
    f = save_model_file(tmp_path / "wan.safetensors", model.state_dict(), cfg, role="diffusion")
    state, got, meta = read_model_file(f)
    assert got == cfg and '"family": "wan"' in meta["config"]
    assert all(torch.equal(state[k], v) for k, v in weights(model).items())
    with pytest.raises(ValueError, match=r"holds a 'wan' model, the model built is a 'mmdit'"):
        check_config_matches(f, got, mmdit_preset("tiny"))


def test_loading_into_a_wan_build(tmp_path):
    """The init_from path of the builders (checkpoint.model_init) goes through the registry."""
    from megatron_apt.checkpoint.model_init import build_mmdit

    cfg = get_wan_preset("wan-debug")
    src = build_model(cfg)
    f = save_model_file(tmp_path / "wan.safetensors", src.state_dict(), cfg, role="diffusion")
    torch.manual_seed(7)
    got = build_mmdit(cfg, init_from=f)
    assert all(torch.equal(weights(got)[k], v) for k, v in weights(src).items())
    with pytest.raises(ValueError, match="holds a 'wan' model"):
        build_mmdit(mmdit_preset("tiny"), init_from=f)
