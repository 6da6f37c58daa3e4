"""GPU test helpers: a GPU kernel package that is missing on a CUDA machine is a failure under
``make test-gpu`` (``MEGATRON_APT_REQUIRE_GPU_KERNELS=1``), a skip elsewhere."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

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
