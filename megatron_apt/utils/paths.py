"""File names read from data files (a shard index, a diffusers ``weight_map``) stay inside
their directory: such a file comes from whoever made the data set or the model, and an entry
like ``../../secrets`` or ``/etc/passwd`` must not make the reader open, hash or train on files
elsewhere (issue 16, item 6). The check is lexical: symlinks inside the directory still work."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


def contained(root: str | Path, name: object, source: str) -> Path:
    """``root / name`` when ``name`` is a relative path without ``..``; else ``ValueError``
    naming ``source`` (the file the entry came from) and the entry."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: file entry {name!r} is not a file name")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or os.path.isabs(name) or ".." in pure.parts:
        raise ValueError(
            f"{source}: file entry {name!r} points outside {root} (absolute or '..'); "
            "entries must be relative paths inside the directory"
        )
    return Path(root) / pure
