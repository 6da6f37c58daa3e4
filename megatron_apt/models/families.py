"""The model families, registered in one table: everything above ``models/`` (builders,
checkpoint files and conversion, the tools) looks a family up here instead of branching on
its name (torchtitan's ``TrainSpec``, Megatron-Bridge's per-family bridges).

A family is its config dataclass, the module that builds it, its analytic parameter and
FLOP counts, its memory planner terms, and its diffusers mapping (class name,
``config.json`` and state dict, both ways, and the tensors a diffusers config implies).
Serialized configs carry the family's name (``{"family": "wan", ...}``); a config without the
field is an MMDiT (the files written before there was a second family).

To add a family: a folder ``models/<name>/`` with ``config.py`` (a ``kw_only`` dataclass
with ``to_dict`` / ``from_dict``), ``model.py`` (the MMDiT's calling convention),
``diffusers_mapping.py`` and ``memory.py`` (the memory planner's terms), then one
:class:`ModelFamily` entry in :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_apt.config.memory import FamilyMemory
from megatron_apt.models.mmdit import config as mmdit_config
from megatron_apt.models.mmdit import diffusers_mapping as mmdit_mapping
from megatron_apt.models.mmdit.config import MMDiTConfig
from megatron_apt.models.mmdit.memory import MMDIT_MEMORY
from megatron_apt.models.wan import config as wan_config
from megatron_apt.models.wan import diffusers_mapping as wan_mapping
from megatron_apt.models.wan.memory import WAN_MEMORY

DEFAULT_FAMILY = "mmdit"  # serialized configs without a "family" field


@dataclass(frozen=True)
class ModelFamily:
    """One model family: what the code above ``models/`` needs to know about it.

    ``build(cfg, ps, spec=..., params_dtype=..., use_cpu_initialization=...)`` returns the
    velocity model (``model(latents [B, C, T, H, W], t [B] in [0, 1], text [B, L, D],
    text_mask [B, L] or None, ...)``); ``forward_flops(cfg, n_visual, n_text, batch)`` counts
    2 FLOPs per multiply-add of its linears and attention.
    """

    name: str
    config_cls: type
    build: Callable[..., torch.nn.Module]
    count_parameters: Callable[[Any], int]
    forward_flops: Callable[..., float]
    presets: dict[str, Callable[[], Any]]
    describe: Callable[[Any], str]  # one line for `convert_checkpoint.py inspect`
    diffusers_class: str
    config_from_diffusers: Callable[..., Any]  # (config.json dict, source) -> cfg
    config_to_diffusers: Callable[[Any], dict]
    diffusers_shapes: Callable[[Any], dict[str, torch.Size]]  # every tensor cfg implies
    from_diffusers: Callable[[dict, Any], dict]  # diffusers state dict -> ours (TP=1)
    to_diffusers: Callable[[dict, Any], dict]
    imported_role: str  # the role of a model file converted from diffusers
    # the memory planner's terms: parameters per TP rank, activation inventory, FLOPs of the
    # training phases (models/<name>/memory.py, on config/memory.py; tools/plan_memory.py)
    memory: FamilyMemory
    # (bytes, the config field responsible) of the buffers a build of cfg computes that no
    # stored tensor bounds (SD3's sin-cos table): a file header claiming much more than its
    # weights is refused before anything is built
    unbounded_buffers: Callable[[Any], tuple[int, str]] = lambda cfg: (0, "")
    # training and generation pass the text mask to the model (the MMDiT's convention); False:
    # the zero-padded text goes in unmasked, as the pretrained model was trained and as the
    # exported pipeline runs it (diffusers' WanTransformer3DModel takes no mask and attends to
    # the zero padding, docs/wan.md)
    uses_text_mask: bool = True

    def config_from_dict(self, d: dict) -> Any:
        return self.config_cls.from_dict(d)


def _build_mmdit(cfg, ps=None, **kw) -> torch.nn.Module:
    from megatron_apt.models.mmdit.model import MMDiT

    return MMDiT(cfg, ps, **kw)


def _build_wan(cfg, ps=None, **kw) -> torch.nn.Module:
    from megatron_apt.models.wan.model import WanDiT

    return WanDiT(cfg, ps, **kw)


def _mmdit_table_bytes(cfg: MMDiTConfig) -> tuple[int, str]:
    """SD3's sin-cos position table ``[G*G, hidden]`` in fp32 (``sincos2d`` only)."""
    if cfg.pos_embed != "sincos2d":
        return 0, ""
    size = cfg.pos_embed_max_size
    return size**2 * cfg.hidden_size * 4, f"pos_embed_max_size={size}"


def _describe_mmdit(cfg: MMDiTConfig) -> str:
    return (
        f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
        f"pos_embed {cfg.pos_embed}, qk_norm {cfg.qk_norm}"
    )


def _describe_wan(cfg: wan_config.WanConfig) -> str:
    return (
        f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
        f"ffn {cfg.ffn_dim}, text {cfg.text_dim}"
    )


FAMILIES: dict[str, ModelFamily] = {
    "mmdit": ModelFamily(
        name="mmdit",
        config_cls=MMDiTConfig,
        build=_build_mmdit,
        count_parameters=lambda cfg: mmdit_config.count_parameters(cfg).total,
        forward_flops=mmdit_config.forward_flops,
        presets=mmdit_config.PRESETS,
        describe=_describe_mmdit,
        diffusers_class=mmdit_mapping.SD3_CLASS,
        config_from_diffusers=mmdit_mapping.sd3_config_to_mmdit,
        config_to_diffusers=mmdit_mapping.mmdit_to_sd3_config,
        diffusers_shapes=mmdit_mapping.sd3_shapes,
        from_diffusers=mmdit_mapping.sd3_to_mmdit,
        to_diffusers=mmdit_mapping.mmdit_to_sd3,
        imported_role="sd3",
        memory=MMDIT_MEMORY,
        unbounded_buffers=_mmdit_table_bytes,
    ),
    "wan": ModelFamily(
        name="wan",
        config_cls=wan_config.WanConfig,
        build=_build_wan,
        count_parameters=wan_config.count_parameters,
        forward_flops=wan_config.forward_flops,
        presets=wan_config.WAN_PRESETS,
        describe=_describe_wan,
        diffusers_class=wan_mapping.WAN_CLASS,
        config_from_diffusers=wan_mapping.wan_config_from_diffusers,
        config_to_diffusers=wan_mapping.wan_config_to_diffusers,
        diffusers_shapes=wan_mapping.diffusers_shapes,
        from_diffusers=wan_mapping.diffusers_to_wan,
        to_diffusers=wan_mapping.wan_to_diffusers,
        imported_role="diffusers",
        memory=WAN_MEMORY,
        uses_text_mask=False,
    ),
}


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name`` (``ValueError`` naming the known ones)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(cfg: Any) -> ModelFamily:
    """The family whose config class ``cfg`` is (each config class names its family in the
    class attribute ``family``: ``config/`` code, which must not import ``models/``, reads
    that)."""
    for fam in FAMILIES.values():
        if type(cfg) is fam.config_cls:
            assert cfg.family == fam.name, (type(cfg).__name__, cfg.family, fam.name)
            return fam
    raise ValueError(f"{type(cfg).__name__} is the config of no registered model family")


def family_for_diffusers_class(class_name: Any, source: str = "config.json") -> ModelFamily:
    """The family of a diffusers model class (``_class_name`` of a ``config.json``);
    ``ValueError`` naming ``source``, the class and the supported ones."""
    for fam in FAMILIES.values():
        if class_name == fam.diffusers_class:
            return fam
    known = sorted(f.diffusers_class for f in FAMILIES.values())
    raise ValueError(
        f"{source}: _class_name is {class_name!r}; supported diffusers classes: {known}"
    )


def config_to_dict(cfg: Any) -> dict:
    """``cfg`` as a JSON-able dict with its family's name (what checkpoints store)."""
    return {"family": family_of(cfg).name, **cfg.to_dict()}


def config_from_dict(d: Any) -> Any:
    """The config of a dict written by :func:`config_to_dict`; a dict without ``family`` is
    an MMDiT config (files written before the registry). ``ValueError`` for anything else."""
    if not isinstance(d, dict):
        raise ValueError(f"a model config is a JSON object, got {type(d).__name__}")
    d = dict(d)
    return get_family(d.pop("family", DEFAULT_FAMILY)).config_from_dict(d)


def get_preset(name: str, **overrides) -> Any:
    """A named preset of any family (``ValueError`` listing them all for an unknown name)."""
    for fam in FAMILIES.values():
        if name in fam.presets:
            cfg = fam.presets[name]()
            return cfg.replace(**overrides) if overrides else cfg
    names = sorted(n for f in FAMILIES.values() for n in f.presets)
    raise ValueError(f"unknown model preset {name!r}; choose one of {names}")
