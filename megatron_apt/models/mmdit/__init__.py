"""The MMDiT family (SD3, SD3.5, the paper's 8B video model): config, presets and the analytic
parameter and FLOP counts (:mod:`.config`), the model on megatron-core layers (:mod:`.model`),
the diffusers ``SD3Transformer2DModel`` mapping (:mod:`.diffusers_mapping`) and the memory
planner's terms (:mod:`.memory`).

The config names are plain Python and import at once; the model and the mapping load torch
and megatron-core (seconds), so they import on first use: ``config/`` and
``tools/plan_memory.py`` read the presets without them. Monkeypatch a name where it is looked
up (``megatron_apt.models.mmdit.model``), not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_apt.models.mmdit.config import (
    PRESETS,
    MMDiTConfig,
    ParamCount,
    count_parameters,
    forward_flops,
    get_preset,
)
from megatron_apt.utils.lazy import lazy_attributes

if TYPE_CHECKING:
    from megatron_apt.models.mmdit.diffusers_mapping import (
        SD3_CLASS,
        mmdit_to_sd3,
        mmdit_to_sd3_config,
        sd3_config_to_mmdit,
        sd3_to_mmdit,
    )
    from megatron_apt.models.mmdit.model import MMDiT, MMDiTBlock

_LAZY = {
    "MMDiT": "model",
    "MMDiTBlock": "model",
    "SD3_CLASS": "diffusers_mapping",
    "mmdit_to_sd3": "diffusers_mapping",
    "mmdit_to_sd3_config": "diffusers_mapping",
    "sd3_config_to_mmdit": "diffusers_mapping",
    "sd3_to_mmdit": "diffusers_mapping",
}

__all__ = [
    "PRESETS",
    "SD3_CLASS",
    "MMDiT",
    "MMDiTBlock",
    "MMDiTConfig",
    "ParamCount",
    "count_parameters",
    "forward_flops",
    "get_preset",
    "mmdit_to_sd3",
    "mmdit_to_sd3_config",
    "sd3_config_to_mmdit",
    "sd3_to_mmdit",
]


__getattr__ = lazy_attributes(__name__, _LAZY, globals())
