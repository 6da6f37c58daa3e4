"""Timing and memory harness of ``tools/benchmark.py``: interleaved repeats (a drift in machine
load hits every contender alike), peak memory of one call, and a dense matmul as the
machine's reference speed."""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["matmul_reference", "measure_peak_memory", "sync", "time_interleaved"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    device: torch.device,
    faults: dict[str, list[int]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function. Warm-up calls first; then each repeat calls every
    function once, alternating the order, so that a drift in machine load hits all alike.
    ``faults``, if given, receives the process's minor page faults during each timed call
    (``getrusage`` ``ru_minflt``: pages the kernel mapped in afresh, e.g. for a large buffer
    allocated anew per call)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    if faults is not None:
        faults.update({k: [] for k in fns})
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for key in order:
            sync(device)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            fns[key]()
            sync(device)
            times[key].append(time.perf_counter() - t0)
            if faults is not None:
                faults[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return times


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def measure_peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak memory of one (untimed) call of ``fn``.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset before the call). CPU: the process's peak
    resident set size (Linux VmHWM, reset before the call through /proc/self/clear_refs), which
    counts the weights, every live tensor and the allocator's cached pages; where the reset is
    not allowed, ``ru_maxrss`` (the peak since the process started).
    """
    gc.collect()
    mib = 2**20
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "method": "torch.cuda.max_memory_allocated",
            "peak_mib": peak / mib,
            "peak_above_start_mib": (peak - start) / mib,
        }
    if _reset_peak_rss():
        start = _proc_status_kib("VmRSS") or 0
        fn()
        peak = _proc_status_kib("VmHWM") or 0
        return {
            "method": "peak RSS of the process (VmHWM reset before the call)",
            "peak_mib": peak / 1024,
            "peak_above_start_mib": (peak - start) / 1024,
        }
    fn()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": "peak RSS of the process since start (ru_maxrss; VmHWM reset unavailable)",
        "peak_mib": peak_kib / 1024,
        "peak_above_start_mib": None,
    }


def matmul_reference(
    m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, warmup: int, repeats: int
) -> dict:
    """A dense ``[m x k] @ [k x n]`` in the benchmark's dtype, device and threads: what this
    machine's GEMM reaches on an MLP-like product of the run's size."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device, dtype)
    b = torch.randn(k, n, generator=g).to(device, dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    times = time_interleaved(
        {"mm": lambda: torch.mm(a, b, out=out)}, max(warmup, 1), max(repeats, 3), device
    )["mm"]
    median = statistics.median(times)
    return {
        "shape": [m, k, n],
        "dtype": str(dtype).removeprefix("torch."),
        "flops": 2.0 * m * k * n,
        "times_s": times,
        "median_s": median,
        "tflops": 2.0 * m * k * n / median / 1e12,
    }
