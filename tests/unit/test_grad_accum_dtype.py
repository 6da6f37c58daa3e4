"""The DeepSpeed config sums the micro-batch gradients of an update in fp32 under --bf16
(issue 29, item 4; measured with real engines in tests/distributed/test_bf16_grad_accumulation.py).

``data_types.grad_accum_dtype`` is ``"fp32"`` (DeepSpeed's default is the model's dtype, bf16);
ZeRO-1 also reduces its fp32 sum in fp32 (``communication_data_type``); bf16 at ZeRO-0, where
DeepSpeed cannot accumulate in fp32, is refused with more than one micro-batch per update; a
user JSON that sets another accumulation dtype is refused by name.
"""

from __future__ import annotations

import json

import pytest

from megatron_apt.config.recipes import get_recipe
from megatron_apt.config.training import plan_batch
from megatron_apt.engine.ds_config import build_deepspeed_config


def _build(tmp_path, user: dict | None = None, world: int = 2, **changes) -> dict:
    """tiny-apt (micro 2, global 4): one micro-batch per update on 2 ranks, 2 on one."""
    cfg = get_recipe("tiny-apt").replace(**changes)
    path = None
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
    return build_deepspeed_config(cfg, plan_batch(cfg, world), path and str(path))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_accumulates_in_fp32(tmp_path, stage):
    conf = _build(tmp_path, world=1, bf16=True, zero_stage=stage)
    assert conf["gradient_accumulation_steps"] == 2
    assert conf["data_types"] == {"grad_accum_dtype": "fp32"}
    # ZeRO-1 all-reduces the update's fp32 sum once: in fp32, not rounded back to bf16
    assert conf.get("communication_data_type") == ("fp32" if stage == 1 else None)


def test_fp32_runs_say_fp32(tmp_path):
    conf = _build(tmp_path, world=1, bf16=False, zero_stage=0)
    assert conf["data_types"] == {"grad_accum_dtype": "fp32"}  # DeepSpeed's default anyway
    assert "communication_data_type" not in conf


def test_bf16_zero0_accumulation_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--bf16 --zero-stage 0 with 2 micro-batches .*"
                       r"runtime/engine.py lines 2313-2323.* use --zero-stage 1"):  # fmt: skip
        _build(tmp_path, world=1, bf16=True, zero_stage=0)
    conf = _build(tmp_path, world=2, bf16=True, zero_stage=0)  # one micro-batch: nothing summed
    assert "data_types" not in conf


@pytest.mark.parametrize("value", ["bf16", "fp16"])
def test_user_json_cannot_turn_accumulation_back(tmp_path, value):
    user = {"data_types": {"grad_accum_dtype": value}}
    with pytest.raises(ValueError, match=rf"ds.json sets data_types.grad_accum_dtype='{value}', "
                       "the recipe has 'fp32'"):  # fmt: skip
        _build(tmp_path, user, bf16=True, zero_stage=2)


def test_user_json_may_repeat_it_and_tune_communication(tmp_path):
    user = {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
    conf = _build(tmp_path, user, bf16=True, zero_stage=3)
    assert conf["data_types"] == {"grad_accum_dtype": "fp32"}
    assert conf["communication_data_type"] == "fp32"
    with pytest.raises(ValueError, match=r"grad_accum_dtype='fp32', the recipe has None"):
        _build(tmp_path, user, bf16=True, zero_stage=0)  # DeepSpeed would refuse it there
