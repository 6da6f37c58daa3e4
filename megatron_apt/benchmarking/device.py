"""The benchmark's device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` as a ``torch.device``
that ``torch.cuda.set_device`` accepts.

``torch.cuda.set_device(torch.device("cuda"))`` raises "Expected a torch.device with a
specified index or an integer" (torch 2.13, torch/cuda/__init__.py:687 ``set_device`` ->
torch/cuda/_utils.py:586 -> torch/_utils.py:910 ``_get_device_index`` with
``optional=False``), so a CUDA device is always resolved to an index here: ``cuda:N`` as
given, ``cuda`` / ``auto`` to ``LOCAL_RANK`` when a launcher set it (the device DeepSpeed
selects: deepspeed 0.19.8 runtime/engine.py:1017 ``get_accelerator().set_device(
self.local_rank)``), else to ``torch.cuda.current_device()``.
"""

from __future__ import annotations

import os

import torch

__all__ = ["resolve_device"]


def _cuda_index(requested: int | None) -> int:
    """The CUDA device index to use; ``ValueError`` naming it when this node has no such
    device."""
    if requested is not None:
        index, source = requested, "the index asked for"
    elif os.environ.get("LOCAL_RANK"):
        index, source = int(os.environ["LOCAL_RANK"]), "LOCAL_RANK"
    else:
        index, source = torch.cuda.current_device(), "torch.cuda.current_device()"
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        raise ValueError(
            f"CUDA device {index} ({source}) does not exist: {count} visible "
            f"(CUDA_VISIBLE_DEVICES={visible})"
        )
    return index


def resolve_device(name: str) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``: CUDA when present) as a device; a
    CUDA device always carries its index. ``ValueError`` naming ``name`` when it is not a
    device, not CPU or CUDA, or CUDA is absent."""
    text = "cuda" if name == "auto" and torch.cuda.is_available() else name
    text = "cpu" if text == "auto" else text
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise ValueError(f"{name!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name!r}: use cpu, cuda, cuda:N or auto")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"{name!r}: CUDA is not available here")
    try:
        return torch.device("cuda", _cuda_index(device.index))
    except ValueError as e:
        raise ValueError(f"{name!r}: {e}") from None
