"""RMSprop whose CPU update runs chunk by chunk: the same arithmetic as ``torch.optim.RMSprop``,
bit for bit, without a parameter-sized temporary.

torch's single-tensor RMSprop (torch 2.13 ``torch/optim/rmsprop.py`` ``_single_tensor_rmsprop``,
lines 316-339, the path it takes on CPU, where neither ``foreach`` nor ``fused`` is the
default) makes four passes over every parameter and allocates ``avg = square_avg.sqrt()`` of the
parameter's size. Under ZeRO 1/2 DeepSpeed hands the optimizer one flat fp32 partition per
parameter group (``stage_1_and_2.py`` ``single_partition_of_fp32_groups``): at the ``mid``
preset a 36M-element tensor, so each step allocates 144 MB, which glibc serves with a fresh
``mmap`` whose pages fault in anew every step, and streams the whole partition through memory
four times. :class:`ChunkedRMSprop` runs the same four element-wise operations on slices of
:data:`CHUNK` elements into one reused buffer: every element sees exactly torch's operations in
torch's order, so the result is identical (``tests/unit/test_rmsprop.py`` compares parameters
and states with ``torch.equal``), while a slice stays in the cache across the four passes and
nothing is allocated per step (measured: 0.36x torch's time on a 36M-element partition, about
torch's time on the per-tensor parameters of ZeRO-0).

It is a subclass of ``torch.optim.RMSprop``: state, ``state_dict`` and checkpoints are torch's.
The chunked path is taken for CPU tensors in the configuration the recipes use (no momentum,
not centered, not ``maximize``/``differentiable``/``capturable``/``foreach``/``fused``, real
dtypes, contiguous); anything else goes through torch's own step. On a GPU torch's ``foreach``
kernels are the better choice and are used unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["CHUNK", "ChunkedRMSprop"]

# Elements per slice: 4 MiB of fp32. A slice's four arrays (16 MiB) stay in the last-level
# cache through the four passes; the buffer is far below glibc's largest mmap threshold (32 MiB),
# so weight decay's per-slice temporary comes from the heap; ~35 slices per 36M-element
# partition keep the Python loop's dispatch negligible. Measured (2 cores, mid preset's G, 35.6M
# parameters, one flat partition): 2^16 elements 39 ms per step, 2^18 29 ms, 2^20 23.5 ms,
# 2^21 22 ms, torch's RMSprop 66-72 ms (docs/performance.md).
CHUNK = 1 << 20


def _scalar_dtype() -> torch.dtype:
    # torch/optim/optimizer.py _get_scalar_dtype (not fused): the dtype of state["step"]
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _chunkable(group: dict) -> bool:
    return (
        group["momentum"] == 0
        and not group["centered"]
        and not group["maximize"]
        and not group["differentiable"]
        and not group["capturable"]
        and not group.get("foreach")
        and not group.get("fused")
    )


def _chunkable_param(p: torch.Tensor, grad: torch.Tensor) -> bool:
    return (
        p.device.type == "cpu"
        and not p.is_complex()
        and not grad.is_sparse
        and p.is_contiguous()
        and grad.is_contiguous()
        and grad.dtype == p.dtype
    )


class ChunkedRMSprop(torch.optim.RMSprop):
    """``torch.optim.RMSprop`` (same arguments, state and results) with a chunked CPU step;
    see the module docstring."""

    def _buffer(self, dtype: torch.dtype) -> torch.Tensor:
        """The reused slice buffer of ``dtype`` (not state: rebuilt after a copy or unpickling)."""
        buffers = self.__dict__.setdefault("_chunk_buffers", {})
        buf = buffers.get(dtype)
        if buf is None:
            buf = buffers[dtype] = torch.empty(CHUNK, dtype=dtype)
        return buf

    @torch.no_grad()
    def step(self, closure=None):
        if not all(_chunkable(g) for g in self.param_groups):
            return super().step(closure)
        if any(
            p.grad is not None and not _chunkable_param(p, p.grad)
            for g in self.param_groups
            for p in g["params"]
        ):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._chunked_group(group)
        return loss

    def _chunked_group(self, group: dict) -> None:
        lr, alpha, eps, wd = group["lr"], group["alpha"], group["eps"], group["weight_decay"]
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:  # as torch's RMSprop._init_group (non-capturable, no momentum)
                state["step"] = torch.zeros((), dtype=_scalar_dtype())
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            square_avg = state["square_avg"]
            buf = self._buffer(p.dtype)
            pf, gf, sf = p.view(-1), p.grad.view(-1), square_avg.view(-1)
            n = pf.numel()
            for s in range(0, n, CHUNK):
                e = min(n, s + CHUNK)
                pc, gc, sc = pf[s:e], gf[s:e], sf[s:e]
                if wd != 0:
                    gc = gc.add(pc, alpha=wd)
                sc.mul_(alpha).addcmul_(gc, gc, value=1 - alpha)
                avg = torch.sqrt(sc, out=buf[: e - s])
                avg.add_(eps)
                pc.addcdiv_(gc, avg, value=-lr)
