"""A second device on a CPU machine: catch the mistakes that only a GPU run would show.

On a GPU, every tensor lives either on the host or on the device, and torch refuses an op that
mixes them ("Expected all tensors to be on the same device"), NCCL refuses a host tensor ("No
backend type associated with device type cpu") and ``torch.cuda.set_device`` refuses a device
without an index. On a CPU machine all tensors are on the CPU and these mistakes pass silently,
until the first GPU run crashes at its first log step. :class:`LogicalDevices` plays the GPU:

* it presents a logical accelerator, ``cuda:0`` by default, to the project's code: a tensor
  created with ``device=cuda:0`` (or moved with ``.to(cuda)`` / ``.cuda()``) is stored on the
  CPU but *tagged* as on the accelerator, and its ``.device`` reads ``cuda:0`` in project code;
  tensors made by factories without a device (``torch.tensor(x)``, ``torch.zeros(n)``) and by
  ``.cpu()`` / ``.to("cpu")`` are on the host, as they would be on a GPU machine;
* results inherit the tag of their inputs; an op of project code that mixes a host tensor
  with an accelerator tensor raises :class:`DeviceMixError`, with torch's rules (a 0-dim host
  tensor may enter an element-wise op as a scalar; never ``cat``/``stack``; copies and ``.to``
  cross devices);
* every ``torch.distributed`` collective refuses a host tensor, as NCCL does;
* in project code, ``comm_device()`` returns the accelerator and the ``torch.cuda`` functions
  the training, benchmark and export paths call (``set_device`` with torch's index check,
  ``current_device``, ``get_device_name``, ``synchronize``, ``max_memory_allocated``, ...) act
  as for one GPU; with ``cuda_available=True`` also ``torch.cuda.is_available()`` (for tools
  that pick CUDA themselves: it would also make a Trainer prepare DeepSpeed for CUDA);
* blocking host-to-device copies (``.to(cuda)`` without ``non_blocking=True``) are recorded:
  on a GPU each one waits for the device (:attr:`blocking_copies`; combine with
  :class:`~megatron_apt.testing.host_sync.HostSyncCounter` ``(counts=dev.on_device)`` to count
  every host synchronization of a step).

"Project code" is code in the modules or files named by ``checked`` (``megatron_apt``,
``pretrain_apt.py``, ``tools/``); DeepSpeed, megatron-core and torch run unchanged on the CPU
(their device handling is theirs: a ``"cpu"`` device named inside them is their accelerator's
name here).
Tensors that did not pass through torch's function dispatch while the harness was on
(parameters built before, tensors from numpy or safetensors) count as on the accelerator;
:meth:`LogicalDevices.host_source` marks the outputs of a data source as host tensors.

Usage (docs/design.md, "Testing CUDA paths on a CPU")::

    with LogicalDevices() as dev:
        trainer = Trainer(cfg)                       # its device is cuda:0 (logical)
        dev.host_source(trainer.stream, "next")      # a data loader hands host tensors
        trainer.train()                              # raises where a GPU run would
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from megatron_apt.testing.host_sync import caller_location

_ROOT = Path(__file__).resolve().parents[2]
# project code: module names (prefixes) and source paths (prefixes: the tools run as scripts
# or loaded from their files are named __main__ or after their file)
CHECKED = ("megatron_apt", "pretrain_apt", f"{_ROOT}/tools/", f"{_ROOT}/pretrain_apt.py")
_SKIPPED = ("torch", "contextlib", "functools", "megatron_apt.testing")
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "all_to_all", "all_to_all_single", "reduce",
    "gather", "scatter", "send", "recv", "isend", "irecv",
)  # fmt: skip
# all inputs on one device, 0-dim host tensors included
STRICT = {torch.cat, torch.stack, torch.concat, torch.concatenate, torch.hstack, torch.vstack}
STRICT |= {torch.dstack, torch.column_stack}
# ops that move data between devices, or take host indices
CROSSING = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.__setitem__}
CROSSING |= {torch.Tensor.__getitem__, torch.Tensor.cpu, torch.Tensor.cuda}
CROSSING |= {torch.Tensor.pin_memory, torch.Tensor.is_pinned}
CROSSING |= {torch._has_compatible_shallow_copy_type}  # Module.to's metadata check
_PASS_THROUGH = {torch._C._nn._parse_to}  # Module.to parses its device with it


class DeviceMixError(RuntimeError):
    """What torch or NCCL would raise on a GPU machine."""


def _caller(depth: int) -> tuple[str, str]:
    """(module name, file name) of the nearest frame outside torch and the harness."""
    frame = sys._getframe(depth)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(_SKIPPED):
            return name, frame.f_code.co_filename
        frame = frame.f_back
    return "", ""


def _matches(checked: tuple[str, ...], name: str, filename: str) -> bool:
    """Whether a frame of module ``name`` in ``filename`` is project code: an entry with a
    ``/`` is a path prefix, any other a module-name prefix."""
    return any(filename.startswith(c) if "/" in c else name.startswith(c) for c in checked)


def _tensors(args, kwargs) -> list[torch.Tensor]:
    leaves, _ = tree_flatten((args, kwargs))
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _descriptor(func) -> object | None:
    """The getset descriptor behind ``func`` when it is ``Tensor.<attr>.__get__/__set__``."""
    return getattr(func, "__self__", None)


class LogicalDevices(TorchFunctionMode):
    """See the module docstring. ``device``: the logical accelerator (``cuda:0``)."""

    def __init__(
        self,
        device: str | torch.device = "cuda:0",
        checked: tuple = CHECKED,
        cuda_available: bool = False,
    ):
        super().__init__()
        self.cuda_available = cuda_available  # torch.cuda.is_available() in project code
        self.device = torch.device(device)
        if self.device.type == "cpu" or self.device.index is None:
            raise ValueError(f"device={self.device}: name an indexed accelerator, e.g. cuda:0")
        self.checked = checked
        self._host = WeakTensorKeyDictionary()  # host tensors; all others are on the device
        self.blocking_copies: list[str] = []  # where a blocking host-to-device copy was made
        self.collectives: list[str] = []  # collectives checked (op names)
        self.set_devices: list[object] = []  # arguments of torch.cuda.set_device
        self._undo: list[tuple[object, str, object, object]] = []  # (obj, name, old, new)

    # ---- tags ---------------------------------------------------------------------------
    def on_host(self, t: torch.Tensor) -> bool:
        return t in self._host

    def on_device(self, t: torch.Tensor) -> bool:
        return t not in self._host

    def mark_host(self, tree) -> None:
        for t in _tensors(tree, {}):
            self._host[t] = True

    def _tag(self, t: torch.Tensor, host: bool) -> None:
        if host:
            self._host[t] = True
        else:
            self._host.pop(t, None)

    def host_source(self, obj, method: str) -> None:
        """Mark what ``obj.method(...)`` returns as host tensors (a data loader's batches)."""
        original = getattr(obj, method)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            self.mark_host(out)
            return out

        setattr(obj, method, wrapper)
        self._undo.append((obj, method, None, wrapper))  # instance attribute: deleted on exit

    def _project(self, depth: int = 3) -> bool:
        return _matches(self.checked, *_caller(depth))

    def _is_accel(self, device, project: bool) -> bool | None:
        """Whether a device argument names the accelerator (None: no device given)."""
        if device is None:
            return None
        if isinstance(device, int):
            return True  # an index: a CUDA device
        d = torch.device(device)
        if d.type == self.device.type:
            return True
        # inside DeepSpeed / megatron / torch, "cpu" is the accelerator's name on this machine
        return not project

    # ---- the mode ---------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        project = self._project()
        desc = _descriptor(func)
        if desc is torch.Tensor.device and getattr(func, "__name__", "") == "__get__":
            real = func(*args, **kwargs)
            return self.device if project and self.on_device(args[0]) else real
        if desc is torch.Tensor.data and getattr(func, "__name__", "") == "__set__":
            out = func(*args, **kwargs)
            self._tag(args[0], self.on_host(args[1]))
            return out
        if func in _PASS_THROUGH:  # argument parsing, not tensors: nothing to rewrite
            return func(*args, **kwargs)
        if func is torch.Tensor.pin_memory:
            return args[0]  # a CPU-only torch cannot pin; the tensor stays on the host
        if func is torch.Tensor.is_pinned:
            return self.on_host(args[0])
        inputs = _tensors(args, kwargs)
        target, args, kwargs = self._target(func, args, kwargs, project)
        if project:
            self._check_mix(func, inputs)
        out = func(*args, **kwargs)
        return self._tag_outputs(func, out, inputs, target)

    def _target(self, func, args, kwargs, project: bool):
        """(host? for the outputs or None to inherit, args, kwargs) with accelerator device
        arguments rewritten to the CPU that stores them."""
        if func is torch.Tensor.cpu:
            return True, args, kwargs
        if func is torch.Tensor.cuda:
            self._note_copy(args[0], kwargs)
            return False, args[:1], {}
        if func is torch.Tensor.to:
            args, device = self._to_device(args, kwargs)
            accel = self._is_accel(device, project)
            if accel:
                self._note_copy(args[0], kwargs)
            return (None if accel is None else not accel), args, kwargs
        if kwargs.get("device") is not None:
            accel = self._is_accel(kwargs["device"], project)
            if accel:
                kwargs["device"] = "cpu"
            return (None if accel is None else not accel), args, kwargs
        if func in (torch.tensor, torch.as_tensor) or not _tensors(args, kwargs):
            return True, args, kwargs  # made on the host, as torch would
        return None, args, kwargs

    @staticmethod
    def _to_device(args, kwargs):
        """``Tensor.to``'s device argument (positional or keyword) and the arguments with an
        accelerator device rewritten to the CPU that stores its tensors."""

        def stored(d):
            return "cpu" if isinstance(d, int) or torch.device(d).type != "cpu" else d

        if kwargs.get("device") is not None:
            device = kwargs["device"]
            kwargs["device"] = stored(device)
            return args, device
        rest = list(args[1:])
        for i, a in enumerate(rest):
            if isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
                rest[i] = stored(a)
                return (args[0], *rest), a
        return args, None

    def _note_copy(self, src: torch.Tensor, kwargs) -> None:
        if self.on_host(src) and not kwargs.get("non_blocking", False):
            self.blocking_copies.append(caller_location(1))

    def _check_mix(self, func, inputs: list[torch.Tensor]) -> None:
        if func in CROSSING:
            return
        host = [t for t in inputs if self.on_host(t)]
        if not host or len(host) == len(inputs):
            return
        bad = host if func in STRICT else [t for t in host if t.dim() > 0]
        if bad:
            name = torch.overrides.resolve_name(func) or repr(func)
            raise DeviceMixError(
                f"Expected all tensors to be on the same device, but found at least two "
                f"devices, {self.device} and cpu! ({name} at {caller_location(1)}: "
                f"{len(bad)} host tensor(s) of shape {[tuple(t.shape) for t in bad][:4]} "
                "mixed with accelerator tensors; logical devices of megatron_apt.testing."
                "devices)"
            )

    def _tag_outputs(self, func, out, inputs, target: bool | None):
        ids = {id(t) for t in inputs}
        host = target if target is not None else bool(inputs) and all(map(self.on_host, inputs))
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda):
            src = inputs[0]
            if out is src and host != self.on_host(src):
                out = out.clone()  # a copy to the other device, never an alias
                ids.discard(id(src))
        for t in _tensors(out, {}):
            if id(t) not in ids:  # in-place results and views of inputs keep their own tag
                self._tag(t, host)
        return out

    # ---- torch.distributed, torch.cuda and comm_device ------------------------------------
    def __enter__(self):
        from megatron_apt.parallel.cpu_shim import install_cpu_shim

        # megatron's CPU shim replaces torch.cuda functions too: installed first, so that the
        # fakes below wrap it and leaving restores it (a Trainer would install it inside)
        install_cpu_shim()
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._patch(dist, name, self._collective(getattr(dist, name), name))
        fakes = {
            "set_device": self._set_device,
            "current_device": lambda: self.device.index,
            "device_count": lambda: 1,
            "get_device_name": lambda device=None: "NVIDIA H100 80GB HBM3 (logical, on CPU)",
            "get_device_capability": lambda device=None: (9, 0),
            "synchronize": lambda device=None: None,
            "max_memory_allocated": lambda device=None: 0,
            "memory_allocated": lambda device=None: 0,
            "reset_peak_memory_stats": lambda device=None: None,
            "empty_cache": lambda: None,
        }
        if self.cuda_available:  # tools that choose CUDA themselves (--device auto / cuda)
            fakes["is_available"] = lambda: True
        for name, fake in fakes.items():
            self._patch(torch.cuda, name, self._project_only(getattr(torch.cuda, name), fake))
        from megatron_apt.parallel import state

        original = state.comm_device
        fake = self._project_only(original, lambda group=None: self.device)
        for mod in list(sys.modules.values()):
            if _matches(
                self.checked, getattr(mod, "__name__", ""), getattr(mod, "__file__", None) or ""
            ):
                if getattr(mod, "comm_device", None) is original:
                    self._patch(mod, "comm_device", fake)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for obj, name, old, new in reversed(self._undo):
                if old is None:
                    obj.__dict__.pop(name, None)
                elif getattr(obj, name) is new:  # not replaced by someone else meanwhile
                    setattr(obj, name, old)
            self._undo.clear()

    def _patch(self, obj, name: str, new) -> None:
        self._undo.append((obj, name, getattr(obj, name), new))
        setattr(obj, name, new)

    def _project_only(self, original: Callable, fake: Callable) -> Callable:
        """``fake`` for calls from project code, ``original`` for everyone else."""

        @functools.wraps(original)
        def call(*args, **kwargs):
            if _matches(self.checked, *_caller(2)):
                return fake(*args, **kwargs)
            return original(*args, **kwargs)

        return call

    def _set_device(self, device) -> None:
        """``torch.cuda.set_device`` as torch 2.13 checks its argument
        (torch/cuda/__init__.py set_device -> _utils._get_device_index)."""
        self.set_devices.append(device)
        if isinstance(device, int):
            return
        d = torch.device(device) if isinstance(device, str) else device
        if not isinstance(d, torch.device) or d.type != "cuda":
            raise ValueError(f"Expected a cuda device, but got: {device}")
        if d.index is None:
            raise ValueError(
                f"Expected a torch.device with a specified index or an integer, but got:{device}"
            )

    def _collective(self, original: Callable, name: str) -> Callable:
        @functools.wraps(original)
        def call(*args, **kwargs):
            host = [t for t in _tensors(args, kwargs) if self.on_host(t)]
            if host:
                raise DeviceMixError(
                    f"No backend type associated with device type cpu: dist.{name} got "
                    f"{len(host)} host tensor(s) of shape {[tuple(t.shape) for t in host][:4]} "
                    f"at {caller_location(1)} (NCCL takes {self.device.type} tensors only)"
                )
            self.collectives.append(name)
            return original(*args, **kwargs)

        return call


def iter_host(dev: LogicalDevices, tree) -> Iterator[torch.Tensor]:
    """The host tensors in ``tree`` (for assertions in tests)."""
    return (t for t in _tensors(tree, {}) if dev.on_host(t))
