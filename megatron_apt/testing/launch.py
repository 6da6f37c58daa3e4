"""Run a script under a real multi-process launcher (torchrun, deepspeed, mpirun) from tests.

Multi-process CPU runs use gloo, one thread per process, and a free port. The caller gives a
success marker that the script prints at its very end: a rare abort at interpreter exit after
the work is done must not hide a pass, and an exit code of 0 without the marker is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(launcher: str, nproc: int, script: str, args: list[str]) -> list[str]:
    bindir = Path(sys.executable).parent
    port = str(free_port())
    if launcher == "torchrun":
        exe = shutil.which("torchrun", path=str(bindir)) or "torchrun"
        return [exe, "--nproc-per-node", str(nproc), "--master-port", port, script, *args]
    if launcher == "deepspeed":
        exe = shutil.which("deepspeed", path=str(bindir)) or "deepspeed"
        return [exe, "--num_gpus", str(nproc), "--master_port", port, script, *args]
    if launcher == "mpirun":
        exe = shutil.which("mpirun", path=str(bindir)) or "mpirun"
        return [exe, "-n", str(nproc), sys.executable, script, *args]
    if launcher == "python":
        return [sys.executable, script, *args]
    raise ValueError(f"unknown launcher {launcher!r}")


def launcher_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the CPU tests' workers: gloo, no visible GPU (on a GPU machine NCCL
    would otherwise get CPU tensors and both ranks would land on cuda:0), DeepSpeed's CPU
    accelerator, one thread each; ``env`` on top."""
    full_env = dict(os.environ)
    full_env.update(
        {
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
            "MEGATRON_APT_BACKEND": "gloo",
            "MEGATRON_APT_TESTING": "1",  # fault-injection hooks act only under the tests
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            ),
            "PYTHONWARNINGS": "ignore",
        }
    )
    full_env.update(env or {})
    return full_env


def run_launcher(
    script: str | Path,
    args: list[str] | tuple[str, ...] = (),
    *,
    nproc: int = 2,
    launcher: str = "torchrun",
    marker: str | None = None,
    timeout: int = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` processes; raise ``AssertionError`` with the output tail
    when it fails or when ``marker`` is missing from stdout."""
    full_env = launcher_env(env)
    cmd = launcher_command(launcher, nproc, str(script), [str(a) for a in args])
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    ok = marker is None or proc.stdout.count(marker) >= (nproc if launcher != "python" else 1)
    if not ok or (proc.returncode != 0 and marker is None):
        tail = proc.stdout[-4000:] + "\n--- stderr ---\n" + proc.stderr[-6000:]
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}, marker "
            f"{marker!r} {'found' if ok else 'missing'}:\n{tail}"
        )
    return proc


QUICK_DEMO_SEED = 11


def run_quick_demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``examples/demo.py --quick --seed 11 --out OUT``: a few steps of every stage (tests)."""
    cmd = [sys.executable, str(REPO_ROOT / "examples" / "demo.py"), "--quick", "--out", str(out),
           "--seed", str(QUICK_DEMO_SEED), *extra]  # fmt: skip
    return subprocess.run(
        cmd, cwd=REPO_ROOT, env=launcher_env(), capture_output=True, text=True, timeout=900
    )
