from megatron_apt.models.builders import (
    build_discriminator,
    build_generator,
    build_mmdit,
    build_model,
)
from megatron_apt.models.discriminator import (
    Discriminator,
    DiscriminatorConfig,
    default_head_layers,
)
from megatron_apt.models.generator import Generator
from megatron_apt.models.mmdit import MMDiT, MMDiTBlock
from megatron_apt.models.specs import LayerSpec, get_spec, local_spec

__all__ = [
    "Discriminator",
    "DiscriminatorConfig",
    "Generator",
    "LayerSpec",
    "MMDiT",
    "MMDiTBlock",
    "build_discriminator",
    "build_generator",
    "build_mmdit",
    "build_model",
    "default_head_layers",
    "get_spec",
    "local_spec",
]
