"""Training checkpoints: engines (weights + optimizer shards), EMA, trainer and data state.

Layout under ``--save``::

    iter_0000020/           a complete checkpoint (renamed into place only when complete)
      generator/ discriminator/ (or model/)   DeepSpeed engine checkpoints (tag "state")
      ema/rank00000.safetensors ...           EMA shadows, one file per rank (ZeRO-3 partitions)
      trainer_state.json                      step, samples, data stream state, counters
      COMPLETE
    latest_checkpointed_iteration.txt       "20", replaced atomically after the rename

A checkpoint is written into ``.iter_0000020.tmp`` by all ranks; after a barrier rank 0 marks
it complete, renames it and only then points ``latest`` at it, so a crash (or a killed rank)
at any moment leaves the previous checkpoint as the latest. Loading refuses directories
without ``COMPLETE`` and names what is missing.

``manifest.json`` records the (TP-local) shape of every trained parameter per engine, so that
``--load`` of another model's checkpoint fails before DeepSpeed touches anything, with an error
that names the checkpoint, the keys and the shapes (:class:`CheckpointMismatchError`).

Test hook: with ``MEGATRON_APT_TEST_KILL_IN_SAVE=<step>`` the rank ``MEGATRON_APT_TEST_KILL_RANK``
(default 1) SIGKILLs itself while saving checkpoint ``<step>``, after every engine, EMA and
module file is written and before ``COMPLETE``: the crash the atomic layout must survive.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megatron_apt.checkpoint.io import load_weights

LATEST = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
KILL_IN_SAVE_ENV = "MEGATRON_APT_TEST_KILL_IN_SAVE"
KILL_RANK_ENV = "MEGATRON_APT_TEST_KILL_RANK"


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for another model (keys or shapes differ)."""


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably: the new content reaches the disk
    (fsync) before the rename, and the rename before the call returns (fsync of the
    directory), so that a crash never leaves ``latest`` naming a checkpoint whose files are
    still in the page cache, nor an empty ``latest``."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # e.g. a file system without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    root: str | Path,
    step: int,
    engines: dict,
    emas: dict,
    trainer_state: dict,
    rank: int,
    modules: dict | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = Path(root)
    final, tmp = checkpoint_dir(root, step), root / f".iter_{step:07d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in (*root.glob(".iter_*.tmp"), *root.glob(".iter_*.old")):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(tmp / name), tag="state", save_latest=False)
    for name, ema in emas.items():
        d = tmp / "ema" / name
        d.mkdir(parents=True, exist_ok=True)
        save_file(
            ema.state_dict(),
            str(d / f"rank{dist.get_rank():05d}.safetensors"),
            metadata=ema.file_metadata() or None,
        )
    for name, module in (modules or {}).items():  # e.g. the consistency target network
        d = tmp / "modules" / name
        d.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.contiguous()
            for k, v in module.state_dict().items()
            if not k.endswith("_extra_state")
        }
        save_file(state, str(d / f"rank{dist.get_rank():05d}.safetensors"))
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (tmp / MANIFEST).write_text(json.dumps(_manifest(engines, modules), indent=1))
    _test_kill_hook(step)
    dist.barrier()
    if rank == 0:
        (tmp / "COMPLETE").write_text(str(step))
        old = root / f".iter_{step:07d}.old"
        if final.exists():  # re-saving a step (e.g. resumed at train_iters): two quick renames,
            os.replace(final, old)  # not a slow delete, between which `latest` could dangle
        os.replace(tmp, final)
        _atomic_write(root / LATEST, str(step))
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _local_shape(p: torch.Tensor) -> list[int]:
    """This rank's (TP-local) shape of a parameter; ZeRO-3 keeps it in ``ds_shape``."""
    return list(getattr(p, "ds_shape", p.shape))


def _engine_shapes(engine) -> dict[str, list[int]]:
    return {n: _local_shape(p) for n, p in engine.module.named_parameters()}


def _module_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {
        k: list(v.shape) for k, v in module.state_dict().items() if not k.endswith("_extra_state")
    }


def _manifest(engines: dict, modules: dict | None) -> dict:
    return {
        "engines": {name: _engine_shapes(e) for name, e in engines.items()},
        "modules": {name: _module_shapes(m) for name, m in (modules or {}).items()},
    }


def _test_kill_hook(step: int) -> None:
    """Test hook (see the module docstring): die like an OOM-killed rank mid-checkpoint."""
    from megatron_apt.testing.hooks import hooks_enabled

    at = os.environ.get(KILL_IN_SAVE_ENV)
    if (
        at
        and hooks_enabled()
        and int(at) == step
        and dist.get_rank() == int(os.environ.get(KILL_RANK_ENV, "1"))
    ):
        print(f"{KILL_IN_SAVE_ENV}: rank {dist.get_rank()} kills itself in save {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def describe_mismatch(found: dict, expected: dict, limit: int = 8) -> str:
    """'missing keys [...]; unexpected keys [...]; shape mismatches [k: ckpt vs model]' or ''."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in sorted(set(found) & set(expected))
        if list(found[k]) != list(expected[k])
    ]
    parts = []
    for what, items in (
        ("missing keys (in the model, not in the checkpoint)", missing),
        ("unexpected keys (in the checkpoint, not in the model)", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {what}: {items[:limit]}{more}")
    return "; ".join(parts)


def check_manifest(d: Path, engines: dict, modules: dict | None = None) -> None:
    """``CheckpointMismatchError`` naming the checkpoint, keys and shapes when the checkpoint
    in ``d`` was written for other models than ``engines`` / ``modules`` hold."""
    f = d / MANIFEST
    if not f.exists():  # written before manifests existed: DeepSpeed's own checks remain
        return
    manifest = json.loads(f.read_text())
    expected = _manifest(engines, modules)
    for kind in ("engines", "modules"):
        for name, shapes in expected[kind].items():
            found = manifest.get(kind, {}).get(name)
            if found is None:
                raise CheckpointMismatchError(
                    f"checkpoint {d} has no {name!r} {kind[:-1]} (it holds "
                    f"{sorted(manifest.get(kind, {}))}): a checkpoint of another stage?"
                )
            problem = describe_mismatch(found, shapes)
            if problem:
                raise CheckpointMismatchError(
                    f"checkpoint {d} does not fit this run's {name} (another model or "
                    f"tensor-parallel size?): {problem}"
                )


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    found = []
    for d in root.glob("iter_*") if root.is_dir() else ():
        step = d.name.removeprefix("iter_")
        if step.isdigit() and (d / "COMPLETE").exists():
            found.append((int(step), d))
    return sorted(found)


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every complete ``iter_*`` checkpoint under ``root``, oldest first."""
    out = []
    for d in Path(root).glob("iter_*"):
        tail = d.name.removeprefix("iter_")
        if tail.isdigit() and (d / "COMPLETE").is_file():
            out.append((int(tail), d))
    return sorted(out)


def latest_checkpoint(root: str | Path, warn=None) -> Path | None:
    """The directory ``latest`` points at, or None when ``root`` holds no checkpoint.

    A missing or unreadable ``latest`` next to complete checkpoints (a copy that left it out,
    a disk that lost it) does not mean "start afresh", which would then overwrite them: the
    newest complete checkpoint is taken and ``warn`` (a callable) is told so. A ``latest``
    naming a missing or incomplete checkpoint is an error naming both."""
    root = Path(root)
    marker = root / LATEST
    text = marker.read_text().strip() if marker.is_file() else None
    if text is not None and text.isdigit():
        d = checkpoint_dir(root, int(text))
        if not (d / "COMPLETE").exists():
            raise ValueError(
                f"{marker} points at {d}, which is missing or incomplete (no COMPLETE)"
            )
        return d
    complete = complete_checkpoints(root)
    if not complete:
        if text is not None:
            raise ValueError(f"{marker} holds {text!r}, not an iteration number")
        return None
    newest = complete[-1][1]
    why = "is missing" if text is None else f"holds {text!r}, not an iteration number"
    if warn is not None:
        warn(f"warning: {marker} {why}; taking the newest complete checkpoint, {newest}")
    return newest


def load_checkpoint(
    d: Path,
    engines: dict,
    emas: dict,
    modules: dict | None = None,
    current_layout: dict | None = None,
) -> dict:
    """Load engines and EMA shadows of this rank; returns the trainer state. Checks the
    manifest first, so that nothing is loaded from a checkpoint of another model."""
    state_file = d / "trainer_state.json"
    if not state_file.exists():
        raise ValueError(f"{d} has no trainer_state.json")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{state_file} is truncated or not JSON ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{state_file} is not a trainer state (a JSON object)")
    saved_world = state.get("world_size")
    if saved_world is not None and saved_world != dist.get_world_size():
        raise CheckpointMismatchError(
            f"checkpoint {d} was written by {saved_world} ranks, this run has "
            f"{dist.get_world_size()}: optimizer shards, EMA shadows and the data position are "
            "per rank; resume with the same world size"
        )
    saved_cfg = state.get("config", {})
    for key, now in (current_layout or {}).items():
        saved = saved_cfg.get(key, 1)
        if saved != now:
            raise CheckpointMismatchError(
                f"checkpoint {d} was written with {key}={saved}, this run has {key}={now}: "
                "ZeRO shards are laid out per rank; resume with the same layout (or convert "
                "the weights with tools/convert_checkpoint.py and start from them)"
            )
    check_manifest(d, engines, modules)
    for name, engine in engines.items():
        path = d / name
        if not path.exists():
            raise ValueError(f"{d} has no {name}/ engine checkpoint (another stage's checkpoint?)")
        if not (path / "state").is_dir():  # DeepSpeed would fail with a bare AssertionError
            raise ValueError(f"{path / 'state'} is missing: the {name}'s checkpoint is incomplete")
        try:
            engine.load_checkpoint(str(path), tag="state", load_module_strict=True)
        except RuntimeError as e:  # DeepSpeed's load_state_dict: size mismatch, missing keys
            raise CheckpointMismatchError(
                f"cannot load checkpoint {path} into the {name}: {_first_lines(str(e))}"
            ) from e
    for name, ema in emas.items():
        f = d / "ema" / name / f"rank{dist.get_rank():05d}.safetensors"
        if not f.exists():
            raise ValueError(
                f"{f} is missing (was the checkpoint written with another world "
                "size? EMA shadows are stored per rank)"
            )
        ema.load_state_dict(_read_safetensors(f), source=str(f))
    for name, module in (modules or {}).items():
        f = d / "modules" / name / f"rank{dist.get_rank():05d}.safetensors"
        if not f.exists():
            raise ValueError(f"{f} is missing")
        tensors = _read_safetensors(f)
        problem = describe_mismatch(
            {k: list(v.shape) for k, v in tensors.items()}, _module_shapes(module)
        )
        if problem:
            raise CheckpointMismatchError(f"{f} does not fit the {name} network: {problem}")
        load_weights(module, tensors, f)  # strict but for absent _extra_state
    return state


def _read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a truncated/corrupt file
        raise ValueError(f"{f} is not a readable safetensors file ({e})") from e


def _first_lines(text: str, n: int = 12) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[:n] + ([f"... ({len(lines) - n} more lines)"] if len(lines) > n else []))
