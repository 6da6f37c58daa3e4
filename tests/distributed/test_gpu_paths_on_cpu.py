"""The training stages run under a CPU stand-in for a GPU (issue 29, items 1, 5 and 8).

``gpu_paths_worker.py`` builds each stage's Trainer under
:class:`megatron_apt.testing.devices.LogicalDevices`: the trainer's device is ``cuda:0``, a
tensor made on the host and mixed with device tensors raises as torch does on a GPU, a host
tensor handed to a collective raises as NCCL does. The first GPU run used to die at its first
log step (``torch.stack`` of CUDA losses with CPU gradient norms and throughput values); here
every stage trains, logs, checkpoints and exports, ``tools/generate.py --device cuda``
samples, and the control puts the old log step back and gets that crash.

Host synchronizations per update (``HostSyncCounter`` on device tensors, the project's code):
one at ZeRO 1-3 (the end of the update reads the non-finite flag), one per optimizer step at
ZeRO-0 (its client optimizer has no overflow check: the trainer decides on the host whether to
drop the gradients, two steps per APT update); no blocking host-to-device copy (the batch,
noise and timesteps go through pinned memory, ``megatron_apt.utils.transfer``). DeepSpeed's
own reads (its overflow check and gradient norm at ZeRO 1-3) are counted apart and not ours to
remove.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_apt.testing.launch import REPO_ROOT, launcher_env

WORKER = Path(__file__).with_name("gpu_paths_worker.py")
SCENARIOS = {  # name -> host syncs allowed per update (project code)
    "apt-zero0-fp32": 2,
    "apt-zero2-bf16": 1,
    "consistency-zero3-bf16": 1,
    "diffusion-zero1-bf16-cfg": 1,
}
EXPORTED = {
    "apt": ["discriminator.safetensors", "generator.safetensors", "generator_ema.safetensors"],
    "consistency": ["consistency.safetensors", "consistency_ema.safetensors"],
    "diffusion": ["diffusion.safetensors", "diffusion_ema.safetensors"],
}


def run_worker(*names: str) -> dict[str, dict]:
    proc = subprocess.run(
        [sys.executable, str(WORKER), *names],
        cwd=REPO_ROOT,
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    rows = [json.loads(ln[10:]) for ln in proc.stdout.splitlines() if ln.startswith("GPU-PATHS ")]
    assert proc.returncode == 0 and len(rows) == len(names), (
        proc.stdout[-3000:] + proc.stderr[-3000:]
    )
    return {r["scenario"]: r for r in rows}


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return run_worker(*SCENARIOS, "control-host-grad-norms", "generate")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_stage_trains_logs_and_exports_as_on_a_gpu(results, name):
    r = results[name]
    assert r["error"] is None, r.get("traceback")
    assert r["device"] == "cuda:0" and r["step"] == r["train_iters"]
    assert r["exported"] == EXPORTED[name.split("-")[0]]
    assert r["collectives"] > 0  # every one of them was checked for host tensors


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_host_syncs_per_update(results, name):
    r = results[name]
    assert r["syncs_per_update"] <= SCENARIOS[name], r["sync_sites"]
    assert r["blocking_copies_per_update"] == 0, r["copy_sites"]


def test_control_the_first_log_step_crash_is_caught(results):
    """The log step as it was before issue 29 (gradient norms and throughput values made on
    the host, stacked with the device losses; a copy in gpu_paths_worker.py): the first GPU
    run's crash, caught at the first log step."""
    r = results["control-host-grad-norms"]
    assert r["error"] is not None and "torch.stack at" in r["error"], r
    assert "gpu_paths_worker.py" in r["error"] and "cuda:0 and cpu" in r["error"]
    assert r["syncs_per_update"] <= 2  # the updates before it ran as in apt-zero0-fp32


def test_generate_runs_on_the_device(results):
    """``tools/generate.py --device cuda``: one step, and CFG diffusion with a negative prompt,
    through the VAE to PNGs, with nothing mixed between host and device."""
    r = results["generate"]
    assert r["error"] is None, r.get("traceback")
    assert set(r["runs"]) == {"one-step", "cfg"}
    for run in r["runs"].values():
        assert run["code"] == 0 and run["device"] == "cuda:0" and run["pngs"] == 2, run
