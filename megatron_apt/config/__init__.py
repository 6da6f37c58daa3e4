from megatron_apt.config.model import (
    PRESETS,
    MMDiTConfig,
    ParamCount,
    count_parameters,
    get_preset,
)

__all__ = ["MMDiTConfig", "ParamCount", "PRESETS", "count_parameters", "get_preset"]
