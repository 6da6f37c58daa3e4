"""Let megatron-core's tensor-parallel code run on CPU with the gloo backend.

megatron-core 0.16 reaches for CUDA in a few places that have nothing to do with the math:
the device of communication buffers in sequence parallelism, the RNG tracker of
``model_parallel_cuda_manual_seed`` and activation recompute, and a ``synchronize`` in
``dist_checkpointing``. :func:`install_cpu_shim` redirects exactly those to their CPU
equivalents. It is installed only when CUDA is absent, so GPU runs use megatron unchanged.
"""

from __future__ import annotations

import torch

_INSTALLED = False


def _cpu_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def install_cpu_shim(force: bool = False) -> bool:
    """Install the CPU redirections once; returns True when they are (now) active.

    Does nothing when CUDA is available unless ``force`` (tests of the shim itself).
    """
    global _INSTALLED
    if _INSTALLED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: torch.device("cpu")  # buffers of SP all-gathers
    torch.cuda.synchronize = lambda device=None: None  # dist_checkpointing.save
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)  # RNG tracker states
    mp_random._get_cuda_rng_state = _cpu_get_rng_state
    mp_random._set_cuda_rng_state = _cpu_set_rng_state
    _INSTALLED = True
    return True


def cpu_shim_installed() -> bool:
    return _INSTALLED
