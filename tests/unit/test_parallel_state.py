"""Process-group set-up: launcher environment parsing and errors before any collective; the
backend and device choices a GPU machine makes (faked here: CUDA is patched in)."""

import pytest
import torch

from megatron_apt.parallel import state

SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1)),
        (
            {
                "OMPI_COMM_WORLD_RANK": "2",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            },
            (2, 4, 0),
        ),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 2, 0)),
        # srun without a launcher (one task per GPU), with the rendezvous address exported
        (
            {
                "SLURM_PROCID": "5",
                "SLURM_NTASKS": "8",
                "SLURM_LOCALID": "1",
                "MASTER_ADDR": "node-001",
                "MASTER_PORT": "29500",
            },
            (5, 8, 1),
        ),  # fmt: skip
        # a launcher inside an allocation: its variables win over SLURM's
        ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, (0, 2, 0)),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),  # one task: a world of one
        ({}, None),
    ],
)
def test_rank_discovery_from_launcher_env(monkeypatch, env, expected):
    for var in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "PMI_RANK",
        "PMI_SIZE",
        "MPI_LOCALRANKID",
        *SLURM_VARS,
    ):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert state._rank_env() == expected


@pytest.mark.parametrize(
    "tp, cp, match",
    [(2, 1, "world size 1 is not divisible by tensor_parallel_size=2"), (0, 1, "must be >= 1")],
)
def test_impossible_parallel_sizes_fail_before_any_collective(tp, cp, match):
    with pytest.raises(ValueError, match=match):
        state.initialize_parallel(tensor_parallel_size=tp, context_parallel_size=cp)


def test_single_process_state_is_world_of_one():
    ps = state.single_process_state()
    assert (ps.tp_size, ps.dp_size, ps.cp_size, ps.world_size) == (1, 1, 1, 1)
    assert ps.tp_group.size() == 1 and not ps.sequence_parallel


def test_srun_without_launcher_or_address_is_refused(monkeypatch):
    """Without a launcher, srun's tasks must not each become a world of one writing --save."""
    for var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", *SLURM_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    with pytest.raises(RuntimeError, match=r"srun as task 2 of 16.*MASTER_ADDR"):
        state._rank_env()


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(state.BACKEND_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert state.choose_backend() == "nccl"  # a GPU machine
    monkeypatch.setenv(state.BACKEND_ENV, "gloo")  # what the CPU tests set
    assert state.choose_backend() == "gloo"
    assert state.choose_backend("nccl") == "nccl"  # an explicit argument wins
    monkeypatch.setenv(state.BACKEND_ENV, "ncl")
    with pytest.raises(ValueError, match="MEGATRON_APT_BACKEND='ncl'"):
        state.choose_backend()


def test_cpu_tests_pin_gloo_and_hide_cuda():
    """On a GPU machine the CPU suite must not pick NCCL (its tensors are on the CPU) nor map
    its 2 ranks to cuda:0: the test session and every launched worker use gloo and see no GPU."""
    import os

    from megatron_apt.testing.launch import launcher_env

    assert os.environ.get(state.BACKEND_ENV) == "gloo"  # tests/conftest.py
    env = launcher_env()
    assert env[state.BACKEND_ENV] == "gloo" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["DS_ACCELERATOR"] == "cpu"


@pytest.mark.parametrize(
    "local_rank, count, device",
    [(0, 8, 0), (7, 8, 7), (3, 1, 0), (0, 1, 0), (8, 8, None), (2, 2, None)],
)
def test_local_rank_must_name_a_visible_gpu(monkeypatch, local_rank, count, device):
    """DeepSpeed sets the device from the raw LOCAL_RANK: a modulo would put 2 ranks on 1 GPU.
    One visible device (srun --gpus-per-task=1) is the process's own, whatever its local rank
    (tests/unit/test_launch_env.py)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if device is not None:
        assert state.cuda_device_for(local_rank) == device
    else:
        with pytest.raises(
            RuntimeError, match=f"LOCAL_RANK={local_rank} but this node has {count}"
        ):
            state.cuda_device_for(local_rank)


def test_comm_device_follows_the_backend(monkeypatch):
    """Flags and metrics for a collective live on the backend's device: CUDA under NCCL."""
    monkeypatch.setattr(state.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(state.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert state.comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(state.dist, "get_backend", lambda group=None: "gloo")
    assert state.comm_device() == torch.device("cpu")
    assert state.comm_tensor([1.0]).device == torch.device("cpu")
