"""ZeRO-Offload through a user DeepSpeed JSON (issue 29, item 6; real runs in
tests/distributed/test_zero_offload.py).

The recipes' optimizer is a client optimizer (RMSprop/Adam/AdamW), which DeepSpeed 0.19.8
refuses under optimizer offload unless ``zero_force_ds_cpu_optimizer`` is false
(runtime/engine.py lines 2342-2346): the config sets it whenever the JSON offloads the
optimizer. Offload that DeepSpeed would ignore (optimizer offload without ZeRO, parameter
offload below ZeRO-3), NVMe, the deprecated spellings and a forced DeepSpeed CPU optimizer are
refused by name.
"""

from __future__ import annotations

import json

import pytest

from megatron_apt.config.recipes import get_recipe
from megatron_apt.config.training import plan_batch
from megatron_apt.engine.ds_config import build_deepspeed_config

CPU = {"device": "cpu"}


def _build(tmp_path, zero: dict, stage: int, **top) -> dict:
    cfg = get_recipe("tiny-apt").replace(zero_stage=stage)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero, **top}))
    return build_deepspeed_config(cfg, plan_batch(cfg, 2), str(path))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_optimizer_offload_takes_the_client_optimizer(tmp_path, stage):
    conf = _build(tmp_path, {"offload_optimizer": CPU}, stage)
    assert conf["zero_optimization"] == {"stage": stage, "offload_optimizer": CPU} | (
        {"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 5e7}
        if stage == 3
        else {}
    )
    assert conf["zero_force_ds_cpu_optimizer"] is False


def test_parameter_offload_at_zero3(tmp_path):
    conf = _build(tmp_path, {"offload_param": CPU, "offload_optimizer": CPU}, 3)
    assert conf["zero_optimization"]["offload_param"] == CPU
    assert conf["zero_force_ds_cpu_optimizer"] is False
    conf = _build(tmp_path, {"offload_param": CPU}, 3)  # parameters only: no client check
    assert "zero_force_ds_cpu_optimizer" not in conf


def test_no_offload_no_key(tmp_path):
    zero = {"reduce_bucket_size": 10**6, "offload_optimizer": {"device": "none"}}
    conf = _build(tmp_path, zero, 2)
    assert "zero_force_ds_cpu_optimizer" not in conf


@pytest.mark.parametrize(
    "zero, stage, top, match",
    [
        ({"offload_optimizer": CPU}, 0, {}, r"offload_optimizer needs --zero-stage 1, 2 or 3"),
        ({"offload_param": CPU}, 2, {}, r"offload_param needs --zero-stage 3 \(ZeRO-2"),
        ({"offload_optimizer": {"device": "nvme"}}, 3, {}, r"offload_optimizer.device='nvme'"),
        ({"offload_param": {"device": "nvme"}}, 3, {}, r"offload_param.device='nvme'"),
        ({"cpu_offload": True}, 2, {}, r"cpu_offload is deprecated; use offload_optimizer"),
        ({"cpu_offload_param": True}, 3, {}, r"cpu_offload_param is deprecated; use offload_par"),
        ({"offload_optimizer": CPU}, 2, {"zero_force_ds_cpu_optimizer": True},
         r"zero_force_ds_cpu_optimizer=true refuses the recipe's client optimizer"),
    ],
)  # fmt: skip
def test_refused_offload(tmp_path, zero, stage, top, match):
    with pytest.raises(ValueError, match=match):
        _build(tmp_path, zero, stage, **top)
