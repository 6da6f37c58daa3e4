"""FP8 amax reduction group, TE's autocast name, and the flash-attn pin (issue 29, item 12).

* megatron reduces FP8 amaxes over TP x DP x CP: its TE autocast gets
  ``get_amax_reduction_group(with_context_parallel=True, tp_only_amax_red=False)``, the
  ``tp-dp-cp`` rank group (megatron-core 0.16.1 fp8_utils.py:621-629,
  extensions/transformer_engine.py:217-222, parallel_state.py:1152-1169 and :1509-1532). The
  rank lists come from megatron's own ``RankGenerator``; the group object from
  ``initialize_parallel``; the model enters TE's autocast with it.
* TE >= 2.9 names the autocast ``autocast(enabled, calibrating, recipe,
  amax_reduction_group, _graph)`` and keeps ``fp8_autocast(enabled, calibrating, fp8_recipe,
  fp8_group, _graph)`` as a deprecated wrapper (TE 2.9 transformer_engine/pytorch/
  quantization.py:756-796); TE 2.8 has only ``fp8_autocast`` (pytorch/fp8.py:646-652). Fake TE
  modules with exactly those signatures check the keyword names.
* flash-attn: TE accepts ``version_required <= flash-attn <= max_version`` and turns its flash
  backend off outside (TE attention/dot_product_attention/utils.py:116-118,
  backends.py:83-87 in 2.9, :96-100 in 2.10/2.11). The pins of setup.py and the Makefile must
  admit only versions every admitted TE accepts.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from megatron_apt.models import MMDiT
from megatron_apt.models.mmdit import get_preset
from megatron_apt.models.specs import local_spec
from megatron_apt.parallel.state import ParallelState, single_process_state
from megatron_apt.testing import dummy_inputs

ROOT = Path(__file__).resolve().parents[2]


# ---- the amax reduction group -------------------------------------------------------------
@pytest.mark.parametrize(
    "tp, cp, dp, amax, tp_cp",
    [
        (2, 1, 2, [[0, 1, 2, 3]], [[0, 1], [2, 3]]),
        (2, 2, 2, [list(range(8))], [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ],
)
def test_megatron_amax_group_spans_tp_dp_cp(tp, cp, dp, amax, tp_cp):
    """The rank lists megatron builds (initialize_model_parallel's default order)."""
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=1, cp=cp, order="tp-cp-ep-dp-pp")
    assert gen.get_ranks("tp-dp-cp") == amax  # _TENSOR_AND_DATA_PARALLEL_GROUP_WITH_CP
    assert gen.get_ranks("tp-cp") == tp_cp  # what the FP8 group was before: a part of it


def test_tp_only_amax_reduction_is_off_by_default_in_megatron():
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    assert fields["tp_only_amax_red"].default is False


@pytest.fixture
def megatron_groups():
    from megatron.core import parallel_state

    single_process_state()  # torch.distributed: a world of one
    yield parallel_state
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def test_initialize_parallel_takes_megatrons_amax_group(megatron_groups):
    from megatron_apt.parallel.state import initialize_parallel

    ps = initialize_parallel()
    want = megatron_groups.get_amax_reduction_group(with_context_parallel=True)
    assert ps.amax_group is want is megatron_groups._TENSOR_AND_DATA_PARALLEL_GROUP_WITH_CP
    assert single_process_state().amax_group is not None


# ---- TE's autocast ---------------------------------------------------------------------------
def install_fake_te(monkeypatch, new_api: bool) -> list:
    """``transformer_engine.pytorch`` with TE 2.9's ``autocast`` (and its deprecated
    ``fp8_autocast``), or TE 2.8's ``fp8_autocast`` only; returns the recorded calls."""
    calls: list = []
    te = types.ModuleType("transformer_engine")
    pt = types.ModuleType("transformer_engine.pytorch")
    common = types.ModuleType("transformer_engine.common")
    recipe_mod = types.ModuleType("transformer_engine.common.recipe")

    class Format:  # transformer_engine/common/recipe/__init__.py:23-44
        HYBRID = "HYBRID"

    @dataclasses.dataclass
    class DelayedScaling:  # recipe/__init__.py:121
        fp8_format: str = "HYBRID"
        amax_history_len: int = 1024
        amax_compute_algo: str = "max"

    recipe_mod.Format, recipe_mod.DelayedScaling = Format, DelayedScaling

    @contextlib.contextmanager
    def fp8_autocast(
        enabled=True, calibrating=False, fp8_recipe=None, fp8_group=None, _graph=False
    ):
        if new_api:  # TE >= 2.9: deprecated (quantization.py:756-786), must not be used
            raise AssertionError("called the deprecated fp8_autocast")
        calls.append(("fp8_autocast", enabled, fp8_recipe, fp8_group))
        yield

    @contextlib.contextmanager
    def autocast(
        enabled=True, calibrating=False, recipe=None, amax_reduction_group=None, _graph=False
    ):
        calls.append(("autocast", enabled, recipe, amax_reduction_group))
        yield

    pt.fp8_autocast = fp8_autocast
    if new_api:
        pt.autocast = autocast
    te.pytorch, te.common, common.recipe = pt, common, recipe_mod
    for name, mod in (
        ("transformer_engine", te),
        ("transformer_engine.pytorch", pt),
        ("transformer_engine.common", common),
        ("transformer_engine.common.recipe", recipe_mod),
    ):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def fp8_spec():
    """The local kernels flagged as TE FP8 (the autocast decisions of ``te-fp8``, on CPU)."""
    return dataclasses.replace(local_spec(), name="te-fp8-like", uses_te=True, fp8=True)


@pytest.mark.parametrize("new_api", [True, False])
def test_layer_spec_autocast_uses_the_te_api_present(monkeypatch, new_api):
    calls = install_fake_te(monkeypatch, new_api)
    group = object()
    with fp8_spec().autocast(group):
        pass
    (name, enabled, recipe, got_group), *rest = calls
    assert not rest and enabled is True and got_group is group
    assert name == ("autocast" if new_api else "fp8_autocast")
    assert (recipe.fp8_format, recipe.amax_history_len, recipe.amax_compute_algo) == (
        "HYBRID", 1024, "max",
    )  # fmt: skip
    assert isinstance(local_spec().autocast(group), contextlib.nullcontext)  # BF16 / local


def test_model_enters_autocast_with_the_amax_group(monkeypatch):
    calls = install_fake_te(monkeypatch, new_api=True)
    sentinel = object()  # only TE's autocast (faked) ever sees it
    ps = dataclasses.replace(single_process_state(), amax_group=sentinel)
    model = MMDiT(get_preset("tiny"), ps=ps, spec=fp8_spec())
    with torch.no_grad():
        model(**dummy_inputs(model.cfg, batch=2, height=8, width=8))  # 32 FP8 GEMM rows
    assert [c[3] for c in calls] == [sentinel]
    assert ParallelState.__dataclass_fields__["amax_group"].default is None


# ---- flash-attn pins --------------------------------------------------------------------------
# TE minor -> (version_required, max_version) of flash-attn 2 (Hopper; Blackwell needs >= 2.7.3)
TE_FLASH_RANGE = {
    "2.9": ("2.1.1", "2.8.1"),  # TE v2.9 attention/dot_product_attention/utils.py:116-118
    "2.10": ("2.1.1", "2.8.3"),  # TE v2.10 utils.py:116-118
    "2.11": ("2.1.1", "2.8.3"),  # TE v2.11 utils.py:116-118
}
BLACKWELL_MIN = "2.7.3"  # version_required_blackwell, utils.py:117 in 2.9-2.11
# flash-attn versions to try the pin on
FLASH_RELEASES = ["2.6.3", "2.7.0.post2", "2.7.2.post1", "2.7.3", "2.7.4.post1", "2.8.0.post2",
                  "2.8.1", "2.8.2", "2.8.3", "2.9.0"]  # fmt: skip


def gpu_extra() -> dict[str, SpecifierSet]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    extras = next(
        ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "EXTRAS"
    )
    pins = {}
    for req in extras["gpu"]:
        name, spec = re.fullmatch(r"([a-z-]+)(?:\[\w+\])?(.*)", req).groups()
        pins[name] = SpecifierSet(spec)
    return pins


def test_flash_attn_pin_is_what_every_pinned_te_accepts():
    pins = gpu_extra()
    te_versions = [v for v in TE_FLASH_RANGE if Version(f"{v}.0") in pins["transformer-engine"]]
    assert te_versions == ["2.9", "2.10", "2.11"]  # megatron-core 0.16.1's TE range
    admitted = [v for v in FLASH_RELEASES if Version(v) in pins["flash-attn"]]
    assert admitted, "the flash-attn pin admits no release"
    for te in te_versions:
        lo, hi = (Version(v) for v in TE_FLASH_RANGE[te])
        lo = max(lo, Version(BLACKWELL_MIN))  # the floor on every GPU TE supports
        bad = [v for v in admitted if not lo <= Version(v) <= hi]
        assert not bad, f"TE {te} refuses flash-attn {bad} (it accepts {lo}..{hi})"


def test_makefile_installs_the_setup_pins():
    line = re.search(r"^GPU_PKGS := (.*)$", (ROOT / "Makefile").read_text(), re.M)[1]
    make = {}
    for req in re.findall(r'"([^"]+)"', line):
        name, spec = re.fullmatch(r"([a-z-]+)(?:\[\w+\])?(.*)", req).groups()
        make[name] = SpecifierSet(spec)
    assert make == gpu_extra()
