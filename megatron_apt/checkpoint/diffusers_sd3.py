"""The MMDiT family's diffusers directories (``SD3Transformer2DModel``): the key and config
mapping lives with the family (:mod:`megatron_apt.models.mmdit.diffusers_mapping`,
re-exported here), the directory reading and writing is family-neutral
(:mod:`megatron_apt.checkpoint.diffusers_dir`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_apt.checkpoint.diffusers_dir import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    read_diffusers_dir,
)
from megatron_apt.checkpoint.diffusers_dir import write_diffusers_dir as write_sd3_dir
from megatron_apt.models.mmdit.diffusers_mapping import (
    SD3_CLASS,
    SD3_CONFIG_KEYS,
    fuse_qkv,
    mmdit_to_sd3,
    mmdit_to_sd3_config,
    sd3_config_to_mmdit,
    sd3_pos_embed,
    sd3_shapes,
    sd3_to_mmdit,
    split_qkv,
)

__all__ = [
    "SD3_CLASS",
    "SD3_CONFIG_KEYS",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "fuse_qkv",
    "mmdit_to_sd3",
    "mmdit_to_sd3_config",
    "read_sd3_dir",
    "sd3_config_to_mmdit",
    "sd3_pos_embed",
    "sd3_shapes",
    "sd3_to_mmdit",
    "split_qkv",
    "write_sd3_dir",
]


def read_sd3_dir(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, config)`` of a diffusers ``SD3Transformer2DModel`` directory (or of a
    pipeline directory with a ``transformer/`` subfolder); ``ValueError`` naming the config
    file for another class. Validated before any tensor is read (see
    :func:`~megatron_apt.checkpoint.diffusers_dir.read_diffusers_dir`)."""
    family, _, sd, config = read_diffusers_dir(path)
    if family.diffusers_class != SD3_CLASS:
        raise ValueError(f"{path}: a {family.diffusers_class}, expected a {SD3_CLASS}")
    return sd, config
