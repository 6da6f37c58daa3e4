"""A user DeepSpeed JSON (``--deepspeed-config-g/-d``) may tune DeepSpeed, not open a code path
that unpickles checkpoints or change what the recipe owns (issue 16, item 4).

``checkpoint.load_universal`` routes ``--load`` through DeepSpeed's universal-checkpoint loader,
which calls ``torch.load(weights_only=False)``: refused by name. ``gradient_clipping``,
``bf16``, ``zero_optimization.stage`` that differ from the recipe are refused (before, they were
merged and trainer_state.json recorded the recipe's values, not those in effect); repeating
the recipe's value and tuning other keys still work.
"""

from __future__ import annotations

import json

import pytest

from megatron_apt.config.recipes import get_recipe
from megatron_apt.config.training import plan_batch
from megatron_apt.engine.ds_config import build_deepspeed_config


def _build(tmp_path, user: dict, **changes):
    cfg = get_recipe("tiny-apt").replace(**changes)
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(user))
    return build_deepspeed_config(cfg, plan_batch(cfg, 2), str(f))


def test_universal_checkpoint_loading_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"ds.json: checkpoint.load_universal .*weights_only"):
        _build(tmp_path, {"checkpoint": {"load_universal": True}})
    conf = _build(tmp_path, {"checkpoint": {"tag_validation": "Fail"}})  # other keys: fine
    assert conf["checkpoint"] == {"tag_validation": "Fail"}


@pytest.mark.parametrize(
    "user, key",
    [
        ({"gradient_clipping": 1.0}, "gradient_clipping=1.0"),
        ({"bf16": {"enabled": True}}, "bf16.enabled=True"),
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3"),
    ],
)
def test_recipe_owned_keys_are_refused(tmp_path, user, key):
    with pytest.raises(ValueError, match=rf"ds.json sets {key}, the recipe has"):
        _build(tmp_path, user)


def test_fp16_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fp16.enabled is not supported: use --bf16"):
        _build(tmp_path, {"fp16": {"enabled": True}})


def test_repeating_the_recipe_and_tuning_zero_work(tmp_path):
    user = {"gradient_clipping": 0.0, "zero_optimization": {"stage": 2, "reduce_bucket_size": 1e6}}
    conf = _build(tmp_path, user, zero_stage=2)
    assert conf["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1e6}
    assert conf["gradient_clipping"] == 0.0
