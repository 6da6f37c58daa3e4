"""The Wan2.1 family: config and presets (:mod:`.config`), the DiT on megatron-core layers
(:mod:`.model`) and the diffusers ``WanTransformer3DModel`` mapping (:mod:`.diffusers_mapping`).

As in :mod:`megatron_apt.models.mmdit`, the config names import at once and the model and the
mapping (torch, megatron-core: seconds) on first use, so that a config error of
``pretrain_apt.py`` is reported before megatron-core loads. Monkeypatch a name where it is
looked up (``megatron_apt.models.wan.model``), not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_apt.models.wan.config import (
    WAN_PRESETS,
    WanConfig,
    count_parameters,
    get_wan_preset,
)
from megatron_apt.utils.lazy import lazy_attributes

if TYPE_CHECKING:
    from megatron_apt.models.wan.diffusers_mapping import (
        diffusers_to_wan,
        wan_config_from_diffusers,
        wan_config_to_diffusers,
        wan_to_diffusers,
    )
    from megatron_apt.models.wan.model import WanBlock, WanDiT

_LAZY = {
    "WanBlock": "model",
    "WanDiT": "model",
    "diffusers_to_wan": "diffusers_mapping",
    "wan_config_from_diffusers": "diffusers_mapping",
    "wan_config_to_diffusers": "diffusers_mapping",
    "wan_to_diffusers": "diffusers_mapping",
}

__all__ = [
    "WAN_PRESETS",
    "WanBlock",
    "WanConfig",
    "WanDiT",
    "count_parameters",
    "diffusers_to_wan",
    "get_wan_preset",
    "wan_config_from_diffusers",
    "wan_config_to_diffusers",
    "wan_to_diffusers",
]


__getattr__ = lazy_attributes(__name__, _LAZY, globals())
