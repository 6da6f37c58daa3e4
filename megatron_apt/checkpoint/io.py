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

from megatron_apt.models.families import config_from_dict, config_to_dict, family_of

FORMAT = "megatron-apt/model"
FORMAT_VERSION = 1


def save_model_file(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    cfg,
    role: str = "mmdit",
    extra: dict | None = None,
) -> Path:
    """Write a full (TP=1) state dict with the model config (any family: the header names
    it); atomic (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().contiguous().cpu()
        for k, v in state_dict.items()
        if not k.endswith("_extra_state")
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=model_file_metadata(cfg, role, extra))
    tmp.replace(path)
    return path


def model_file_metadata(cfg, role: str = "mmdit", extra: dict | None = None) -> dict:
    """The safetensors header metadata of a model file (what :func:`read_model_file` checks);
    also written by the streaming export (``megatron_apt.engine.export``)."""
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "role": role,
        "config": json.dumps(config_to_dict(cfg)),
        "extra": json.dumps(extra or {}),
    }


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], object, dict]:
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
    cfg = config_from_header(path, meta, state)
    return state, cfg, meta


def head_layers_of(extra: dict | None) -> tuple[int, ...] | None:
    """The discriminator head blocks recorded in a converted file's ``extra`` (None: the
    paper's default placement)."""
    heads = (extra or {}).get("head_layers")
    return tuple(int(k) for k in heads) if heads else None


POS_TABLE_FLOOR_BYTES = 64 << 20  # a sincos table may always take this much


def check_unbounded_buffers(path, cfg, weight_bytes: int) -> None:
    """``ValueError`` naming ``path`` and the config field when a build of ``cfg`` would
    compute buffers that no stored tensor bounds (SD3's sin-cos table) much larger than the
    checkpoint's ``weight_bytes`` (more than those and 64 MiB): a config from a file is data,
    refused before anything is built from it. Every format whose files do not hold such a
    buffer calls this (model files, TP-sharded directories, training checkpoints)."""
    table, field = family_of(cfg).unbounded_buffers(cfg)
    if table > max(POS_TABLE_FLOOR_BYTES, weight_bytes):
        raise ValueError(
            f"{path}: {field} would build a {table / 2**30:.1f} GiB buffer (position table) "
            f"for {weight_bytes / 2**20:.1f} MiB of weights; the config is not that of a real "
            "model"
        )


def config_from_header(path: Path, meta: dict, state: dict[str, torch.Tensor]):
    """The model config of a file's header, checked before anything is built from it: the
    header is data from whoever wrote the file. Its family (``family``; none: an MMDiT, the
    files written before there was a second one), types and ranges (one ``ValueError``
    naming the file and the field); the size of the buffers no tensor bounds (SD3's sin-cos
    position table, ``pos_embed_max_size``^2 x hidden: 1500 made a 1 MB file take 2.6 GB) may
    not exceed the file's weights (or 64 MiB); every tensor's shape must be the one the
    config gives (checked on a meta-device skeleton, so a header claiming a huge model
    allocates nothing)."""
    try:
        raw = json.loads(meta["config"])
        cfg = config_from_dict(raw)
    except KeyError:
        raise ValueError(f"{path}: the header has no model config") from None
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad model config in the header: {e}") from None
    check_unbounded_buffers(path, cfg, sum(t.numel() * t.element_size() for t in state.values()))
    from megatron_apt.models.builders import tensor_layout  # lazy: keeps io light

    role = meta.get("role", "mmdit")
    kind = "discriminator" if role == "discriminator" else "mmdit"
    try:
        extra = json.loads(meta.get("extra") or "{}")
        if not isinstance(extra, dict):
            raise ValueError(f"a JSON object, got {type(extra).__name__}")
        layout = tensor_layout(cfg, kind, head_layers=head_layers_of(extra))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad 'extra' in the header: {e}") from None
    expected = {k: torch.empty(shape, device="meta") for k, (shape, _) in layout.items()}
    check_keys_match(path, state, expected)
    return cfg


def check_config_matches(path: str | Path, found, expected) -> None:
    """``ValueError`` naming the families when they differ, else every architecture field
    that differs."""
    fa, fb = family_of(found).name, family_of(expected).name
    if fa != fb:
        raise ValueError(f"{path} holds a {fa!r} model, the model built is a {fb!r} one")
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
