"""The checkpoint manifest: another model's checkpoint is refused before DeepSpeed loads it,
with an error naming the checkpoint, the keys and the shapes (no process group needed)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from megatron_apt.engine.checkpointing import (
    MANIFEST,
    CheckpointMismatchError,
    _manifest,
    check_manifest,
    describe_mismatch,
)


def _engine(*layers: int):
    dims = list(zip(layers[:-1], layers[1:]))
    return SimpleNamespace(module=torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in dims]))


def _write(tmp_path, engines, modules=None):
    (tmp_path / MANIFEST).write_text(json.dumps(_manifest(engines, modules)))
    return tmp_path


def test_same_model_passes(tmp_path):
    d = _write(tmp_path, {"generator": _engine(3, 4, 5)}, {"target": torch.nn.Linear(2, 2)})
    check_manifest(d, {"generator": _engine(3, 4, 5)}, {"target": torch.nn.Linear(2, 2)})


def test_shape_and_key_mismatches_are_named(tmp_path):
    d = _write(tmp_path, {"generator": _engine(3, 4, 5)})
    with pytest.raises(CheckpointMismatchError) as err:
        check_manifest(d, {"generator": _engine(3, 6, 5, 2)})
    msg = str(err.value)
    assert str(d) in msg and "generator" in msg
    assert "2 missing keys" in msg and "'2.weight'" in msg
    assert "0.weight: checkpoint (4, 3) vs model (6, 3)" in msg
    assert isinstance(err.value, ValueError)  # pretrain_apt.py prints it as a clean error


def test_other_stage_is_named(tmp_path):
    d = _write(tmp_path, {"model": _engine(3, 4)})
    with pytest.raises(CheckpointMismatchError, match=r"has no 'generator' engine .*\['model'\]"):
        check_manifest(d, {"generator": _engine(3, 4)})


def test_without_manifest_defers_to_deepspeed(tmp_path):
    check_manifest(tmp_path, {"generator": _engine(3, 4)})


def test_describe_mismatch_truncates_long_lists():
    found = {f"k{i}": [1] for i in range(20)}
    msg = describe_mismatch(found, {})
    assert msg.startswith("20 unexpected keys") and "... and 12 more" in msg
    assert describe_mismatch({"a": [2, 3]}, {"a": (2, 3)}) == ""
