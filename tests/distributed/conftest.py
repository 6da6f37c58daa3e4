"""Fixtures shared by the end-to-end tests: one quick demo (examples/demo.py --quick) per
session, checked by test_demo.py and reused as the base of the quick study (test_study.py), as
`python examples/apt_study.py --base runs/demo-seed1 --base-seed 1` reuses a finished demo."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from megatron_apt.testing.launch import run_quick_demo


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished quick demo (seed 11) and its first run's process; its folder is shared."""
    out = tmp_path_factory.mktemp("quick-demo") / "demo"
    proc = run_quick_demo(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc
