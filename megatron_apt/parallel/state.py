"""Process groups: torch.distributed start-up and megatron-core ``parallel_state``.

Everything below the entry point receives a :class:`ParallelState` and passes its groups
explicitly; nothing reads megatron's global state after :func:`initialize_parallel`.
Layout (megatron's default order ``tp-cp-ep-dp-pp``): tensor-parallel ranks are adjacent,
so a TP group stays inside a node.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_apt.parallel.cpu_shim import install_cpu_shim


@dataclass(frozen=True)
class ParallelState:
    """The process groups of one rank and their sizes."""

    tp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    cp_group: dist.ProcessGroup | None
    tp_size: int = 1
    tp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    cp_size: int = 1
    cp_rank: int = 0
    sequence_parallel: bool = False
    # data x context parallel: the group gradients are reduced over and ZeRO shards over
    # (megatron's ``get_data_parallel_group(with_context_parallel=True)``); None when cp = 1
    dp_cp_group: dist.ProcessGroup | None = None
    dp_cp_rank: int = 0
    # tensor x context parallel: the ranks of one model replica (:attr:`model_group`)
    tp_cp_group: dist.ProcessGroup | None = None
    # tensor x data x context parallel: the FP8 amax reduction group, megatron's
    # ``get_amax_reduction_group(with_context_parallel=True)`` (None: TE's default, the world)
    amax_group: dist.ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return self.tp_size * self.cp_size * self.dp_size

    @property
    def dp_cp_size(self) -> int:
        return self.dp_size * self.cp_size

    @property
    def grad_group(self) -> dist.ProcessGroup | None:
        """The group of the data-parallel gradient reduction (and ZeRO partitioning)."""
        return self.dp_cp_group if self.cp_size > 1 else self.dp_group

    @property
    def model_group(self) -> dist.ProcessGroup | None:
        """The ranks that compute one model replica together: TP, or TP x CP."""
        return self.tp_cp_group if self.cp_size > 1 else self.tp_group

    @property
    def model_rank(self) -> int:
        """Rank in :attr:`model_group` (TP ranks adjacent, then CP)."""
        return self.cp_rank * self.tp_size + self.tp_rank

    @property
    def grad_rank(self) -> int:
        return self.dp_cp_rank if self.cp_size > 1 else self.dp_rank


BACKEND_ENV = "MEGATRON_APT_BACKEND"  # overrides the backend choice (the CPU tests pin gloo)


def _rank_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from launcher environment variables, if any. SLURM's
    (``srun`` without a launcher: one task per GPU) come last: under torchrun / deepspeed /
    mpirun inside an allocation they describe the allocation, not this process."""
    for r, w, lr in (
        ("RANK", "WORLD_SIZE", "LOCAL_RANK"),  # torchrun, deepspeed
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Hydra
    ):
        if r in os.environ and w in os.environ:
            return int(os.environ[r]), int(os.environ[w]), int(os.environ.get(lr, 0))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError(
                f"started by srun as task {os.environ['SLURM_PROCID']} of "
                f"{os.environ['SLURM_NTASKS']} without a launcher and without MASTER_ADDR / "
                "MASTER_PORT: every task would become its own world of one and write the same "
                "--save. Export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | "
                "head -n 1) and MASTER_PORT, or start one torchrun / deepspeed per node"
            )
        return (
            int(os.environ["SLURM_PROCID"]),
            int(os.environ["SLURM_NTASKS"]),
            int(os.environ.get("SLURM_LOCALID", 0)),
        )
    return None


def choose_backend(backend: str | None = None) -> str:
    """``backend``, else ``$MEGATRON_APT_BACKEND``, else ``nccl`` with CUDA and ``gloo``
    without. The CPU tests set ``MEGATRON_APT_BACKEND=gloo`` (and hide CUDA from their
    launched workers): on a GPU machine NCCL would otherwise get their CPU tensors."""
    backend = backend or os.environ.get(BACKEND_ENV) or None
    if backend is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo", "mpi"):
        raise ValueError(f"{BACKEND_ENV}={backend!r}: choose nccl, gloo or mpi")
    return backend


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device of tensors handed to a collective of ``group``'s backend: the current CUDA
    device under NCCL (which has no CPU support: "No backend type associated with device type
    cpu"), the CPU otherwise. Every tensor the project creates for a collective is made here
    (:func:`comm_tensor`) or taken from the model's device, which is this one."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_tensor(data, dtype: torch.dtype = torch.float32, group=None) -> torch.Tensor:
    """``torch.tensor(data)`` on :func:`comm_device` (for flags and small reductions)."""
    return torch.tensor(data, dtype=dtype, device=comm_device(group))


CUDA_MAX_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


def configure_cuda_env(tensor_parallel_size: int, env=None) -> str | None:
    """Set ``CUDA_DEVICE_MAX_CONNECTIONS=1`` for tensor-parallel runs; call before CUDA starts.

    megatron-core's parallel linears launch the dgrad all-reduce (TP) or the reduce-scatter
    (SP) asynchronously and "rely on CUDA_DEVICE_MAX_CONNECTIONS=1 to ensure that the
    reduce scatter is scheduled before the weight gradient computation" (megatron-core 0.16.1,
    tensor_parallel/layers.py:545-559; the requirement is stated at :657): with more
    hardware queues the weight-gradient GEMM may run first and the communication no longer
    overlaps it. CUDA reads the variable when its context is created, so it is set here, at
    start-up, unless the user chose a value (then a warning says what it costs). Returns a
    message to print, or None."""
    env = os.environ if env is None else env
    if tensor_parallel_size <= 1:
        return None
    value = env.get(CUDA_MAX_CONNECTIONS)
    if value is None:
        env[CUDA_MAX_CONNECTIONS] = "1"
        return None
    if value != "1":
        return (
            f"warning: {CUDA_MAX_CONNECTIONS}={value}; megatron's tensor-parallel linears "
            "overlap their gradient communication with compute only with 1"
        )
    return None


def cuda_device_for(local_rank: int) -> int:
    """The CUDA device of a process: its local rank when the node's devices are all visible
    to it (torchrun, deepspeed, mpirun, ``srun`` with the node's GPUs shared), or the one
    visible device when the launcher gave each process its own (``srun --gpus-per-task=1``:
    SLURM sets ``CUDA_VISIBLE_DEVICES`` to one id while ``SLURM_LOCALID`` runs 0-7).

    With several visible devices a local rank beyond them is an error, not a modulo: that
    would put two ranks on one GPU (more processes than GPUs on a node), which shows only
    when memory runs out."""
    count = torch.cuda.device_count()
    if 0 <= local_rank < count:
        return local_rank
    if count == 1 and local_rank > 0:
        return 0  # one device per process
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    raise RuntimeError(
        f"LOCAL_RANK={local_rank} but this node has {count} visible CUDA device(s) "
        f"(CUDA_VISIBLE_DEVICES={visible}): start at most {count} processes per node "
        "(deepspeed --num_gpus / torchrun --nproc-per-node / srun --ntasks-per-node)"
    )


def export_local_rank(device: int, local_rank: int, env=None) -> str | None:
    """Make ``LOCAL_RANK`` name the CUDA device of this process, as DeepSpeed expects.

    DeepSpeed 0.19.8 takes the device from the environment, not from us: ``DeepSpeedEngine``
    reads ``self.local_rank = int(os.environ['LOCAL_RANK'])`` (runtime/engine.py:1966, in
    ``_configure_with_arguments``) and calls ``get_accelerator().set_device(device_rank)``
    with it (engine.py:1941-1943, ``_set_distributed_vars``; the CUDA accelerator's
    ``set_device`` is ``torch.cuda.set_device``, accelerator/cuda_accelerator.py:76-77).
    With one visible device and ``SLURM_LOCALID=3`` it would call ``set_device(3)`` and fail,
    so ``LOCAL_RANK`` becomes ``0``. Under Open MPI DeepSpeed also asserts ``LOCAL_RANK ==
    OMPI_COMM_WORLD_LOCAL_RANK`` (engine.py:1959-1964, "conflicting local rank info"), so that
    variable follows (MPI itself was started from its own runtime, not from it). Returns a
    one-line note when the device is not the local rank, else None."""
    env = os.environ if env is None else env
    env["LOCAL_RANK"] = str(device)  # a stale value from the shell must not win either
    if device == local_rank:
        return None
    if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
        env["OMPI_COMM_WORLD_LOCAL_RANK"] = str(device)
    return (
        f"note: local rank {local_rank} sees one CUDA device "
        f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')}, e.g. srun "
        f"--gpus-per-task=1): using cuda:{device}, LOCAL_RANK={device} for DeepSpeed"
    )


def _mpi_rendezvous(rank: int, world_size: int) -> None:
    """Under ``mpirun`` (no MASTER_ADDR): agree on a TCP store address through mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise RuntimeError(
            "launched by an MPI launcher without MASTER_ADDR/MASTER_PORT: install the `mpi` extra "
            "(pip install 'megatron-apt[mpi]') so ranks can be discovered through mpi4py"
        ) from e
    comm = MPI.COMM_WORLD
    if comm.Get_size() != world_size or comm.Get_rank() != rank:
        raise RuntimeError(
            f"mpi4py sees rank {comm.Get_rank()}/{comm.Get_size()}, environment says "
            f"{rank}/{world_size}"
        )
    addr = None
    if rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        addr = (socket.gethostname() if world_size > 1 else "127.0.0.1", port)
    addr = comm.bcast(addr, root=0)
    os.environ.setdefault("MASTER_ADDR", addr[0])
    os.environ.setdefault("MASTER_PORT", str(addr[1]))


def init_distributed(backend: str | None = None, timeout_minutes: float = 30) -> tuple[int, int]:
    """Start torch.distributed from the launcher's environment (torchrun, deepspeed, mpirun).

    A process started without a launcher becomes a world of one (in-memory store). Returns
    ``(rank, world_size)``. Backend: :func:`choose_backend`.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = choose_backend(backend)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    env = _rank_env()
    if env is None:
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
        return 0, 1
    rank, world_size, local_rank = env
    for key, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", local_rank)):
        os.environ.setdefault(key, str(value))  # mpirun sets only its own variables
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        _mpi_rendezvous(rank, world_size)
    if backend == "nccl":
        device = cuda_device_for(local_rank)
        note = export_local_rank(device, local_rank)
        if note and local_rank == 1:  # once per node: the first rank moved to the one device
            print(note, flush=True)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return rank, world_size


def initialize_parallel(
    tensor_parallel_size: int = 1,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    backend: str | None = None,
    seed: int | None = None,
    timeout_minutes: float = 30,
) -> ParallelState:
    """Start torch.distributed if needed, build megatron's groups and return this rank's view.

    With ``seed``, seeds torch and megatron's model-parallel RNG tracker
    (``model_parallel_cuda_manual_seed``: same stream on TP peers where it must be, distinct
    where it must not); on GPUs this also lets megatron initialize weights on the device.

    ``timeout_minutes``: how long a collective waits for a stalled rank before it fails.

    Raises ``ValueError`` before any collective when the world does not factor into the sizes.
    """
    _, world = init_distributed(backend, timeout_minutes)
    if tensor_parallel_size < 1 or context_parallel_size < 1:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} and context_parallel_size="
            f"{context_parallel_size} must be >= 1"
        )
    if world % (tensor_parallel_size * context_parallel_size):
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel_size={tensor_parallel_size}"
            f" x context_parallel_size={context_parallel_size}"
        )
    install_cpu_shim()
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        context_parallel_size=context_parallel_size,
        create_gloo_process_groups=False,
    )
    if seed is not None:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
    return ParallelState(
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        cp_size=ps.get_context_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        sequence_parallel=bool(sequence_parallel and tensor_parallel_size > 1),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        dp_cp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
        tp_cp_group=ps.get_tensor_and_context_parallel_group(),
        # what megatron hands TE's FP8 autocast: TP x DP x CP unless tp_only_amax_red
        # (megatron-core 0.16.1, fp8_utils.py:621-629 and extensions/transformer_engine.py:
        # 217-222: ``get_amax_reduction_group(with_context_parallel=True,
        # tp_only_amax_red=config.tp_only_amax_red)``, which defaults to False,
        # transformer/transformer_config.py:483; parallel_state.py:1509-1532)
        amax_group=ps.get_amax_reduction_group(with_context_parallel=True, tp_only_amax_red=False),
    )


def single_process_state() -> ParallelState:
    """TP = DP = CP = 1 in this process (inference, notebooks, single-process tests)."""
    init_distributed()
    install_cpu_shim()
    world = dist.group.WORLD
    if dist.get_world_size() != 1:  # new_group is collective: every rank makes every group
        world = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
    return ParallelState(tp_group=world, dp_group=world, cp_group=world, amax_group=world)


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
