"""Regional compilation: ``torch.compile`` of each MMDiT block (``nn.Module.compile``, in
place), as torchtitan compiles transformer blocks. The blocks of a model share their code, so
dynamo compiles one graph and reuses it for every block with the same structure (parameters
are graph inputs; ``torch._dynamo.config.inline_inbuilt_nn_modules``, on by default in torch
2.13): compile time is that of one block, not of the model. Embeddings, heads and the
collectives of tensor / context parallelism between blocks stay eager.

If the first compiled call fails (an unsupported op, no C++ compiler for inductor on a CPU),
the model falls back to eager blocks and says so once on stderr: never silently.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["compile_blocks", "compile_mmdits", "compile_status", "run_compiled"]

_ATTR = "_megatron_apt_compile"


def compile_blocks(model: torch.nn.Module, mode: str | None = None) -> int:
    """Compile every block of ``model`` (an MMDiT) in place; returns how many."""
    for block in model.blocks:
        block.compile(mode=mode)
    setattr(model, _ATTR, "pending")
    return len(model.blocks)


def compile_mmdits(modules) -> int:
    """:func:`compile_blocks` of the MMDiT in each module (an MMDiT, or a Generator /
    Discriminator around one); returns the number of blocks compiled."""
    n = 0
    for m in modules:
        for attr in ("model", "backbone"):
            m = getattr(m, attr, m)
        n += compile_blocks(m)
    return n


def compile_status(model: torch.nn.Module) -> str:
    """``"off"``, ``"pending"`` (before the first call), ``"on"`` or ``"failed: ..."``."""
    return getattr(model, _ATTR, "off")


def run_compiled(model: torch.nn.Module, call):
    """``call()`` (which runs a block); on the first compiled call a failure turns the blocks
    back to eager, is reported, and ``call()`` runs again eagerly."""
    if compile_status(model) != "pending":
        return call()
    try:
        out = call()
    except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, loudly
        for block in model.blocks:
            block._compiled_call_impl = None
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        setattr(model, _ATTR, f"failed: {reason}")
        print(
            f"WARNING: torch.compile of the MMDiT blocks failed ({reason}); running them eagerly",
            file=sys.stderr,
            flush=True,
        )
        return call()
    setattr(model, _ATTR, "on")
    return out
