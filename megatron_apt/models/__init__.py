"""The models: the family registry (:mod:`.families`), the MMDiT (:mod:`.mmdit`) and Wan2.1
(:mod:`.wan`) families, the generator and discriminator around them, the layer specs.

The names below import on first use (they load torch and megatron-core: seconds), so that a
plain-Python module of a family (``megatron_apt.models.mmdit.config``) imports without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_apt.utils.lazy import lazy_attributes

if TYPE_CHECKING:
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
    from megatron_apt.models.mmdit.model import MMDiT, MMDiTBlock
    from megatron_apt.models.specs import LayerSpec, get_spec, local_spec

_LAZY = {
    "build_discriminator": "builders",
    "build_generator": "builders",
    "build_mmdit": "builders",
    "build_model": "builders",
    "Discriminator": "discriminator",
    "DiscriminatorConfig": "discriminator",
    "default_head_layers": "discriminator",
    "Generator": "generator",
    "MMDiT": "mmdit.model",
    "MMDiTBlock": "mmdit.model",
    "LayerSpec": "specs",
    "get_spec": "specs",
    "local_spec": "specs",
}

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


__getattr__ = lazy_attributes(__name__, _LAZY, globals())
