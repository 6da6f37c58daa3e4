"""GPU test helpers.

* :func:`require_gpu_package`: a GPU kernel package that is missing on a CUDA machine is a
  failure under ``make test-gpu`` (``MEGATRON_APT_REQUIRE_GPU_KERNELS=1``), a skip elsewhere.
* :func:`relative_errors`, :func:`to_device`: the CUDA-against-CPU comparisons of
  ``tests/gpu`` (each test body takes a device and a dtype, so that its CPU half runs in CI).
* :class:`MemoryMeter` and :class:`LiveTensorBytes`: bytes of live tensors and their peak, the
  same reading on CUDA (the caching allocator's ``memory_allocated``) and on the CPU (the
  storages allocated under a dispatch mode), for the memory planner's test.
"""

from __future__ import annotations

import importlib
import os
import weakref
from collections.abc import Mapping

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REQUIRE_ENV = "MEGATRON_APT_REQUIRE_GPU_KERNELS"


def require_gpu_package(name: str):
    """``import name``; without it: a failure when CUDA is visible and ``make test-gpu`` asked
    for the kernels, a skip otherwise (CPU machines, or a plain ``pytest tests/gpu``)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if os.environ.get(REQUIRE_ENV) == "1" and torch.cuda.is_available():
            pytest.fail(
                f"{name} is not importable on this CUDA machine ({e}); `make test-gpu` needs "
                "it: run `make install-gpu`",
                pytrace=False,
            )
        pytest.skip(f"needs {name}")


# ------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` (Frobenius, in fp32 on the CPU); the absolute error when
    ``want`` is zero (a gradient both sides leave at zero compares as 0)."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}")
    diff = (got - want).norm().item()
    scale = want.norm().item()
    return diff / scale if scale > 0 else diff


def relative_errors(
    got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """:func:`relative_error` of every entry; ``KeyError`` naming entries present on one side
    only (e.g. a parameter that got a gradient on one device and none on the other)."""
    if set(got) != set(want):
        raise KeyError(
            f"entries differ: only in got {sorted(set(got) - set(want))}, only in want "
            f"{sorted(set(want) - set(got))}"
        )
    return {k: relative_error(got[k], want[k]) for k in want}


def concatenated_error(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]):
    """:func:`relative_error` of all entries flattened into one vector (the large ones
    dominate: the error of the update as a whole)."""
    keys = sorted(want)
    cat = lambda d: torch.cat([d[k].detach().float().cpu().flatten() for k in keys])  # noqa: E731
    return relative_error(cat(got), cat(want))


def gradients(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Copies of the parameter gradients of ``module`` (parameters without one left out)."""
    return {
        prefix + n: p.grad.detach().clone()
        for n, p in module.named_parameters()
        if p.grad is not None
    }


def to_device(inputs: Mapping, device, dtype: torch.dtype, keep_fp32=("timesteps",)) -> dict:
    """``inputs`` on ``device``; floating tensors in ``dtype`` except ``keep_fp32``."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point() and k not in keep_fp32:
                v = v.to(dtype)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created by ops run under this mode that are still alive,
    and their peak: a CPU stand-in for ``torch.cuda.memory_allocated`` /
    ``max_memory_allocated``. A storage is counted once (views and in-place results share it)
    and released when it is freed (a ``weakref.finalize`` on the storage, whose Python object
    torch keeps alive as long as the storage lives). Not seen: buffers a kernel allocates and
    frees inside one op, and tensors created before the mode was entered."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._track(leaf.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live.add(key)
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.current -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.current


class MemoryMeter:
    """Live tensor bytes on ``device`` and their peak since :meth:`reset_peak`: the caching
    allocator's counters on CUDA (``torch.cuda.memory_allocated`` / ``max_memory_allocated``,
    cuBLAS workspaces included), :class:`LiveTensorBytes` on the CPU (use the meter as a
    context manager around everything it should see)."""

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._mode = None if self.cuda else LiveTensorBytes()

    def __enter__(self) -> MemoryMeter:
        if self._mode is not None:
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return self._mode.current

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self._mode.peak

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode.reset_peak()
