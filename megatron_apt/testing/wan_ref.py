"""diffusers' ``WanTransformer3DModel`` as a reference for the Wan family's tests.

diffusers is imported only when a model is built (a test dependency).
"""

from __future__ import annotations

import torch

from megatron_apt.models.wan.config import WanConfig
from megatron_apt.models.wan.diffusers_mapping import wan_config_to_diffusers


def wan_transformer(cfg: WanConfig) -> torch.nn.Module:
    """``diffusers.WanTransformer3DModel`` of ``cfg`` (built on the current default device:
    under ``torch.device("meta")`` it allocates nothing)."""
    from diffusers import WanTransformer3DModel

    kwargs = {k: v for k, v in wan_config_to_diffusers(cfg).items() if not k.startswith("_")}
    return WanTransformer3DModel(**kwargs)


def tiny_wan_transformer(cfg: WanConfig, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """A random reference of ``cfg`` in eval mode: built after ``torch.manual_seed(seed)``,
    then seeded noise ``N(0, std^2)`` added to every weight, so that every weight (norm
    weights, biases, tables) matters in a comparison."""
    torch.manual_seed(seed)
    model = wan_transformer(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model
