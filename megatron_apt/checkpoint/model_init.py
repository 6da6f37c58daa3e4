"""Build the velocity model (any family), the generator and the discriminator, optionally
from a model file (``init_from``): :mod:`megatron_apt.models.builders` builds, this module
loads (models/ never imports checkpoint/).

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
from megatron_apt.models.build_options import gathered, is_partitioned
from megatron_apt.models.builders import build_model, full_shapes
from megatron_apt.models.discriminator import Discriminator, DiscriminatorConfig
from megatron_apt.models.generator import Generator
from megatron_apt.models.specs import LayerSpec, get_spec
from megatron_apt.parallel.state import ParallelState
from megatron_apt.parallel.tensor_parallel import shard_state_dict, tp_partition_dim

log = logging.getLogger(__name__)


def load_model_file_into(
    model: torch.nn.Module, path: str | Path, expect_roles: tuple[str, ...] = ()
):
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
    if any(is_partitioned(p) for p in model.parameters()):
        _load_partitioned(model, state, path)
    else:
        load_weights(model, shard_state_dict(state, model, model.ps), path)
    return meta


@torch.no_grad()
def _load_partitioned(model: torch.nn.Module, state: dict, path) -> None:
    """Load a TP=1 state dict into a model whose parameters are ZeRO-3 partitioned: one
    module's own parameters gathered at a time (peak: one block's weights, not the model's),
    cut to this rank's TP shard, written, re-partitioned from rank 0 of the partitioning
    group. Keys were checked against the model before (``check_keys_match``)."""
    ps = model.ps
    for prefix, mod in model.named_modules():
        own = list(mod.named_parameters(recurse=False))
        if not own:
            continue
        with gathered([p for _, p in own], modify=True):
            for name, p in own:
                key = f"{prefix}.{name}" if prefix else name
                value = state[key]
                dim = tp_partition_dim(p)
                if dim is not None:
                    value = value.chunk(ps.tp_size, dim=dim)[ps.tp_rank]
                if value.shape != p.shape:
                    raise ValueError(
                        f"{path}: {key} has shape {tuple(value.shape)}, the model's shard "
                        f"{tuple(p.shape)}"
                    )
                p.data.copy_(value.to(p.dtype))
    params = dict(model.named_parameters())
    for name, buf in model.state_dict().items():  # persistent buffers are not partitioned
        if name not in params and not name.endswith("_extra_state") and name in state:
            buf.copy_(state[name])


def build_mmdit(
    cfg,
    ps: ParallelState | None = None,
    spec: LayerSpec | str | None = None,
    params_dtype: torch.dtype = torch.float32,
    init_from: str | Path | None = None,
    expect_roles: tuple[str, ...] = (),
    recompute: str | Sequence[int] | None = None,
) -> torch.nn.Module:
    """The velocity model of ``cfg``'s family (:func:`megatron_apt.models.builders.build_model`),
    loaded from ``init_from`` when given; ``recompute``: the blocks whose activations are
    recomputed in backward."""
    if isinstance(spec, str):
        spec = get_spec(spec)
    # TE weights live on the GPU and are initialized there (minutes for 8B parameters): skip
    # that when every weight is loaded next. CPU specs keep their init, whose RNG draws the
    # layers built after this one (the discriminator heads) and the equivalence tests rely on.
    skip_init = init_from is not None and spec is not None and spec.uses_te
    model = build_model(
        cfg, ps, spec, params_dtype, recompute, initialize=False if skip_init else None
    )
    if init_from is not None:
        load_model_file_into(model, init_from, expect_roles)
    return model


def build_generator(
    cfg, ps: ParallelState | None = None, init_from: str | Path | None = None, **kw
) -> Generator:
    """G(z, c) = z - Ĝ(z, c, T) with Ĝ from the consistency-distilled weights (or random)."""
    return Generator(
        build_mmdit(cfg, ps, init_from=init_from, expect_roles=("consistency", "generator"), **kw)
    )


def build_discriminator(
    cfg,
    ps: ParallelState | None = None,
    init_from: str | Path | None = None,
    disc_cfg: DiscriminatorConfig | None = None,
    **kw,
) -> Discriminator:
    """D̂ with its backbone from the ORIGINAL diffusion weights (or random) and new heads
    (``recompute`` in ``kw`` applies to the backbone's blocks)."""
    # "sd3" / "diffusers": a diffusion model imported from diffusers (convert_checkpoint.py)
    roles = ("diffusion", "sd3", "diffusers")
    backbone = build_mmdit(cfg, ps, init_from=init_from, expect_roles=roles, **kw)
    return Discriminator(backbone, disc_cfg)
