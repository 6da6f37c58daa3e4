"""Module attributes imported on first use (PEP 562): a package's ``__init__`` names what its
submodules define without loading torch or megatron-core until a name is asked for."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_attributes(
    package: str, table: dict[str, str], namespace: dict
) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``table`` maps a name to the submodule (relative
    to ``package``) that defines it; the value is cached in ``namespace`` (the module's
    ``globals()``) after the first lookup."""

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(f"{package}.{table[name]}"), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
