"""Writing latent shards and the index (format: :mod:`megatron_apt.data.format`).

Shards are written under a temporary name and renamed with ``os.replace`` once complete, so a
killed writer never leaves a half-written file under a shard name; the index is built from the
records of completed shards only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_apt.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    SHARD_META_KEY,
    atomic_write_json,
    bucket_key,
    sha256_file,
)

__all__ = ["build_index", "write_index", "write_shard"]


def _check_shard_tensors(
    latents: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    pooled: torch.Tensor | None,
    samples: Sequence[dict],
) -> None:
    n = latents.shape[0]
    if latents.ndim != 5 or text.ndim != 3 or text_mask.shape != text.shape[:2]:
        raise ValueError(
            f"shard tensors need latents [N,C,T,H,W], text [N,L,D], text_mask [N,L]; got "
            f"{tuple(latents.shape)}, {tuple(text.shape)}, {tuple(text_mask.shape)}"
        )
    sizes = {n, text.shape[0], len(samples)} | ({pooled.shape[0]} if pooled is not None else set())
    if len(sizes) != 1 or n == 0:
        raise ValueError(f"shard tensors and sample metadata disagree on N (or N=0): {sizes}")


def write_shard(
    path: str | Path,
    latents: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    samples: Sequence[dict],
    pooled: torch.Tensor | None = None,
) -> dict:
    """Write one shard atomically; return its index record (``file`` is the bare file name).

    Args:
        latents: ``[N, C, T, H, W]`` latents of one bucket.
        text: ``[N, L, D]`` token embeddings; ``text_mask``: ``[N, L]`` bool.
        samples: ``N`` JSON-able dicts (caption, source, fps, frames, height, width, ...).
        pooled: ``[N, P]`` pooled text embeddings, or None.
    """
    _check_shard_tensors(latents, text, text_mask, pooled, samples)
    path = Path(path)
    shape = list(latents.shape[1:])
    tensors = {
        "latents": latents.detach().cpu().contiguous(),
        "text": text.detach().cpu().contiguous(),
        "text_mask": text_mask.detach().cpu().bool().contiguous(),
    }
    if pooled is not None:
        tensors["pooled"] = pooled.detach().cpu().contiguous()
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "latent_shape": shape}
    header["samples"] = list(samples)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={SHARD_META_KEY: json.dumps(header)})
    os.replace(tmp, path)
    return {
        "file": path.name,
        "bucket": bucket_key(shape),
        "latent_shape": shape,
        "num_samples": int(latents.shape[0]),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def build_index(
    shards: Sequence[dict],
    *,
    text_length: int,
    text_dim: int,
    pooled_dim: int | None = None,
    dtype: str = "float32",
    **attrs,
) -> dict:
    """Index dict from shard records (``file`` relative to the index directory). ``attrs``
    (e.g. ``vae``, ``text_encoder``, ``bucket_presets``, ``num_skipped``) are stored as given."""
    shards = sorted(shards, key=lambda s: s["file"])
    channels = {s["latent_shape"][0] for s in shards}
    if len(channels) > 1:
        raise ValueError(f"shards disagree on the latent channel count: {sorted(channels)}")
    buckets: dict[str, dict] = {}
    for s in shards:
        b = buckets.setdefault(
            s["bucket"], {"latent_shape": s["latent_shape"], "num_samples": 0, "num_shards": 0}
        )
        b["num_samples"] += s["num_samples"]
        b["num_shards"] += 1
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "num_samples": sum(s["num_samples"] for s in shards),
        "latent_channels": channels.pop() if channels else None,
        "text_length": int(text_length),
        "text_dim": int(text_dim),
        "pooled_dim": pooled_dim,
        "dtype": dtype,
        **attrs,
        "buckets": dict(sorted(buckets.items())),
        "shards": list(shards),
    }


def write_index(root: str | Path, index: dict) -> Path:
    """Write ``root/index.json`` atomically; return its path."""
    path = Path(root) / INDEX_FILE
    atomic_write_json(path, index)
    return path
