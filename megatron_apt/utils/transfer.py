"""Host-to-device copies that do not stop the host.

On CUDA, ``cpu_tensor.to(cuda)`` from pageable memory waits until the copy is done, and with
it every kernel queued before it: a host synchronization per copy (torch 2.13
``aten/src/ATen/native/cuda/Copy.cu`` ``copy_kernel_cuda``: a non-``non_blocking`` copy ends
with ``AT_CUDA_CHECK(cudaStreamSynchronize(stream))``). A copy from page-locked (pinned)
memory with ``non_blocking=True`` is queued on the stream and returns at once; torch's caching
host allocator keeps the pinned block alive until the copy has run (``CachingHostAllocator``
records an event on the block, ``copy_kernel_cuda`` -> ``CachingHostAllocator_recordEvent``),
so the caller may drop the host tensor right away. Everything the training step copies to
the device per micro-batch (the batch, per-sample noise and timesteps drawn on the CPU)
goes through :func:`to_device`.
"""

from __future__ import annotations

import torch


def to_device(
    t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``t.to(device, dtype)``; from the host to a CUDA device through pinned memory without
    blocking the host (module docstring). Elsewhere (CPU to CPU) a plain ``.to``."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
        out = t.to(device, non_blocking=True)
        return out if dtype is None else out.to(dtype)
    return t.to(device) if dtype is None else t.to(device, dtype)


def device_scalar(value, device: torch.device) -> torch.Tensor:
    """A metric as a float64 0-dim tensor on ``device``: a tensor from anywhere, or a number
    (the trainer's log step stacks device losses with host throughput values this way)."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(device, torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=device)
