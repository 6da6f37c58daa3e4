"""Checkpoint conversion: the TP-sharded layout, diffusers import/export (any registered model
family: :mod:`megatron_apt.models.families`), training-checkpoint export, resharding and
inspection. ``tools/convert_checkpoint.py`` is a thin CLI over this.

Formats (see :func:`detect_format`):

* ``model``: one consolidated TP=1 safetensors file with the config in its header
  (:mod:`megatron_apt.checkpoint.io`), the format the stages hand to each other.
* ``tp-sharded``: a directory ``CKPT/`` with ``megatron_apt_sharded.json`` (format, version,
  ``tp_size``, role, config, and every tensor's full shape, dtype and TP partition dim) and
  ``tp_rank_XX.safetensors`` per TP rank: the rank's slice of split tensors (megatron's
  contiguous split along ``partition_dim``) and a full copy of replicated ones, so a rank of a
  TP=N run reads exactly one file.
* ``diffusers``: a diffusers model directory of a registered family
  (``SD3Transformer2DModel``, ``WanTransformer3DModel``: ``config.json`` + safetensors, one
  file or a sharded index), or a pipeline root with ``transformer/``.
* ``training``: a ``--save`` directory of ``pretrain_apt.py`` or one of its ``iter_*``.

Every reader validates (architecture, key names, shapes) before anything is written; every
writer writes into a temporary sibling and renames it into place.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from megatron_apt.checkpoint.diffusers_dir import read_diffusers_dir, write_diffusers_dir
from megatron_apt.checkpoint.io import (
    check_keys_match,
    check_unbounded_buffers,
    head_layers_of,
    read_model_file,
    save_model_file,
)
from megatron_apt.config.training import parse_head_layers
from megatron_apt.models.builders import build_skeleton, tensor_layout
from megatron_apt.models.families import config_from_dict, config_to_dict, family_of
from megatron_apt.utils.paths import atomic_directory

SHARDED_FORMAT = "megatron-apt/tp-sharded"
SHARDED_VERSION = 1
SHARDED_INDEX = "megatron_apt_sharded.json"
SHARD_FORMAT = "megatron-apt/tp-shard"
MMDIT_ROLES = ("mmdit", "diffusion", "consistency", "generator", "sd3", "diffusers")
# re-exported: their homes are models/builders.py and checkpoint/io.py
__all__ = ["build_skeleton", "head_layers_of", "tensor_layout"]


def shard_name(tp_rank: int) -> str:
    return f"tp_rank_{tp_rank:02d}.safetensors"


def _check_output_file(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite (--overwrite) to replace it")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a model file must end in .safetensors")


def check_state(
    source: str | Path,
    state: dict[str, torch.Tensor],
    cfg,
    role: str,
    head_layers: Sequence[int] | None = None,
) -> dict[str, tuple[tuple, int | None]]:
    """``ValueError`` naming ``source`` and the missing / unexpected / misshapen keys when
    ``state`` (full, TP=1) is not a ``role`` model of ``cfg``; returns the layout."""
    layout = tensor_layout(cfg, role, head_layers=head_layers)
    expected = {k: torch.empty(s, device="meta") for k, (s, _) in layout.items()}
    check_keys_match(source, state, expected)
    return layout


def split_tp(
    state: dict[str, torch.Tensor], layout: dict, tp_size: int
) -> list[dict[str, torch.Tensor]]:
    """Full tensors -> ``tp_size`` shards (contiguous chunks along each partition dim)."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
    for k, t in state.items():
        dim = layout[k][1]
        if dim is not None and t.shape[dim] % tp_size:
            raise ValueError(f"{k}: dim {dim} of {tuple(t.shape)} does not split into {tp_size}")
        parts = t.chunk(tp_size, dim=dim) if dim is not None else [t] * tp_size
        for r in range(tp_size):
            shards[r][k] = parts[r].contiguous()
    return shards


def merge_tp(
    shards: list[dict[str, torch.Tensor]],
    layout: dict,
    source: str | Path = "shards",
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """TP shards -> full tensors. Replicated tensors are taken from TP rank 0; they must equal
    the other ranks' copies (``strict``: ``ValueError``, else a warning with the difference)."""
    out = {}
    for k, (full, dim) in layout.items():
        parts = [s[k] for s in shards]
        if dim is None:
            for r, p in enumerate(parts[1:], start=1):
                if torch.equal(p, parts[0]):
                    continue
                msg = f"{source}: replicated tensor {k} differs on TP rank {r}"
                if strict:
                    raise ValueError(msg)
                diff = (p.float() - parts[0].float()).abs().max().item()
                warnings.warn(f"{msg} (max abs diff {diff:.3g}); using TP rank 0's", stacklevel=2)
            out[k] = parts[0]
        else:
            out[k] = torch.cat(parts, dim=dim)
        if tuple(out[k].shape) != tuple(full):
            raise ValueError(
                f"{source}: {k} merges to {tuple(out[k].shape)}, the model needs {tuple(full)}"
            )
    return out


# --------------------------------------------------------------------------------------
# The TP-sharded directory
# --------------------------------------------------------------------------------------


def save_sharded(
    path: str | Path,
    state: dict[str, torch.Tensor],
    cfg,
    tp_size: int,
    role: str = "mmdit",
    extra: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Validate a full state dict and write it as a TP=``tp_size`` sharded directory."""
    if tp_size < 1:
        raise ValueError(f"tensor-parallel size {tp_size} must be >= 1")
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    layout = check_state("state dict", state, cfg, role, head_layers_of(extra))
    if role != "discriminator" and cfg.num_heads % tp_size:
        raise ValueError(f"num_heads={cfg.num_heads} is not divisible by TP={tp_size}")
    shards = split_tp(state, layout, tp_size)
    index = {
        "format": SHARDED_FORMAT,
        "format_version": SHARDED_VERSION,
        "tp_size": tp_size,
        "role": role,
        "config": config_to_dict(cfg),
        "extra": extra or {},
        "shards": [shard_name(r) for r in range(tp_size)],
        "tensors": {
            k: {
                "shape": list(state[k].shape),
                "dtype": str(state[k].dtype).removeprefix("torch."),
                "partition_dim": layout[k][1],
            }
            for k in sorted(state)
        },
    }
    with atomic_directory(path, overwrite) as tmp:
        for r, shard in enumerate(shards):
            meta = {
                "format": SHARD_FORMAT,
                "tp_rank": str(r),
                "tp_size": str(tp_size),
                "role": role,
                "config": json.dumps(config_to_dict(cfg)),
            }
            save_file(shard, str(tmp / shard_name(r)), metadata=meta)
        (tmp / SHARDED_INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return Path(path)


def read_sharded_index(path: str | Path) -> dict:
    f = Path(path) / SHARDED_INDEX
    if not f.is_file():
        raise FileNotFoundError(f"{path} has no {SHARDED_INDEX} (not a TP-sharded checkpoint)")
    try:
        index = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from e
    if index.get("format") != SHARDED_FORMAT:
        raise ValueError(f"{f}: format is {index.get('format')!r}, expected {SHARDED_FORMAT!r}")
    if int(index.get("format_version", -1)) > SHARDED_VERSION:
        raise ValueError(
            f"{f} has format_version {index['format_version']}, this code reads up to "
            f"{SHARDED_VERSION}: upgrade megatron-apt"
        )
    return index


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def read_shard(path: str | Path, tp_rank: int) -> tuple[dict[str, torch.Tensor], object, dict]:
    """One TP rank's tensors of a sharded directory, validated against the index."""
    index = read_sharded_index(path)
    tp = int(index["tp_size"])
    if not 0 <= tp_rank < tp:
        raise ValueError(f"{path}: TP rank {tp_rank} outside 0..{tp - 1}")
    cfg = config_from_dict(index["config"])
    check_unbounded_buffers(Path(path) / SHARDED_INDEX, cfg, _index_bytes(index))
    f = Path(path) / shard_name(tp_rank)
    state, meta = _load_safetensors(f)
    if meta.get("format") != SHARD_FORMAT or meta.get("tp_rank") != str(tp_rank):
        raise ValueError(f"{f} is not TP shard {tp_rank} of a {SHARDED_FORMAT} checkpoint")
    expected = {}
    for k, info in index["tensors"].items():
        shape, dim = list(info["shape"]), info["partition_dim"]
        if dim is not None:
            shape[dim] //= tp
        expected[k] = torch.empty(shape, device="meta")
    check_keys_match(f, state, expected)
    return state, cfg, index


def _index_bytes(index: dict) -> int:
    """The full (TP=1) bytes of the tensors a sharded index lists."""
    total = 0
    for info in index["tensors"].values():
        itemsize = getattr(torch, str(info["dtype"]), torch.float32).itemsize
        total += itemsize * int(torch.Size(info["shape"]).numel())
    return total


def read_sharded(path: str | Path) -> tuple[dict[str, torch.Tensor], object, dict]:
    """``(full state dict, config, index)`` of a TP-sharded directory (shards merged)."""
    index = read_sharded_index(path)
    shards, cfg = [], None
    for r in range(int(index["tp_size"])):
        state, cfg, _ = read_shard(path, r)
        shards.append(state)
    role = index.get("role", "mmdit")
    layout = tensor_layout(cfg, role, head_layers=head_layers_of(index.get("extra")))
    stored = {k: v["partition_dim"] for k, v in index["tensors"].items()}
    missing = sorted(set(layout) - set(stored))
    unexpected = sorted(set(stored) - set(layout))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit its config's model: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]}"
        )
    dims = sorted(k for k in layout if layout[k][1] != stored[k])
    if dims:
        raise ValueError(f"{path}: partition dims differ from the model's for {dims[:10]}")
    return merge_tp(shards, layout, path), cfg, index


# --------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------


def read_training(
    path: str | Path, role: str | None = None, ema: bool = False
) -> tuple[dict[str, torch.Tensor], object, dict]:
    """``(full fp32 state dict, config, meta)`` of one engine of a training checkpoint (any
    ZeRO stage, any TP size): ``role`` ``generator`` (default when present), ``model``
    (diffusion / consistency stages) or ``discriminator``; ``ema`` reads the EMA shadows."""
    from megatron_apt.checkpoint import training_ckpt as tc

    d = tc.resolve_iteration_dir(path)
    trainer_state, cfg = tc.training_config(d)
    train = trainer_state["config"]
    tp, world = int(train.get("tensor_parallel", 1)), int(trainer_state.get("world_size", 0))
    if tp < 1 or world < tp or world % tp:
        raise ValueError(f"{d}: world_size={world} does not split into tensor_parallel={tp}")
    # DeepSpeed's data-parallel group is DP x CP (context-parallel ranks hold the same
    # weights): global rank = j * tp + tp_rank for its rank j, so world // tp counts its shards
    present = [e for e in tc.ENGINES if (d / e).is_dir()]
    role = role or ("generator" if "generator" in present else "model")
    if role not in present:
        raise ValueError(f"{d} has no {role!r} engine (it holds {present})")
    kind = "discriminator" if role == "discriminator" else "mmdit"
    heads = None
    if kind == "discriminator":  # a run with --d-head-layers has other heads
        heads = parse_head_layers(train.get("d_head_layers"), cfg.num_layers)
    model = build_skeleton(cfg, kind, heads)
    layout = tensor_layout(cfg, kind, model)
    prefix = tc.PREFIX[role]
    trainable = [prefix + n for n, p in model.named_parameters() if p.requires_grad]
    local = {}
    for k, (shape, dim) in layout.items():
        shape = list(shape)
        if dim is not None:
            shape[dim] //= tp
        local[k] = tuple(shape)
    shards = []
    for r in range(tp):
        state, src = tc.read_engine_tp_rank(
            d,
            role,
            r,
            tp=tp,
            dp=world // tp,
            ema=ema,
            local_shapes={prefix + k: s for k, s in local.items()},
            trainable=trainable,
        )
        state = {
            (k[len(prefix) :] if k.startswith(prefix) else f"<no {prefix}>{k}"): v
            for k, v in state.items()
        }
        expected = {k: torch.empty(s, device="meta") for k, s in local.items()}
        check_keys_match(f"{src} (TP rank {r})", state, expected)
        shards.append(state)
    full = merge_tp(shards, layout, d, strict=False)
    check_unbounded_buffers(d, cfg, sum(t.numel() * t.element_size() for t in full.values()))
    out_role = train.get("stage", "diffusion") if role == "model" else role
    extra = {"source": str(d), "step": trainer_state.get("step"), "ema": ema}
    if heads:
        extra["head_layers"] = list(heads)
    if ema:
        extra["ema_decay"] = train.get("ema_decay")
    layout_info = {"tp_size": tp, "dp_size": world // tp, "zero_stage": train.get("zero_stage")}
    return full, cfg, {"role": out_role, "extra": extra, **layout_info}


# --------------------------------------------------------------------------------------
# Any format: detect, read, write
# --------------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """``model``, ``tp-sharded``, ``diffusers`` or ``training``; ``ValueError`` otherwise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file():
        if p.suffix == ".safetensors":
            return "model"
        raise ValueError(f"{p}: unknown checkpoint file (expected a .safetensors model file)")
    if (p / SHARDED_INDEX).is_file():
        return "tp-sharded"
    if (p / "latest_checkpointed_iteration.txt").is_file() or (p / "trainer_state.json").is_file():
        return "training"
    if (p / "config.json").is_file() or (p / "transformer" / "config.json").is_file():
        return "diffusers"
    raise ValueError(
        f"{p} is no known checkpoint: expected a model .safetensors file, a directory with "
        f"{SHARDED_INDEX}, a diffusers model directory (config.json) or a training checkpoint "
        "(latest_checkpointed_iteration.txt / trainer_state.json)"
    )


def read_diffusers(path: str | Path) -> tuple[dict[str, torch.Tensor], object, dict]:
    """``(state dict in our layout, config, meta)`` of a diffusers model directory of any
    registered family (detected from its ``config.json``'s ``_class_name``). Every tensor
    the config implies must be in the weights (checked on the safetensors headers, before
    anything is loaded or built: ``diffusers_dir.read_diffusers_dir``)."""
    family, cfg, sd, _ = read_diffusers_dir(path)
    state = family.from_diffusers(sd, cfg)
    check_state(path, state, cfg, "mmdit")
    return state, cfg, {"role": family.imported_role, "extra": {"source": str(path)}}


def read_checkpoint(
    path: str | Path, role: str | None = None, ema: bool = False
) -> tuple[dict[str, torch.Tensor], object, dict]:
    """``(full TP=1 state dict, config, meta)`` of a checkpoint in any format, validated
    against a model built from its config. ``meta``: ``role``, ``extra``, ``format``."""
    fmt = detect_format(path)
    if (role not in (None, "generator")) or ema:
        if fmt != "training":
            raise ValueError(f"{path} is a {fmt} checkpoint: role/EMA choices need a training one")
    if fmt == "training":
        state, cfg, meta = read_training(path, role, ema)
    elif fmt == "diffusers":
        state, cfg, meta = read_diffusers(path)
    elif fmt == "tp-sharded":
        state, cfg, index = read_sharded(path)
        meta = {"role": index.get("role", "mmdit"), "extra": index.get("extra", {})}
        meta["tp_size"] = int(index["tp_size"])
    else:
        state, cfg, header = read_model_file(path)
        role_ = header.get("role", "mmdit")
        extra = json.loads(header.get("extra") or "{}")
        check_state(path, state, cfg, _kind(role_), head_layers_of(extra))
        meta = {"role": role_, "extra": extra}
    meta["format"] = fmt
    return state, cfg, meta


def write_checkpoint(
    path: str | Path,
    state: dict[str, torch.Tensor],
    cfg,
    tp_size: int = 1,
    role: str = "mmdit",
    extra: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """``*.safetensors``: one model file (TP=1); otherwise a TP-sharded directory."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if tp_size != 1:
            raise ValueError(
                f"{path}: a .safetensors model file is TP=1; give a directory for TP={tp_size}"
            )
        _check_output_file(path, overwrite)
        check_state("state dict", state, cfg, _kind(role), head_layers_of(extra))
        return save_model_file(path, state, cfg, role=role, extra=extra)
    return save_sharded(path, state, cfg, tp_size, role=role, extra=extra, overwrite=overwrite)


def _kind(role: str) -> str:
    return "discriminator" if role == "discriminator" else "mmdit"


def check_output(path: str | Path, tp_size: int = 1, overwrite: bool = False) -> None:
    """Fail before reading anything when the output cannot be written as asked."""
    path = Path(path)
    if tp_size < 1:
        raise ValueError(f"tensor-parallel size {tp_size} must be >= 1")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite (--overwrite) to replace it")
    if path.suffix == ".safetensors" and tp_size != 1:
        raise ValueError(
            f"{path}: a .safetensors model file is TP=1; give a directory for TP={tp_size}"
        )


# --------------------------------------------------------------------------------------
# The subcommands
# --------------------------------------------------------------------------------------


def import_diffusers(src, dst, tp_size: int = 1, overwrite: bool = False) -> Path:
    """A diffusers model directory (``SD3Transformer2DModel``, ``WanTransformer3DModel``, or
    a pipeline root with ``transformer/``) -> our format (model file, or TP-sharded dir)."""
    check_output(dst, tp_size, overwrite)
    state, cfg, meta = read_diffusers(src)
    return write_checkpoint(dst, state, cfg, tp_size, meta["role"], meta["extra"], overwrite)


def export_diffusers(src, dst, overwrite: bool = False) -> Path:
    """Any checkpoint of a velocity model -> the diffusers model directory of its family
    (``SD3Transformer2DModel`` for SD3-style MMDiTs, ``WanTransformer3DModel``)."""
    check_output(dst, 1, overwrite)
    state, cfg, meta = read_checkpoint(src)
    if meta["role"] == "discriminator":
        raise ValueError(f"{src} holds a discriminator, which has no diffusers equivalent")
    family = family_of(cfg)
    config = family.config_to_diffusers(cfg)  # refuses configs without a diffusers twin
    return write_diffusers_dir(dst, family.to_diffusers(state, cfg), config, overwrite)


def export_training(
    src, dst, role: str | None = None, ema: bool = False, overwrite: bool = False
) -> Path:
    """A training checkpoint's engine (or its EMA) -> one consolidated TP=1 model file."""
    if detect_format(src) != "training":
        raise ValueError(f"{src} is not a training checkpoint")
    if Path(dst).suffix != ".safetensors":
        raise ValueError(f"{dst}: the export is a model file and must end in .safetensors")
    check_output(dst, 1, overwrite)
    state, cfg, meta = read_training(src, role, ema)
    return write_checkpoint(dst, state, cfg, 1, meta["role"], meta["extra"], overwrite)


def reshard(src, dst, tp_size: int, overwrite: bool = False) -> Path:
    """Any checkpoint -> TP=``tp_size`` (a directory, or a model file for ``*.safetensors``)."""
    check_output(dst, tp_size, overwrite)
    state, cfg, meta = read_checkpoint(src)
    return write_checkpoint(dst, state, cfg, tp_size, meta["role"], meta["extra"], overwrite)


def inspect(path, role: str | None = None, ema: bool = False) -> dict:
    """Format, role, model family (and a one-line summary), config, TP layout, keys with
    shapes and dtypes, parameter count."""
    fmt = detect_format(path)
    tp_layout = {}
    if fmt == "tp-sharded":
        index = read_sharded_index(path)
        tp_layout = {
            "tp_size": index["tp_size"],
            "shards": index["shards"],
            "split": {
                k: v["partition_dim"]
                for k, v in index["tensors"].items()
                if v["partition_dim"] is not None
            },
        }
    state, cfg, meta = read_checkpoint(path, role, ema)
    if fmt == "training":
        tp_layout = {k: meta[k] for k in ("tp_size", "dp_size", "zero_stage")}
    elif fmt != "tp-sharded":
        tp_layout = {"tp_size": 1}
    return {
        "path": str(path),
        "format": fmt,
        "role": meta["role"],
        "family": family_of(cfg).name,
        "summary": family_of(cfg).describe(cfg),
        "config": config_to_dict(cfg),
        "tp_layout": tp_layout,
        "num_parameters": sum(t.numel() for t in state.values()),
        "tensors": {
            k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for k, t in sorted(state.items())
        },
        "extra": meta.get("extra", {}),
    }
