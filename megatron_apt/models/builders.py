"""Build the MMDiT, the generator and the discriminator, optionally from a model file.

Initialization follows the paper: the consistency student and the discriminator backbone
start from the *diffusion* weights, the APT generator from the *distilled* (consistency)
weights. A file of another architecture is refused with the differing config fields; missing
or unexpected keys are named.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_apt.checkpoint.io import (
    check_config_matches,
    check_keys_match,
    load_weights,
    read_model_file,
)
from megatron_apt.config.model import MMDiTConfig
from megatron_apt.models.build_options import model_build
from megatron_apt.models.discriminator import Discriminator, DiscriminatorConfig
from megatron_apt.models.generator import Generator
from megatron_apt.models.mmdit import MMDiT
from megatron_apt.models.specs import LayerSpec, get_spec
from megatron_apt.parallel.state import ParallelState
from megatron_apt.parallel.tensor_parallel import shard_state_dict, tp_partition_dim

log = logging.getLogger(__name__)


def full_shapes(model: MMDiT) -> dict[str, torch.Size]:
    """TP=1 shapes of a (possibly TP-sharded) model's state dict entries."""
    params = dict(model.named_parameters())
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        shape = list(t.shape)
        dim = tp_partition_dim(params[name]) if name in params else None
        if dim is not None:
            shape[dim] *= model.ps.tp_size
        out[name] = torch.Size(shape)
    return out


def load_model_file_into(model: MMDiT, path: str | Path, expect_roles: tuple[str, ...] = ()):
    """Load a TP=1 model file into ``model`` (cut into this rank's TP shard); returns the
    file's metadata. Refuses another architecture; warns when the role is unexpected."""
    state, file_cfg, meta = read_model_file(path)
    check_config_matches(path, file_cfg, model.cfg)
    expected = {k: torch.empty(s, device="meta") for k, s in full_shapes(model).items()}
    check_keys_match(path, state, expected)
    if expect_roles and meta.get("role") not in expect_roles:
        log.warning(
            "%s holds role %r weights, expected one of %s", path, meta.get("role"), expect_roles
        )
    load_weights(model, shard_state_dict(state, model, model.ps), path)
    return meta


def build_mmdit(
    cfg: MMDiTConfig,
    ps: ParallelState | None = None,
    spec: LayerSpec | str | None = None,
    params_dtype: torch.dtype = torch.float32,
    init_from: str | Path | None = None,
    expect_roles: tuple[str, ...] = (),
    recompute: str | Sequence[int] | None = None,
) -> MMDiT:
    """An MMDiT, loaded from ``init_from`` when given; ``recompute``: the blocks whose
    activations are recomputed in backward (see :meth:`MMDiT.set_recompute`)."""
    if isinstance(spec, str):
        spec = get_spec(spec)
    # TE weights live on the GPU and are initialized there (minutes for 8B parameters): skip
    # that when every weight is loaded next. CPU specs keep their init, whose RNG draws the
    # layers built after this one (the discriminator heads) and the equivalence tests rely on.
    skip_init = init_from is not None and spec is not None and spec.uses_te
    with model_build(initialize=False if skip_init else None):
        model = MMDiT(cfg, ps, spec=spec, params_dtype=params_dtype)
    if init_from is not None:
        load_model_file_into(model, init_from, expect_roles)
    model.set_recompute(recompute)
    return model


def build_generator(
    cfg: MMDiTConfig, ps: ParallelState | None = None, init_from: str | Path | None = None, **kw
) -> Generator:
    """G(z, c) = z - Ĝ(z, c, T) with Ĝ from the consistency-distilled weights (or random)."""
    return Generator(
        build_mmdit(cfg, ps, init_from=init_from, expect_roles=("consistency", "generator"), **kw)
    )


def build_discriminator(
    cfg: MMDiTConfig,
    ps: ParallelState | None = None,
    init_from: str | Path | None = None,
    disc_cfg: DiscriminatorConfig | None = None,
    **kw,
) -> Discriminator:
    """D̂ with its backbone from the ORIGINAL diffusion weights (or random) and new heads
    (``recompute`` in ``kw`` applies to the backbone's blocks)."""
    # "sd3": a diffusion model imported from diffusers (tools/convert_checkpoint.py)
    backbone = build_mmdit(cfg, ps, init_from=init_from, expect_roles=("diffusion", "sd3"), **kw)
    return Discriminator(backbone, disc_cfg)
