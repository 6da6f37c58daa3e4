"""``load_mmdit``: the velocity model of any checkpoint, ready for inference: an MMDiT, or
the model of the checkpoint's family (``megatron_apt.models.families``; a Wan checkpoint
gives a ``WanDiT``).

Formats: a model file (``*.safetensors``), a TP-sharded directory, a diffusers directory
(``SD3Transformer2DModel``, ``WanTransformer3DModel``),
a training checkpoint (``--save`` root or ``iter_*``; the generator, or the diffusion /
consistency model, or their EMA). See :mod:`megatron_apt.checkpoint.convert`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_apt.checkpoint import convert
from megatron_apt.checkpoint.io import check_keys_match
from megatron_apt.models.families import family_of
from megatron_apt.parallel.state import ParallelState, single_process_state
from megatron_apt.parallel.tensor_parallel import shard_state_dict, tp_partition_dim


def _read_for_rank(
    path: str | Path, ps: ParallelState | None, role: str | None, ema: bool
) -> tuple[dict[str, torch.Tensor], object, dict, bool]:
    """``(state, config, meta, is_local_shard)``: a TP-sharded directory written for this
    TP size gives this rank's file alone; everything else is read whole."""
    if ps is not None and ps.tp_size > 1 and convert.detect_format(path) == "tp-sharded":
        index = convert.read_sharded_index(path)
        if int(index["tp_size"]) == ps.tp_size:
            state, cfg, _ = convert.read_shard(path, ps.tp_rank)
            meta = {"role": index.get("role", "mmdit"), "extra": index.get("extra", {})}
            meta["partition_dims"] = {k: v["partition_dim"] for k, v in index["tensors"].items()}
            return state, cfg, meta, True
    state, cfg, meta = convert.read_checkpoint(path, role, ema)
    return state, cfg, meta, False


def load_mmdit(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    ps: ParallelState | None = None,
    *,
    role: str | None = None,
    ema: bool = False,
    spec: str | None = None,
):
    """The :class:`~megatron_apt.models.MMDiT` of a checkpoint in any supported format, in
    eval mode without gradients, on ``device`` in ``dtype``.

    Args:
        path: model file, TP-sharded directory, diffusers SD3 directory (or pipeline root
            with ``transformer/``), or training checkpoint directory.
        ps: process groups for a TP-sharded model (build with ``initialize_parallel``);
            None: single process (TP=1).
        role: training checkpoints only: ``generator`` (default when present) or ``model``.
        ema: training checkpoints only: the EMA weights instead of the trained ones.
        spec: layer spec name (``local`` default; ``te`` etc. on GPUs).

    Call it as ``model(latents [B, C, T, H, W], timesteps [B] on [0, 1], text [B, L, D],
    text_mask [B, L] bool, pooled_text [B, P] or None)``; it returns the velocity
    ``v = noise - data``. Wrap it in :class:`~megatron_apt.models.Generator` for one-step
    sampling.
    """
    if role == "discriminator":
        raise ValueError("load_mmdit loads velocity models; the discriminator is not one")
    state, cfg, meta, local = _read_for_rank(path, ps, role, ema)
    if meta.get("role") == "discriminator":
        raise ValueError(
            f"{path} holds a discriminator (role 'discriminator'), not a velocity model; "
            "load its backbone from the diffusion checkpoint instead"
        )
    model = _build_uninitialized(cfg, ps, spec, dtype)
    if local:
        _check_local_shard(path, model, state, meta["partition_dims"])
    else:
        state = shard_state_dict(state, model, model.ps)
    model.load_state_dict(state, strict=False)
    missing = _missing_keys(model, state)
    if missing:  # load_state_dict(strict=False) only tolerates absent _extra_state
        raise ValueError(f"{path}: keys missing for the model: {missing[:10]}")
    # the family's fp32 parameters (Wan's, as diffusers loads them) keep their loaded values
    islands = [(p, p.data) for p in model.fp32_island_parameters()]
    model = model.to(device=device, dtype=dtype)
    for p, data in islands:
        p.data = data.to(device)
    return model.eval().requires_grad_(False)


def _check_local_shard(path, model, state: dict, partition_dims: dict) -> None:
    """A TP shard file against this rank's model: keys, local shapes and split dims."""
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    check_keys_match(path, state, expected)
    params = dict(model.named_parameters())
    wrong = sorted(
        k for k, dim in partition_dims.items() if k in params and dim != tp_partition_dim(params[k])
    )
    if wrong:
        raise ValueError(f"{path}: split along other dims than the model's: {wrong[:10]}")


def _build_uninitialized(cfg, ps: ParallelState | None, spec, dtype):
    """The velocity model of ``cfg``'s family without its random initialization (minutes
    for billions of parameters): built on the meta device, then given empty CPU storage;
    parameters keep megatron's TP attributes; the sin-cos table buffer is recomputed. TE
    specs build on the GPU without their random initialization (:func:`model_build`)."""
    from megatron_apt.models.build_options import model_build
    from megatron_apt.models.embeddings import sincos_2d_table

    build = family_of(cfg).build
    if spec not in (None, "local"):  # TE: on the GPU, built without its random init
        with model_build(initialize=False):
            return build(cfg, ps, spec=spec, params_dtype=dtype)
    ps = ps or single_process_state()
    with torch.device("meta"):
        model = build(cfg, ps, spec=spec, params_dtype=dtype, use_cpu_initialization=True)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                new = torch.nn.Parameter(torch.empty_like(p, device="cpu"), p.requires_grad)
                new.__dict__.update(p.__dict__)  # tensor_model_parallel, partition_dim, ...
                module._parameters[name] = new
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty_like(b, device="cpu")
    if hasattr(model, "pos_table"):
        table = sincos_2d_table(cfg.hidden_size, cfg.pos_embed_max_size, cfg.pos_embed_base_size)
        model.pos_table.copy_(table.to(model.pos_table.dtype))
    unknown = [n for n, _ in model.named_buffers() if n != "pos_table"]
    assert not unknown, f"buffers to recompute after a meta build: {unknown}"
    return model


def _missing_keys(model: torch.nn.Module, state: dict) -> list[str]:
    return sorted(k for k in model.state_dict() if k not in state and "_extra_state" not in k)
