"""Count the host synchronizations a piece of code would make on a GPU, on any machine.

On CUDA, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``.tolist()``,
``.cpu()``, ``torch.nonzero``, a boolean-mask index, ...) waits until every kernel queued before
it has run: the CPU stops feeding the GPU. A CPU run cannot see the stall, but it can see the
calls. :class:`HostSyncCounter` is a ``TorchFunctionMode`` that records each such call with the
line of project code that made it::

    with HostSyncCounter() as syncs:
        model(**inputs)
    assert syncs.count <= 1, syncs.summary()

``counts`` narrows what is counted to some tensors (the device-mixing harness of
:mod:`megatron_apt.testing.devices` passes "is this tensor on the accelerator?": a host
tensor's ``.item()`` is no sync). Blocking host-to-device copies are counted by that harness,
which knows which tensors are on the host. Without it every tensor of a CPU run counts, also
the reads the model makes on purpose on host tensors (the text mask: ``models/inputs.py``),
which cost nothing on a GPU machine: count a step with ``counts=dev.on_device`` inside
``LogicalDevices`` (``tests/unit/test_model_host_syncs.py``).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods and torch functions whose result lives on the host, or whose output shape
# depends on the data (the kernel's result must be read before the output is allocated)
_SYNC_METHODS = (
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
    "nonzero", "equal", "masked_select", "unique", "unique_consecutive", "nonzero_static",
)  # fmt: skip
_SYNC_FUNCTIONS = ("nonzero", "equal", "masked_select", "unique", "unique_consecutive", "argwhere")


def _sync_table() -> dict[Callable, str]:
    table = {}
    for name in _SYNC_METHODS:
        if hasattr(torch.Tensor, name):
            table[getattr(torch.Tensor, name)] = f"Tensor.{name}"
    for name in _SYNC_FUNCTIONS:
        if hasattr(torch, name):
            table[getattr(torch, name)] = f"torch.{name}"
    return table


SYNC_OPS = _sync_table()
_HERE = __file__
_SKIP_PREFIXES = ("torch", "contextlib")  # frames not reported as the caller


@dataclass(frozen=True)
class SyncEvent:
    op: str  # e.g. "Tensor.item"
    where: str  # "file:line" of the first frame outside torch and this module


def caller_location(depth: int = 2) -> str:
    """``file:line`` of the nearest frame outside torch and megatron_apt.testing."""
    frame = sys._getframe(depth)
    while frame is not None:
        mod = frame.f_globals.get("__name__", "")
        if not mod.startswith(_SKIP_PREFIXES) and not mod.startswith("megatron_apt.testing"):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def _is_host_copy(func, args, kwargs) -> bool:
    """``t.to("cpu")`` / ``t.to(device=cpu)``: a device-to-host copy on a GPU."""
    if func is not torch.Tensor.to:
        return False
    for a in (*args[1:], kwargs.get("device")):
        if isinstance(a, (str, torch.device)):
            return torch.device(a).type == "cpu"
    return False


def _mask_index(func, args) -> bool:
    """``t[mask]`` with a boolean tensor: the output size is the mask's count (a sync)."""
    if func is not torch.Tensor.__getitem__ or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


class HostSyncCounter(TorchFunctionMode):
    """Records every call that reads a tensor's data on the host (see the module docstring).

    ``counts(tensor) -> bool``: count only calls on tensors it accepts (default: all)."""

    def __init__(self, counts: Callable[[torch.Tensor], bool] | None = None):
        super().__init__()
        self.counts = counts
        self.events: list[SyncEvent] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = SYNC_OPS.get(func)
        if op is None and _is_host_copy(func, args, kwargs):
            op = "Tensor.to(cpu)"
        if op is None and _mask_index(func, args):
            op = "Tensor.__getitem__(bool mask)"
        if op is not None:
            t = _first_tensor(args, kwargs)
            if t is not None and (self.counts is None or self.counts(t)):
                self.record(op)
        return func(*args, **kwargs)

    def record(self, op: str) -> None:
        self.events.append(SyncEvent(op, caller_location(3)))

    @property
    def count(self) -> int:
        return len(self.events)

    def reset(self) -> None:
        self.events.clear()

    def summary(self) -> str:
        """One line per (op, place) with its count, most frequent first."""
        if not self.events:
            return "no host synchronization"
        rows = Counter((e.op, e.where) for e in self.events).most_common()
        return f"{self.count} host synchronizations:\n" + "\n".join(
            f"  {n} x {op} at {where}" for (op, where), n in rows
        )
