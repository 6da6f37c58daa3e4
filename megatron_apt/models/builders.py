"""Build a model of any registered family (:mod:`megatron_apt.models.families`), the
generator and the discriminator around it, and weightless meta-device skeletons of them.

Loading weights into a build (``init_from``) is checkpoint code:
:mod:`megatron_apt.checkpoint.model_init` (``models/`` never imports ``checkpoint/``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from megatron_apt.models.build_options import model_build, unpartitioned
from megatron_apt.models.discriminator import Discriminator, DiscriminatorConfig
from megatron_apt.models.families import family_of
from megatron_apt.models.generator import Generator
from megatron_apt.models.specs import LayerSpec, get_spec
from megatron_apt.parallel.state import ParallelState
from megatron_apt.parallel.tensor_parallel import tp_partition_dim


def build_model(
    cfg,
    ps: ParallelState | None = None,
    spec: LayerSpec | str | None = None,
    params_dtype: torch.dtype = torch.float32,
    recompute: str | Sequence[int] | None = None,
    initialize: bool | None = None,
) -> torch.nn.Module:
    """The velocity model of ``cfg``'s family (an ``MMDiTConfig`` gives an MMDiT, a
    ``WanConfig`` a WanDiT); ``initialize=False`` skips the random init (weights loaded
    next); ``recompute``: the blocks whose activations are recomputed in backward."""
    if isinstance(spec, str):
        spec = get_spec(spec)
    with model_build(initialize=initialize):
        model = family_of(cfg).build(cfg, ps, spec=spec, params_dtype=params_dtype)
    model.set_recompute(recompute)
    return model


build_mmdit = build_model  # the name the MMDiT-only code used


def build_generator(cfg, ps: ParallelState | None = None, **kw) -> Generator:
    """G(z, c) = z - Ĝ(z, c, T), randomly initialized (``kw``: :func:`build_model`'s)."""
    return Generator(build_model(cfg, ps, **kw))


def build_discriminator(
    cfg, ps: ParallelState | None = None, disc_cfg: DiscriminatorConfig | None = None, **kw
) -> Discriminator:
    """D̂: a backbone (``kw``: :func:`build_model`'s) and new heads, randomly initialized."""
    return Discriminator(build_model(cfg, ps, **kw), disc_cfg)


# --------------------------------------------------------------------------------------
# Skeletons: full shapes and TP partition dims without allocating weights
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def meta_build() -> Iterator[None]:
    """Build modules on the meta device (no memory, no init). Megatron's GPU init path (taken
    by the discriminator heads on a non-CPU device) needs its RNG tracker: a temporary one."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_apt.parallel.cpu_shim import install_cpu_shim

    install_cpu_shim()
    tracker = get_cuda_rng_tracker()
    fresh = not tracker.is_initialized()
    if fresh:
        tracker.add("model-parallel-rng", 0)
    log = logging.getLogger("megatron.core.tensor_parallel.random")  # "CPU RNG state changed"
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            yield
    finally:
        log.setLevel(level)
        if fresh:
            tracker.reset()


class _SoloGroup:
    """A one-rank stand-in for a process group: enough to build layers, never communicates."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def build_skeleton(
    cfg, role: str = "mmdit", head_layers: Sequence[int] | None = None
) -> torch.nn.Module:
    """A TP=1 model of ``cfg`` on the meta device: the velocity model, or for ``role``
    ``discriminator`` the whole discriminator (``head_layers``: its heads' blocks, as
    trained with ``--d-head-layers``; None: the paper's)."""
    solo = _SoloGroup()  # not None: megatron would fall back to its global TP group
    ps = ParallelState(tp_group=solo, dp_group=solo, cp_group=solo)
    # megatron allocates on the GPU explicitly unless told to initialize "on the CPU"
    # (model_build): on a CUDA host the meta context would not hold the model
    # unpartitioned: a loader running inside a ZeRO-3 zero.Init build still gets a skeleton
    with (
        unpartitioned(),
        meta_build(),
        model_build(use_cpu_initialization=True, initialize=False),
    ):
        model = family_of(cfg).build(cfg, ps)
        if role == "discriminator":
            heads = tuple(head_layers) if head_layers else None
            return Discriminator(model, DiscriminatorConfig(head_layers=heads))
        return model


def tensor_layout(
    cfg,
    role: str = "mmdit",
    model: torch.nn.Module | None = None,
    head_layers: Sequence[int] | None = None,
) -> dict[str, tuple[tuple, int | None]]:
    """``{key: (full shape, TP partition dim or None)}`` of every state-dict tensor, read from
    the partition attributes megatron puts on the parameters of a freshly built model."""
    model = build_skeleton(cfg, role, head_layers) if model is None else model
    params = dict(model.named_parameters())
    return {
        k: (tuple(v.shape), tp_partition_dim(params[k]) if k in params else None)
        for k, v in model.state_dict().items()
        if not k.endswith("_extra_state")
    }


def full_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """TP=1 shapes of a (possibly TP-sharded) model's state dict entries."""
    params = dict(model.named_parameters())
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        shape = list(getattr(params.get(name), "ds_shape", t.shape))  # ZeRO-3: the real shape
        dim = tp_partition_dim(params[name]) if name in params else None
        if dim is not None:
            shape[dim] *= model.ps.tp_size
        out[name] = torch.Size(shape)
    return out
