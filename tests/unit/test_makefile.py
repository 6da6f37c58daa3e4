"""The Makefile's install stamps (issue 14, items 8 and 9): one per set of extras, so an
install with other extras is not skipped; the GPU kernels' own two-step install, which
`make test-gpu` needs. Checked with `make -n` (prints, runs nothing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _plan(venv: Path, *args: str) -> str:
    proc = subprocess.run(
        ["make", "-n", "-C", str(ROOT), f"VENV={venv}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_install_stamp_depends_on_extras(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    assert '-e ".[dev]"' in _plan(venv, "test")  # nothing installed yet
    stamp = venv / ".installed-dev"
    stamp.touch()
    later = time.time() + 10  # newer than the Makefile, setup.py, pyproject.toml
    os.utime(stamp, (later, later))
    assert "pip install" not in _plan(venv, "test")  # the dev install is there
    other = _plan(venv, "venv", "EXTRAS=mpi,dev")
    assert '-e ".[mpi,dev]"' in other and ".installed-mpi-dev" in other
    # the GPU kernels: a second pip step without build isolation, at megatron-core's TE pins,
    # and test-gpu turns a missing TE on a CUDA machine into a failure
    gpu = _plan(venv, "test-gpu")
    assert "--no-build-isolation" in gpu and "transformer-engine[pytorch]>=2.9,<2.12" in gpu
    assert "MEGATRON_APT_REQUIRE_GPU_KERNELS=1" in gpu


def test_missing_gpu_kernels_fail_under_make_test_gpu(monkeypatch):
    """On a CUDA machine `make test-gpu` must not pass by skipping every TE test."""
    from megatron_apt.testing import gpu

    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(gpu.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="not_a_kernel_package.*make install-gpu"):
        gpu.require_gpu_package("not_a_kernel_package")
    monkeypatch.delenv(gpu.REQUIRE_ENV)
    with pytest.raises(pytest.skip.Exception):
        gpu.require_gpu_package("not_a_kernel_package")
    assert gpu.require_gpu_package("json").dumps([]) == "[]"
