"""The Makefile's install stamp depends on the extras: after `make test` (dev extras),
`make test-gpu EXTRAS=gpu,dev` must install the GPU extras instead of finding a stamp and
running the GPU tests without them. Checked with `make -n` (prints, runs nothing)."""

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
    gpu = _plan(venv, "test-gpu", "EXTRAS=gpu,dev")
    assert '-e ".[gpu,dev]"' in gpu and "touch" in gpu and ".installed-gpu-dev" in gpu
