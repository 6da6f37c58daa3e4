"""The CPU stand-in for a GPU (megatron_apt/testing/devices.py): it must refuse what torch, NCCL
and torch.cuda refuse on a GPU machine, allow what they allow, and count what stalls the host.

Project code is this test module here (``checked=(__name__,)``), as ``megatron_apt`` is in the
tests that run the trainer under it (tests/distributed/test_gpu_paths_on_cpu.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_apt.testing.devices import DeviceMixError, LogicalDevices
from megatron_apt.testing.host_sync import HostSyncCounter

CUDA = torch.device("cuda", 0)


def harness() -> LogicalDevices:
    return LogicalDevices(checked=(__name__,))


def test_factories_and_moves_tag_host_and_device():
    with harness() as dev:
        host = torch.zeros(3)  # no device: the host, as torch makes it on a GPU machine
        on = torch.zeros(3, device=CUDA)
        moved = host.to(CUDA)
        back = moved.cpu()
        assert dev.on_host(host) and dev.on_device(on) and dev.on_device(moved)
        assert dev.on_host(back) and back is not moved  # a copy, never an alias
        assert moved.device == CUDA and host.device == torch.device("cpu")
        like = torch.ones(2, device=moved.device)  # the device read back in project code
        assert dev.on_device(like) and dev.on_device(moved * 2) and dev.on_host(host + 1)
        assert dev.on_device(moved.to(torch.float64))  # a dtype-only .to keeps the device
        assert torch.equal(back, torch.zeros(3))  # the values are real, on the CPU


def test_mixing_raises_as_torch_does_on_a_gpu():
    with harness():
        loss = torch.ones((), device=CUDA)
        norm = torch.tensor(2.0)  # a host scalar, e.g. from a Python float
        assert (loss + norm).item() == 3.0  # a 0-dim host tensor may enter as a scalar
        with pytest.raises(DeviceMixError, match="cuda:0 and cpu.*torch.stack"):
            torch.stack([loss, norm])  # the first-log-step crash of issue 29, item 1
        with pytest.raises(DeviceMixError, match="torch.cat"):
            torch.cat([torch.ones(2, device=CUDA), torch.ones(2)])
        with pytest.raises(DeviceMixError):
            torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3, device=CUDA))
        target = torch.zeros(2, device=CUDA)
        target.copy_(torch.ones(2))  # copies cross devices
        target[0] = torch.tensor(5.0)
        assert target.tolist() == [5.0, 1.0]


def test_only_project_code_is_checked():
    """DeepSpeed, megatron and torch run unchanged (their device handling is theirs)."""
    with LogicalDevices(checked=("megatron_apt.nowhere",)):
        torch.stack([torch.ones((), device=CUDA), torch.tensor(1.0)])  # not project code


def test_collectives_refuse_host_tensors_like_nccl():
    from megatron_apt.parallel.state import single_process_state

    single_process_state()
    with harness() as dev:
        with pytest.raises(DeviceMixError, match="No backend type associated with device type"):
            dist.all_reduce(torch.ones(2))
        flag = torch.zeros(1, device=CUDA)
        dist.all_reduce(flag)
        assert dev.collectives == ["all_reduce"]


def test_comm_device_and_torch_cuda_act_as_one_gpu():
    from megatron_apt.parallel import state

    original = torch.cuda.set_device
    with harness() as dev:
        assert state.comm_device() == torch.device("cpu")  # called from state's own module
        with pytest.raises(ValueError, match="Expected a torch.device with a specified index"):
            torch.cuda.set_device(torch.device("cuda"))  # issue 29, item 2
        torch.cuda.set_device(torch.device("cuda", torch.cuda.current_device()))
        torch.cuda.set_device(0)
        assert dev.set_devices[1:] == [CUDA, 0]
        assert "H100" in torch.cuda.get_device_name(CUDA)
    assert torch.cuda.set_device is original  # restored on exit


def test_comm_device_is_the_accelerator_in_project_modules():
    """Project modules that imported ``comm_device`` by name get the accelerator."""
    import megatron_apt.engine.master_weights as mw

    with LogicalDevices(checked=("megatron_apt", __name__)):
        assert mw.comm_device() == CUDA
    assert mw.comm_device() == torch.device("cpu")


def test_blocking_host_to_device_copies_are_recorded():
    with harness() as dev:
        x = torch.randn(4)
        x.to(CUDA)
        x.to(CUDA, non_blocking=True)
        x.pin_memory().to(CUDA, non_blocking=True)  # pin_memory is a no-op on a CPU torch
        torch.zeros(2, device=CUDA).to(CUDA)  # already there: no copy
        assert len(dev.blocking_copies) == 1 and __file__ in dev.blocking_copies[0]


def test_host_sync_counter_counts_device_reads_only():
    with harness() as dev, HostSyncCounter(counts=dev.on_device) as syncs:
        on = torch.arange(4.0, device=CUDA)
        on.sum().item()
        bool(on[0] > 0)
        on[on > 1]
        torch.tensor([1.0, 2.0]).tolist()  # a host tensor: no sync on a GPU
    ops = [e.op for e in syncs.events]
    assert ops == ["Tensor.item", "Tensor.__bool__", "Tensor.__getitem__(bool mask)"], ops
    assert all(__file__ in e.where for e in syncs.events)


def test_host_source_marks_a_loaders_tensors():
    class Loader:
        def next(self):
            return {"latents": torch.from_numpy(__import__("numpy").zeros(2))}  # no dispatch

    loader = Loader()
    with harness() as dev:
        dev.host_source(loader, "next")
        batch = loader.next()
        assert dev.on_host(batch["latents"])
        with pytest.raises(DeviceMixError):
            batch["latents"] + torch.ones(2, device=CUDA)
    assert "next" not in loader.__dict__  # unwrapped on exit
