"""How MMDiTs and discriminator heads are built: a context that builders and loaders set
(:func:`model_build`) and the models read (:func:`build_options`), so that the choice reaches
every megatron linear without a flag threaded through each constructor."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass


@dataclass(frozen=True)
class BuildOptions:
    """How models are built (see :func:`model_build`)."""

    use_cpu_initialization: bool | None = None  # None: each model decides
    initialize: bool = True


_DEFAULT_BUILD = BuildOptions()  # frozen: safe to share
_BUILD: contextvars.ContextVar[BuildOptions] = contextvars.ContextVar(
    "megatron_apt_build",
    default=_DEFAULT_BUILD,  # noqa: B039 (a frozen dataclass, never mutated)
)


@contextlib.contextmanager
def model_build(use_cpu_initialization: bool | None = None, initialize: bool | None = None):
    """Build MMDiTs and discriminator heads in this context with these options (None: as
    the enclosing context says; nested contexts refine it).

    ``initialize=False``: no random initialization (megatron's ``perform_initialization=False``,
    which its TE linears honour through ``condition_init_method``, megatron-core 0.16.1
    extensions/transformer_engine.py:309; and no DiT init of the replicated layers), for
    weights that are loaded right after: minutes for billions of parameters on a GPU.
    ``use_cpu_initialization=True``: megatron allocates its weights without a ``device=``, so
    an enclosing ``torch.device("meta")`` applies; with False it allocates on
    ``torch.cuda.current_device()`` explicitly (tensor_parallel/layers.py,
    ``ColumnParallelLinear.__init__``), which a meta context cannot redirect."""
    outer = _BUILD.get()
    token = _BUILD.set(
        BuildOptions(
            outer.use_cpu_initialization
            if use_cpu_initialization is None
            else use_cpu_initialization,
            outer.initialize if initialize is None else initialize,
        )
    )
    try:
        yield
    finally:
        _BUILD.reset(token)


def build_options() -> BuildOptions:
    return _BUILD.get()
