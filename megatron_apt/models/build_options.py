"""How MMDiTs and discriminator heads are built: a context that builders and loaders set
(:func:`model_build`) and the models read (:func:`build_options`), so that the choice reaches
every megatron linear without a flag threaded through each constructor."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

GatherFn = Callable[[list[torch.nn.Parameter], bool], contextlib.AbstractContextManager]
"""``gather(params, modify)``: a context in which ``params`` are whole; with ``modify`` the
values written in it are kept (e.g. ``deepspeed.zero.GatheredParameters(params,
modifier_rank=0 if modify else None)``)."""


@dataclass(frozen=True)
class BuildOptions:
    """How models are built (see :func:`model_build`)."""

    use_cpu_initialization: bool | None = None  # None: each model decides
    initialize: bool = True
    gather: GatherFn | None = None  # set for ZeRO-3 partitioned construction (zero.Init)
    # a context that suspends the partitioning (for meta-device skeletons built meanwhile)
    suspend: Callable[[], contextlib.AbstractContextManager] | None = None


_DEFAULT_BUILD = BuildOptions()  # frozen: safe to share
_BUILD: contextvars.ContextVar[BuildOptions] = contextvars.ContextVar(
    "megatron_apt_build",
    default=_DEFAULT_BUILD,  # noqa: B039 (a frozen dataclass, never mutated)
)


@contextlib.contextmanager
def model_build(
    use_cpu_initialization: bool | None = None,
    initialize: bool | None = None,
    gather: GatherFn | None = None,
    suspend: Callable[[], contextlib.AbstractContextManager] | None = None,
):
    """Build MMDiTs and discriminator heads in this context with these options (None: as
    the enclosing context says; nested contexts refine it).

    ``initialize=False``: no random initialization (megatron's ``perform_initialization=False``,
    which its TE linears honour through ``condition_init_method``, megatron-core 0.16.1
    extensions/transformer_engine.py:309; and no DiT init of the replicated layers), for
    weights that are loaded right after: minutes for billions of parameters on a GPU.
    ``use_cpu_initialization=True``: megatron allocates its weights without a ``device=``, so
    an enclosing ``torch.device("meta")`` applies; with False it allocates on
    ``torch.cuda.current_device()`` explicitly (tensor_parallel/layers.py,
    ``ColumnParallelLinear.__init__``), which a meta context cannot redirect.
    ``gather``: how code that writes or reads whole weights after a submodule was built (the
    DiT init of the replicated layers, loading a model file) reaches parameters that a
    partitioning context (DeepSpeed's ``zero.Init``, which the engine layer opens around the
    build) has already split over the data-parallel ranks; see :func:`gathered`. ``suspend``:
    how to build something whole meanwhile (:func:`unpartitioned`)."""
    outer = _BUILD.get()
    token = _BUILD.set(
        BuildOptions(
            outer.use_cpu_initialization
            if use_cpu_initialization is None
            else use_cpu_initialization,
            outer.initialize if initialize is None else initialize,
            outer.gather if gather is None else gather,
            outer.suspend if suspend is None else suspend,
        )
    )
    try:
        yield
    finally:
        _BUILD.reset(token)


def build_options() -> BuildOptions:
    return _BUILD.get()


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a parameter that ZeRO-3 has split over the data-parallel ranks (its ``.data``
    is an empty placeholder; ``ds_shape`` is its real shape)."""
    return hasattr(param, "ds_id")


def gathered(
    params: Iterable[torch.nn.Parameter], modify: bool = False
) -> contextlib.AbstractContextManager:
    """A context in which ``params`` are whole: a no-op unless some are partitioned, then the
    build context's ``gather`` (``modify``: keep what is written, from rank 0 of the
    partitioning group)."""
    params = list(params)
    if not any(is_partitioned(p) for p in params):
        return contextlib.nullcontext()
    fn = _BUILD.get().gather
    if fn is None:
        raise RuntimeError(
            "parameters are ZeRO-3 partitioned but the model build has no gather function "
            "(build under megatron_apt.engine.zero_init.partitioned_build)"
        )
    return fn(params, modify)


def unpartitioned() -> contextlib.AbstractContextManager:
    """A context in which modules are built whole even inside a partitioning build (the
    meta-device skeletons that validate a model file's shapes); a no-op elsewhere."""
    fn = _BUILD.get().suspend
    return contextlib.nullcontext() if fn is None else fn()
