"""File entries of data files stay inside their directory (issue 16, item 6): a diffusers
``weight_map`` or a shard index (tests/unit/test_shards.py) naming ``../...`` or an absolute
path is refused, naming the file and the entry, before anything outside is opened (before:
opened, hashed and trained on, and the error text leaked other files' sizes)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_apt.checkpoint.diffusers_sd3 import (
    WEIGHTS_INDEX_NAME,
    mmdit_to_sd3_config,
    read_sd3_dir,
)
from megatron_apt.models.mmdit import get_preset
from megatron_apt.utils.paths import contained

OUTSIDE = ["../secret.safetensors", "/etc/passwd", "shards/../../x.safetensors"]


@pytest.mark.parametrize("name", OUTSIDE)
def test_contained_refuses(tmp_path, name):
    with pytest.raises(ValueError, match=r"index.json: file entry .* points outside"):
        contained(tmp_path, name, "index.json")


def test_contained_accepts_relative_names(tmp_path):
    assert (
        contained(tmp_path, "shards/0001.safetensors", "x") == tmp_path / "shards/0001.safetensors"
    )
    with pytest.raises(ValueError, match="is not a file name"):
        contained(tmp_path, 3, "x")


@pytest.mark.parametrize("name", OUTSIDE[:2])
def test_weight_map_outside_the_model_dir_is_refused(tmp_path, name):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(mmdit_to_sd3_config(get_preset("tiny-sd3"))))
    secret = tmp_path / "secret.safetensors"  # a real file outside: it must not be read
    save_file({"w": torch.zeros(1)}, str(secret))
    target = str(secret) if name.startswith("/") else name
    index = {"metadata": {}, "weight_map": {"pos_embed.proj.weight": target}}
    (model / WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{WEIGHTS_INDEX_NAME}: file entry .* points outside"):
        read_sd3_dir(model)
