from megatron_apt.models.mmdit import MMDiT, MMDiTBlock
from megatron_apt.models.specs import LayerSpec, get_spec, local_spec

__all__ = ["MMDiT", "MMDiTBlock", "LayerSpec", "get_spec", "local_spec"]
