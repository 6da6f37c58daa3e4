"""Model weight files: one consolidated (TP=1) safetensors file with its config in the header.

``save_model_file`` / ``load_model_file`` are the format every stage hands to the next: the
diffusion stage's weights initialize the consistency student and the discriminator backbone,
the distilled weights initialize the APT generator. Loading never executes pickled code
(safetensors). Mismatches are errors that name the file and the keys or config fields.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megatron_apt.config.model import MMDiTConfig

FORMAT = "megatron-apt/model"
FORMAT_VERSION = 1


def save_model_file(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    cfg: MMDiTConfig,
    role: str = "mmdit",
    extra: dict | None = None,
) -> Path:
    """Write a full (TP=1) state dict with the model config; atomic (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().contiguous().cpu()
        for k, v in state_dict.items()
        if not k.endswith("_extra_state")
    }
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "role": role,
        "config": json.dumps(cfg.to_dict()),
        "extra": json.dumps(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], MMDiTConfig, dict]:
    """``(state_dict, config, metadata)`` of a file written by :func:`save_model_file`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a megatron-apt model file (format={meta.get('format')})")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {meta['format_version']}, this code "
            f"reads up to {FORMAT_VERSION}: upgrade megatron-apt"
        )
    cfg = MMDiTConfig.from_dict(json.loads(meta["config"]))
    return state, cfg, meta


def check_config_matches(path: str | Path, found: MMDiTConfig, expected: MMDiTConfig) -> None:
    """``ValueError`` naming every architecture field that differs."""
    a, b = found.to_dict(), expected.to_dict()
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    if diff:
        lines = ", ".join(f"{k}: file {v[0]!r} vs model {v[1]!r}" for k, v in sorted(diff.items()))
        raise ValueError(f"{path} holds another architecture ({lines})")


def check_keys_match(path: str | Path, found: dict, expected: dict) -> None:
    """``ValueError`` naming missing / unexpected keys and shape mismatches."""
    want = {k for k in expected if not k.endswith("_extra_state")}
    missing, unexpected = sorted(want - set(found)), sorted(set(found) - want)
    shapes = sorted(
        k for k in want & set(found) if tuple(found[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{'...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}"
            )
        if shapes:
            parts.append(
                "shape mismatches "
                + ", ".join(
                    f"{k}: {tuple(found[k].shape)} vs {tuple(expected[k].shape)}"
                    for k in shapes[:10]
                )
            )
        raise ValueError(f"{path} does not fit the model: " + "; ".join(parts))


def load_weights(module: torch.nn.Module, state: dict, source: str | Path) -> None:
    """``module.load_state_dict(state)``, strict but for Transformer Engine's ``_extra_state``
    entries (FP8 metadata), which model files do not carry. megatron's local linears register
    a load pre-hook that adds an empty ``_extra_state`` (megatron-core 0.16.1,
    tensor_parallel/layers.py:941 and :1232, "Hook adding a default empty _extra_state"); TE's
    modules have none, so a strict load of a model file into a ``te`` model raises. Anything
    else missing or unexpected is a ``ValueError`` naming ``source``."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{source} does not fit the model: missing keys {missing[:10]}, unexpected keys "
            f"{list(result.unexpected_keys)[:10]}"
        )
