"""A model file's header is data from whoever wrote the file (issue 16, item 5): its config is
checked before anything is built from it. Hostile or broken headers get one ``ValueError``
naming the file and the field, fast and without allocating what they claim (before: a
``pos_embed_max_size`` of 1500 took 2.6 GB and 32 s from a 1 MB file, 1e6 asked for 256 TB;
no config / zero heads / a string width gave KeyError / ZeroDivisionError / TypeError)."""

from __future__ import annotations

import json
import time

import pytest
from safetensors.torch import save_file

from megatron_apt.checkpoint import load_mmdit
from megatron_apt.checkpoint.io import FORMAT, FORMAT_VERSION, read_model_file
from megatron_apt.models import MMDiT
from megatron_apt.models.mmdit import get_preset


def write(path, cfg_dict=None, meta_over=None, state=None):
    cfg = get_preset("tiny-sd3")  # sincos2d: the case with the position table
    state = state if state is not None else MMDiT(cfg).state_dict()
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "role": "diffusion",
            "extra": "{}"}  # fmt: skip
    if cfg_dict is not False:
        meta["config"] = json.dumps({**cfg.to_dict(), **(cfg_dict or {})})
    meta.update(meta_over or {})
    tensors = {k: v.contiguous() for k, v in state.items() if not k.endswith("_extra_state")}
    save_file(tensors, str(path), metadata=meta)
    return path


def test_an_honest_file_loads(tmp_path):
    f = write(tmp_path / "m.safetensors")
    _, cfg, _ = read_model_file(f)
    assert cfg == get_preset("tiny-sd3")
    load_mmdit(f)


@pytest.mark.parametrize("size", [1500, 10**6])
def test_a_huge_position_table_is_refused(tmp_path, size):
    f = write(tmp_path / "m.safetensors", {"pos_embed_max_size": size})
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"{f}: pos_embed_max_size={size} would build a"):
        load_mmdit(f)
    assert time.perf_counter() - t0 < 20  # refused before building (not a timing claim)


@pytest.mark.parametrize(
    "change, message",
    [
        (False, "the header has no model config"),
        ({"num_heads": 0}, "num_heads=0 must be a positive integer"),
        ({"hidden_size": "64"}, "hidden_size='64' must be a positive integer"),
        ({"mlp_ratio": float("nan")}, "mlp_ratio=nan must be a positive number"),
        ({"patch_size": ["a", 2, 2]}, "patch_size=.* must be a sequence of integers"),
        ({"bogus": 1}, r"unknown MMDiTConfig fields: \['bogus'\]"),
    ],
)
def test_malformed_headers_name_the_file(tmp_path, change, message):
    f = write(tmp_path / "m.safetensors", change)
    with pytest.raises(ValueError, match=rf"{f}: (bad model config in the header: )?{message}"):
        read_model_file(f)


def test_a_header_claiming_a_huge_model_allocates_nothing(tmp_path):
    """8192 wide, 64 layers (~50 GB of fp32 weights) claimed by a file of a tiny model: the
    shapes are compared on a meta-device skeleton, before anything is built."""
    f = write(tmp_path / "m.safetensors", {"hidden_size": 8192, "num_heads": 64, "num_layers": 64,
                                           "pos_embed_max_size": 16})  # fmt: skip
    with pytest.raises(ValueError, match=rf"{f} does not fit the model: missing keys"):
        load_mmdit(f)


def test_bad_extra_is_named(tmp_path):
    f = write(tmp_path / "m.safetensors", meta_over={"extra": "[1, 2]"})
    with pytest.raises(ValueError, match=rf"{f}: bad 'extra' in the header"):
        read_model_file(f)


def test_a_sharded_index_claiming_a_huge_table_is_refused(tmp_path):
    """The same bound for TP-sharded directories (their index holds the config; the table
    is no stored tensor): refused naming the index before anything is built."""
    from megatron_apt.checkpoint import convert

    cfg = get_preset("tiny-sd3")
    d = convert.save_sharded(tmp_path / "ck", MMDiT(cfg).state_dict(), cfg, tp_size=2)
    index_file = d / convert.SHARDED_INDEX
    index = json.loads(index_file.read_text())
    index["config"]["pos_embed_max_size"] = 1600
    index_file.write_text(json.dumps(index))
    for read in (load_mmdit, convert.read_checkpoint):
        with pytest.raises(ValueError, match=rf"{index_file}: pos_embed_max_size=1600 would"):
            read(d)
