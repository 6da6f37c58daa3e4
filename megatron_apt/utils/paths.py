"""Path helpers shared by the readers and writers of data and model files.

File names read from data files (a shard index, a diffusers ``weight_map``) stay inside
their directory: such a file comes from whoever made the data set or the model, and an entry
like ``../../secrets`` or ``/etc/passwd`` must not make the reader open, hash or train on files
elsewhere (issue 16, item 6). The check is lexical: symlinks inside the directory still work.

Directories written as a whole (converted models, exported pipelines) appear atomically:
:func:`atomic_directory`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
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


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only when the block
    finishes without error (otherwise it is removed and ``path`` is untouched)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists() or path.is_symlink():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()


def read_json_object(path: str | Path) -> dict:
    """A JSON object read from ``path``: ``FileNotFoundError`` when it is missing,
    ``ValueError`` naming the file when it is not valid JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        out = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(out, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return out
