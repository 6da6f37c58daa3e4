"""Write a safetensors file one tensor at a time, without holding the model in memory.

``safetensors.torch.save_file`` takes a dict of every tensor, so exporting an 8B model that way
holds all of it (32 GB in fp32) in the writer's memory at once. The format needs only the
tensors' names, dtypes and shapes up front: an 8-byte little-endian header length, the JSON
header (``__metadata__`` and per tensor ``dtype``, ``shape``, ``data_offsets`` into the data
section), space-padded to a multiple of 8 bytes, then the raw little-endian bytes of each
tensor, contiguous and without holes (the safetensors format description, github.com/
huggingface/safetensors README "Format"). :class:`SafetensorsStream` writes the header from the
specs, then each tensor's bytes as it arrives, into ``PATH.tmp``, renamed to ``PATH`` when every
tensor has been written (a failure leaves no partial ``PATH``). ``safetensors.safe_open`` /
``load_file`` read the result (tested against ``save_file``'s for the same tensors).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SafetensorsStream:
    """``with SafetensorsStream(path, specs, metadata) as out: out.write(name, tensor)`` for
    every ``(name, (dtype, shape))`` of ``specs`` in that order."""

    def __init__(
        self,
        path: str | Path,
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.specs = list(specs.items())
        self._next = 0
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, (dtype, shape) in self.specs:
            if dtype not in DTYPES:
                raise ValueError(f"{self.path}: {name} has dtype {dtype}, not in safetensors")
            nbytes = _numel(shape) * _itemsize(dtype)
            header[name] = {
                "dtype": DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        self._header = raw + b" " * (-len(raw) % 8)
        self._file = None

    def __enter__(self) -> SafetensorsStream:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in __exit__
        self._file.write(struct.pack("<Q", len(self._header)) + self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor of the specs (its name, dtype and shape are checked)."""
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path}: {name} is one tensor more than the header holds")
        want, (dtype, shape) = self.specs[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{self.path}: expected {want} {dtype} {tuple(shape)} next, got {name} "
                f"{tensor.dtype} {tuple(tensor.shape)}"
            )
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            self._file.write(t.view(torch.uint8).numpy())  # no copy: the buffer protocol
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        if self._next != len(self.specs):
            self.tmp.unlink(missing_ok=True)
            missing = [n for n, _ in self.specs[self._next :]]
            raise ValueError(f"{self.path}: {len(missing)} tensors never written: {missing[:5]}")
        self.tmp.replace(self.path)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
