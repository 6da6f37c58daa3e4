"""Process groups, the CPU shim for megatron-core, and TP/SP helpers (no DeepSpeed here)."""

from megatron_apt.parallel.cpu_shim import install_cpu_shim
from megatron_apt.parallel.state import (
    ParallelState,
    destroy_parallel,
    init_distributed,
    initialize_parallel,
    single_process_state,
)

__all__ = [
    "ParallelState",
    "destroy_parallel",
    "init_distributed",
    "initialize_parallel",
    "install_cpu_shim",
    "single_process_state",
]
