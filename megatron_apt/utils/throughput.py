"""Achieved FLOP/s, model FLOPs utilization (MFU), tokens/s and peak memory: what every
training log step reports (``tflops_per_gpu``, ``mfu``, ``tokens_per_s``, ``peak_mem_gib``).

* FLOPs are analytic (:func:`megatron_apt.config.flops.phase_flops`), counted per micro-batch
  from its real shapes, divided over the model-parallel ranks (TP x CP) that share it;
* the peak is the datasheet's on H100 / H200 (:data:`DATASHEET_PEAK_TFLOPS`), and on a CPU a
  dense 1024^3 matmul measured at start in the training dtype (:func:`reference_peak`, with
  the benchmark's ``matmul_reference``): there MFU
  reads "share of what this machine's GEMM reaches", not of a datasheet;
* peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak resident set
  (``VmHWM``) on a CPU.
"""

from __future__ import annotations

import torch

__all__ = [
    "DATASHEET_PEAK_TFLOPS",
    "DATASHEET_SOURCE",
    "ThroughputMeter",
    "datasheet_peak",
    "peak_memory_gib",
    "reference_peak",
]

# NVIDIA datasheet peaks, dense (without sparsity), TFLOP/s: "NVIDIA H100 Tensor Core GPU"
# datasheet (H100 SXM5 / PCIe / NVL columns) and "NVIDIA H200 Tensor Core GPU" datasheet
# (H200 SXM). float32 is the non-tensor-core FP32 figure (torch does not use TF32 by default);
# fp8 applies to the Transformer Engine FP8 spec.
DATASHEET_PEAK_TFLOPS = {
    "H100 SXM": {"float32": 67.0, "bfloat16": 989.0, "float16": 989.0, "fp8": 1979.0},
    "H100 PCIe": {"float32": 51.0, "bfloat16": 756.0, "float16": 756.0, "fp8": 1513.0},
    "H100 NVL": {"float32": 60.0, "bfloat16": 835.0, "float16": 835.0, "fp8": 1671.0},
    "H200 SXM": {"float32": 67.0, "bfloat16": 989.0, "float16": 989.0, "fp8": 1979.0},
}
DATASHEET_SOURCE = (
    "DATASHEET_PEAK_TFLOPS in megatron_apt/utils/throughput.py (NVIDIA H100 / H200 Tensor Core "
    "GPU datasheets, dense, no sparsity)"
)


def datasheet_peak(device: torch.device, dtype: torch.dtype, fp8: bool = False) -> dict | None:
    """The datasheet peak of an H100 / H200 for ``dtype`` (or FP8); None elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        key = "H200 SXM"
    elif "H100" in name:
        key = "H100 PCIe" if "PCIe" in name else "H100 NVL" if "NVL" in name else "H100 SXM"
    else:
        return None
    column = "fp8" if fp8 else str(dtype).removeprefix("torch.")
    tflops = DATASHEET_PEAK_TFLOPS[key].get(column)
    if tflops is None:
        return None
    return {"device": key, "precision": column, "tflops": tflops, "source": DATASHEET_SOURCE}


def reference_peak(device: torch.device, dtype: torch.dtype, fp8: bool = False) -> dict:
    """The peak MFU is measured against: the datasheet's on H100 / H200, else a matmul
    measured now (``{"tflops", "source"}``)."""
    sheet = datasheet_peak(device, dtype, fp8)
    if sheet is not None:
        return {"tflops": sheet["tflops"], "source": f"datasheet {sheet['device']}"}
    from megatron_apt.benchmarking.timing import matmul_reference

    tflops = matmul_reference(1024, 1024, 1024, dtype, device, warmup=1, repeats=3)["tflops"]
    name = str(dtype).removeprefix("torch.")
    return {"tflops": tflops, "source": f"measured 1024^3 {name} matmul on {device.type}"}


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations, or the CPU's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kiB -> GiB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: kiB


class ThroughputMeter:
    """FLOPs and tokens of this rank's micro-batches since the last :meth:`take`."""

    def __init__(self) -> None:
        self.flops = 0.0
        self.tokens = 0.0

    def add(self, flops: float, tokens: float) -> None:
        self.flops += flops
        self.tokens += tokens

    def take(self) -> tuple[float, float]:
        out = (self.flops, self.tokens)
        self.flops = self.tokens = 0.0
        return out
