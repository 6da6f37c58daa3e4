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
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import load_file, save_file

LATEST = "latest_checkpointed_iteration.txt"


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        for stale in root.glob(".iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(tmp / name), tag="state", save_latest=False)
    for name, ema in emas.items():
        d = tmp / "ema" / name
        d.mkdir(parents=True, exist_ok=True)
        save_file(ema.state_dict(), str(d / f"rank{dist.get_rank():05d}.safetensors"))
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
    dist.barrier()
    if rank == 0:
        (tmp / "COMPLETE").write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write(root / LATEST, str(step))
    dist.barrier()
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory ``latest`` points at, or None for a fresh start. Errors name the file."""
    root = Path(root)
    marker = root / LATEST
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{marker} holds {text!r}, not an iteration number")
    d = checkpoint_dir(root, int(text))
    if not (d / "COMPLETE").exists():
        raise ValueError(f"{marker} points at {d}, which is missing or incomplete (no COMPLETE)")
    return d


def load_checkpoint(d: Path, engines: dict, emas: dict, modules: dict | None = None) -> dict:
    """Load engines and EMA shadows of this rank; returns the trainer state."""
    state_file = d / "trainer_state.json"
    if not state_file.exists():
        raise ValueError(f"{d} has no trainer_state.json")
    for name, engine in engines.items():
        path = d / name
        if not path.exists():
            raise ValueError(f"{d} has no {name}/ engine checkpoint (another stage's checkpoint?)")
        try:
            engine.load_checkpoint(str(path), tag="state", load_module_strict=True)
        except RuntimeError as e:
            raise RuntimeError(f"cannot load {path} into the {name}: {e}") from e
    for name, ema in emas.items():
        f = d / "ema" / name / f"rank{dist.get_rank():05d}.safetensors"
        if not f.exists():
            raise ValueError(
                f"{f} is missing (was the checkpoint written with another world "
                "size? EMA shadows are stored per rank)"
            )
        ema.load_state_dict(load_file(str(f)), source=str(f))
    for name, module in (modules or {}).items():
        f = d / "modules" / name / f"rank{dist.get_rank():05d}.safetensors"
        if not f.exists():
            raise ValueError(f"{f} is missing")
        module.load_state_dict(load_file(str(f)), strict=False)
    return json.loads(state_file.read_text())
