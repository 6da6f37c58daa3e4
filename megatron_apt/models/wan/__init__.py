"""The Wan2.1 family: config and presets (:mod:`.config`), the DiT on megatron-core layers
(:mod:`.model`) and the diffusers ``WanTransformer3DModel`` mapping (:mod:`.diffusers_mapping`)."""

from megatron_apt.models.wan.config import (
    WAN_PRESETS,
    WanConfig,
    count_parameters,
    get_wan_preset,
)
from megatron_apt.models.wan.diffusers_mapping import (
    diffusers_to_wan,
    wan_config_from_diffusers,
    wan_config_to_diffusers,
    wan_to_diffusers,
)
from megatron_apt.models.wan.model import WanBlock, WanDiT

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
