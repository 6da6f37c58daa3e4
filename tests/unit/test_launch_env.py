"""Which GPU each launcher's process takes, and what DeepSpeed then reads (issue 29, item 9).

Simulated launches (environment, CUDA device count, ``set_device`` and
``init_process_group`` patched): ``srun --gpus-per-task=1`` shows each task one GPU while
``SLURM_LOCALID`` runs 0-7, so local rank 3 must use device 0 and export ``LOCAL_RANK=0``:
DeepSpeed 0.19.8 calls ``set_device(int(os.environ['LOCAL_RANK']))`` itself
(runtime/engine.py:1966 and :1941-1943). ``srun`` with the node's 8 GPUs visible, torchrun,
Open MPI and MPICH keep device = local rank; more processes than GPUs stays an error. The
last step runs DeepSpeed's own ``_configure_with_arguments`` / ``_set_distributed_vars``
(which read the environment and set the device) against the exported variables.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

from megatron_apt.parallel import state

LAUNCH_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
)  # fmt: skip
ADDR = {"MASTER_ADDR": "node-001", "MASTER_PORT": "29500"}


@pytest.fixture
def launch(monkeypatch):
    """``launch(env, gpus)``: init_distributed(backend="nccl") in a simulated process with
    ``gpus`` visible CUDA devices; returns the device handed to ``torch.cuda.set_device``."""

    # the code under test writes os.environ directly: give it a copy for this test
    monkeypatch.setattr(os, "environ", dict(os.environ))

    def run(env: dict, gpus: int):
        for var in LAUNCH_VARS:
            monkeypatch.delenv(var, raising=False)
        for k, v in {**ADDR, **env}.items():
            monkeypatch.setenv(k, v)
        devices = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "set_device", devices.append)
        monkeypatch.setattr(state.dist, "is_initialized", lambda: False)
        monkeypatch.setattr(state.dist, "init_process_group", lambda *a, **k: None)
        state.init_distributed(backend="nccl")
        assert len(devices) == 1
        return devices[0]

    return run


def srun(localid: int, visible: str) -> dict:
    return {"SLURM_PROCID": str(8 + localid), "SLURM_NTASKS": "16",
            "SLURM_LOCALID": str(localid), "CUDA_VISIBLE_DEVICES": visible}  # fmt: skip


def test_srun_one_gpu_per_task_uses_the_visible_device(launch, capsys):
    assert launch(srun(3, "3"), gpus=1) == 0
    assert os.environ["LOCAL_RANK"] == "0"  # what DeepSpeed will set_device with
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("11", "16")
    assert launch(srun(1, "1"), gpus=1) == 0
    assert "local rank 1 sees one CUDA device" in capsys.readouterr().out  # once per node


def test_srun_with_all_gpus_visible_uses_the_local_rank(launch):
    assert launch(srun(3, "0,1,2,3,4,5,6,7"), gpus=8) == 3
    assert os.environ["LOCAL_RANK"] == "3"


def test_torchrun_uses_local_rank(launch):
    env = {"RANK": "10", "WORLD_SIZE": "16", "LOCAL_RANK": "2"}
    assert launch(env, gpus=8) == 2 and os.environ["LOCAL_RANK"] == "2"


def test_more_processes_than_gpus_is_refused(launch):
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=3 but this node has 2 visible"):
        launch(env, gpus=2)


@pytest.mark.parametrize("gpus, device", [(8, 5), (1, 0)])
def test_open_mpi(launch, gpus, device):
    env = {"OMPI_COMM_WORLD_RANK": "13", "OMPI_COMM_WORLD_SIZE": "16",
           "OMPI_COMM_WORLD_LOCAL_RANK": "5"}  # fmt: skip
    assert launch(env, gpus=gpus) == device
    # DeepSpeed asserts LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK (engine.py:1959-1964)
    assert os.environ["LOCAL_RANK"] == os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] == str(device)


@pytest.mark.parametrize("gpus, device", [(4, 3), (1, 0)])
def test_mpich(launch, gpus, device):
    env = {"PMI_RANK": "7", "PMI_SIZE": "8", "MPI_LOCALRANKID": "3"}
    assert launch(env, gpus=gpus) == device and os.environ["LOCAL_RANK"] == str(device)


@pytest.mark.parametrize(
    "env, gpus",
    [
        (srun(3, "3"), 1),
        (srun(3, "0,1,2,3,4,5,6,7"), 8),
        (
            {
                "OMPI_COMM_WORLD_RANK": "5",
                "OMPI_COMM_WORLD_SIZE": "8",
                "OMPI_COMM_WORLD_LOCAL_RANK": "5",
            },
            1,
        ),
    ],
)
def test_deepspeed_sets_the_same_device(launch, monkeypatch, env, gpus):
    """DeepSpeed 0.19.8's engine code (not a copy of it) reads the exported environment."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    ours = launch(env, gpus)
    ds_devices = []
    accel = types.SimpleNamespace(
        set_device=ds_devices.append, device_name=lambda i=None: f"cuda:{i}"
    )
    monkeypatch.setattr("deepspeed.runtime.engine.get_accelerator", lambda: accel)
    monkeypatch.setattr("deepspeed.runtime.engine.dist.get_world_size", lambda: 8)
    monkeypatch.setattr("deepspeed.runtime.engine.dist.get_rank", lambda: 5)
    engine = types.SimpleNamespace()
    DeepSpeedEngine._do_args_sanity_check(engine, None)
    DeepSpeedEngine._configure_with_arguments(engine, None, None)  # asserts for Open MPI
    DeepSpeedEngine._set_distributed_vars(engine, None)
    assert ds_devices == [ours]
