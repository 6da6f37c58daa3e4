"""Read the weights of a ``pretrain_apt.py`` training checkpoint without DeepSpeed or processes.

Layout (``megatron_apt.engine.checkpointing``): ``iter_XXXXXXX/{generator,discriminator|model}/
state/`` hold DeepSpeed engine checkpoints, one set of files per TP rank (``mp_rank_XX``) and,
under ZeRO, per data-parallel rank (``zero_pp_rank_D``); ``ema/<engine>/rankNNNNN.safetensors``
the EMA shadows per global rank; ``trainer_state.json`` the TrainConfig (model config, TP size,
ZeRO stage) and the world size. Ranks are laid out megatron's way (tp-cp-dp, TP adjacent):
``global rank = dp_rank * tp + tp_rank``.

The fp32 master weights come from where DeepSpeed keeps them:

* ZeRO-0: the module state dict (fp32 training) or ``optimizer.fp32_groups`` (bf16), in the
  order of the optimizer's parameters (the trainable ones, ``named_parameters`` order);
* ZeRO-1/2: ``single_partition_of_fp32_groups`` of every DP rank, concatenated in rank order,
  walked with ``param_shapes`` and ``param_alignment_paddings``; frozen parameters whole in
  ``frozen_param_fragments``;
* ZeRO-3: ``fp32_flat_groups`` of every DP rank: each parameter is a ``ceil(numel / dp)`` slice
  at the same offset on every rank; concatenated in rank order, truncated to numel, reshaped.
  Frozen parameters likewise from ``frozen_param_fragments``.

EMA shadows: full TP-local tensors under ZeRO-0/1/2 (DP rank 0's file is read), flat
partitions of each parameter's ``ds_tensor`` under ZeRO-3 (concatenated over the DP ranks).
Every file is read with ``torch.load(weights_only=True)`` and DeepSpeed's allow-listed types.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from megatron_apt.models.families import config_from_dict

LATEST = "latest_checkpointed_iteration.txt"
ENGINES = ("generator", "discriminator", "model")
PREFIX = {"generator": "model.", "model": "", "discriminator": ""}


def resolve_iteration_dir(path: str | Path) -> Path:
    """The ``iter_*`` directory of ``path`` (a ``--save`` root: the latest one)."""
    p = Path(path)
    if (p / LATEST).is_file():
        text = (p / LATEST).read_text().strip()
        if not text.isdigit():
            raise ValueError(f"{p / LATEST} holds {text!r}, not an iteration number")
        p = p / f"iter_{int(text):07d}"
    if not (p / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"{p} is not a training checkpoint (no trainer_state.json, no {LATEST})"
        )
    if not (p / "COMPLETE").is_file():
        raise ValueError(f"{p} is incomplete (no COMPLETE marker): a crashed save?")
    return p


def torch_load(path: Path) -> dict:
    """``torch.load(weights_only=True)`` with DeepSpeed's allow-listed types; errors name it."""
    from megatron_apt.engine.safe_checkpoint import _safe_globals

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling error, truncated zip, foreign object
            raise ValueError(f"cannot read {path} (weights-only): {e}") from e


def training_config(d: Path) -> tuple[dict, object]:
    """``(trainer_state, model config)`` of an iteration directory."""
    f = d / "trainer_state.json"
    try:
        state = json.loads(f.read_text())
        cfg = config_from_dict(state["config"]["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{f} has no readable model config: {e!r}") from e
    return state, cfg


def _zero_stage(state_dir: Path, tp_rank: int) -> int:
    if list(state_dir.glob(f"zero_pp_rank_*_mp_rank_{tp_rank:02d}_model_states.pt")):
        return 3
    if list(state_dir.glob(f"*zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt")):
        return 2  # 1 and 2 share the layout
    if (state_dir / f"mp_rank_{tp_rank:02d}_model_states.pt").is_file():
        return 0
    raise FileNotFoundError(
        f"{state_dir} has no DeepSpeed files of TP rank {tp_rank} (mp_rank_{tp_rank:02d})"
    )


def _optim_file(state_dir: Path, dp_rank: int, tp_rank: int) -> Path:
    name = f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"
    for f in (state_dir / name, state_dir / f"bf16_{name}"):
        if f.is_file():
            return f
    raise FileNotFoundError(f"{state_dir / name} (or bf16_{name}) is missing")


def _opt_state(f: Path, dp: int) -> dict:
    osd = torch_load(f).get("optimizer_state_dict")
    if not isinstance(osd, dict):
        raise ValueError(f"{f} has no optimizer_state_dict (not a ZeRO optimizer shard)")
    count = osd.get("partition_count")
    count = max(count) if isinstance(count, list) else count
    if count != dp:
        raise ValueError(f"{f} was written by {count} data-parallel ranks, expected {dp}")
    return osd


def _zero0(state_dir: Path, tp_rank: int, trainable: list[str]) -> dict[str, torch.Tensor]:
    f = state_dir / f"mp_rank_{tp_rank:02d}_model_states.pt"
    sd = torch_load(f)
    module = sd.get("module")
    if not isinstance(module, dict):
        raise ValueError(f"{f} has no module state")
    out = {k: v.float() for k, v in module.items() if not k.endswith("_extra_state")}
    fp32 = (sd.get("optimizer") or {}).get("fp32_groups")
    if fp32 is not None:  # bf16: fp32 masters in the optimizer's parameter order
        flat = [t for group in fp32 for t in group]
        if len(flat) != len(trainable):
            raise ValueError(
                f"{f} holds {len(flat)} fp32 master tensors, the model has {len(trainable)} "
                "trainable parameters"
            )
        for name, t in zip(trainable, flat):
            if name in out and out[name].shape != t.shape:
                raise ValueError(f"{f}: fp32 master of {name} has shape {tuple(t.shape)}")
            out[name] = t.detach().float()
    return out


def _zero12(
    state_dir: Path, tp_rank: int, dp: int, trainable: list[str]
) -> dict[str, torch.Tensor]:
    mf = state_dir / f"mp_rank_{tp_rank:02d}_model_states.pt"
    model_states = torch_load(mf)
    shapes = model_states.get("param_shapes")
    if not isinstance(shapes, list):
        raise ValueError(f"{mf} has no param_shapes (not a ZeRO-1/2 checkpoint)")
    # frozen parameters: whole in frozen_param_fragments (fp32) or only in the module (bf16)
    out = {k: v.float() for k, v in (model_states.get("frozen_param_fragments") or {}).items()}
    keep = set(trainable) | set(out)
    for k, v in (model_states.get("module") or {}).items():
        if k not in keep and not k.endswith("_extra_state"):
            out[k] = v.float()
    parts = [_opt_state(_optim_file(state_dir, r, tp_rank), dp) for r in range(dp)]
    paddings = parts[0].get("param_alignment_paddings")
    for g, group in enumerate(shapes):
        flat = torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])
        offset = 0
        for i, (name, shape) in enumerate(group.items()):
            n = math.prod(shape)
            out[name] = flat.narrow(0, offset, n).view(tuple(shape)).float().clone()
            offset += n + (paddings[g][i] if paddings else 0)
        align = 2 * dp  # DeepSpeed pads each group to a multiple of 2 * dp (zero_to_fp32)
        if math.ceil(offset / align) != math.ceil(flat.numel() / align):
            raise ValueError(
                f"{state_dir}: TP rank {tp_rank} group {g} holds {flat.numel()} values, the "
                f"parameters need {offset}: files of different runs mixed?"
            )
    return out


def _unpartition(parts: list[torch.Tensor], shape, source: str) -> torch.Tensor:
    flat = torch.cat(parts)
    n = math.prod(shape)
    if flat.numel() < n:
        raise ValueError(f"{source}: partitions hold {flat.numel()} values, need {n}")
    return flat[:n].view(tuple(shape)).float().clone()


def _zero3(state_dir: Path, tp_rank: int, dp: int) -> dict[str, torch.Tensor]:
    name = "zero_pp_rank_{}_mp_rank_{:02d}_model_states.pt"
    states = [torch_load(state_dir / name.format(r, tp_rank)) for r in range(dp)]
    shapes = states[0].get("param_shapes")
    if not isinstance(shapes, list):
        raise ValueError(f"{state_dir / name.format(0, tp_rank)} has no param_shapes")
    out = {}
    for k, shape in (states[0].get("frozen_param_shapes") or {}).items():
        frags = [s["frozen_param_fragments"][k] for s in states]
        out[k] = _unpartition(frags, shape, f"{state_dir} frozen {k}")
    opt = [_opt_state(_optim_file(state_dir, r, tp_rank), dp) for r in range(dp)]
    flats = [torch.cat(o["fp32_flat_groups"]) for o in opt]  # [per-rank flat]
    offset = 0
    for k, shape in ((k, s) for group in shapes for k, s in group.items()):
        chunk = math.ceil(math.prod(shape) / dp)
        out[k] = _unpartition([f[offset : offset + chunk] for f in flats], shape, k)
        offset += chunk
    if offset != flats[0].numel():
        raise ValueError(
            f"{state_dir}: TP rank {tp_rank} partitions hold {flats[0].numel()} values per "
            f"rank, the parameters use {offset}: files of different runs mixed?"
        )
    return out


EMA_FRAGMENTS = "fragments"  # safetensors metadata key of an EMA file (ZeRO 1/2 shares)


def _ema(
    ema_dir: Path, tp_rank: int, tp: int, dp: int, zero3: bool, local_shapes: dict
) -> dict[str, torch.Tensor]:
    def read(dp_rank: int) -> tuple[dict[str, torch.Tensor], dict, Path]:
        f = ema_dir / f"rank{dp_rank * tp + tp_rank:05d}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing (EMA shadows are stored per rank)")
        try:
            with safe_open(str(f), framework="pt") as h:
                meta = h.metadata() or {}
            return load_file(str(f)), meta, f
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{f} is not a readable safetensors file: {e}") from e

    if zero3:
        parts = [read(r)[0] for r in range(dp)]
        out = {}
        for k in parts[0]:
            if k not in local_shapes:
                out[k] = parts[0][k]  # reported as unexpected by the key check
                continue
            out[k] = _unpartition([p[k] for p in parts], local_shapes[k], f"{ema_dir} {k}")
        return out
    first, meta, _ = read(0)
    if EMA_FRAGMENTS not in meta:  # full shadows on every rank (ZeRO 0, or an older file)
        return {k: v.float() for k, v in first.items()}
    # ZeRO 1/2: each rank holds a slice of the flattened parameter, at the recorded start
    ranks = [(first, meta, ema_dir)] + [read(r) for r in range(1, dp)]
    out: dict[str, torch.Tensor] = {}
    fragments = [json.loads(m.get(EMA_FRAGMENTS, "{}")) for _, m, _ in ranks]
    for k, t in first.items():
        if k not in fragments[0]:
            out[k] = t.float()  # a full shadow (a parameter no optimizer partition holds)
    for k, shape in local_shapes.items():
        holders = [(i, starts[k]) for i, starts in enumerate(fragments) if k in starts]
        if not holders:
            continue  # missing: named by the key check
        n = math.prod(shape)
        flat, covered = torch.zeros(n), 0
        for i, start in holders:
            t = ranks[i][0][k].reshape(-1).float()
            if start < 0 or start + t.numel() > n:
                raise ValueError(
                    f"{ranks[i][2]}: {k} fragment [{start}, {start + t.numel()}) outside its "
                    f"{n} values"
                )
            flat[start : start + t.numel()] = t
            covered += t.numel()
        if covered != n:
            raise ValueError(
                f"{ema_dir}: the ranks' fragments of {k} cover {covered} of {n} values"
            )
        out[k] = flat.view(tuple(shape))
    return out


def read_engine_tp_rank(
    d: Path,
    engine: str,
    tp_rank: int,
    *,
    tp: int,
    dp: int,
    ema: bool,
    local_shapes: dict[str, tuple],
    trainable: list[str],
) -> tuple[dict[str, torch.Tensor], Path]:
    """TP-local fp32 tensors of one engine (keys as the engine's module names them) and the
    directory they came from (for error messages)."""
    state_dir = d / engine / "state"
    if not state_dir.is_dir():
        raise FileNotFoundError(f"{state_dir} is missing")
    stage = _zero_stage(state_dir, tp_rank)
    if ema:
        ema_dir = d / "ema" / engine
        if not ema_dir.is_dir():
            have = sorted(p.name for p in (d / "ema").iterdir()) if (d / "ema").is_dir() else []
            raise FileNotFoundError(f"{ema_dir} is missing: the {engine} has no EMA (EMAs: {have})")
        return _ema(ema_dir, tp_rank, tp, dp, stage == 3, local_shapes), ema_dir
    if stage == 0:
        return _zero0(state_dir, tp_rank, trainable), state_dir
    if stage == 3:
        return _zero3(state_dir, tp_rank, dp), state_dir
    return _zero12(state_dir, tp_rank, dp, trainable), state_dir
