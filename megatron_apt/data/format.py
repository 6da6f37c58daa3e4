"""On-disk format of precomputed training data: latent shards plus one JSON index.

A data set is a directory::

    index.json                      the index (schema below), written last and atomically
    report.json                     preprocessing report: skipped inputs with path and reason
    shards/u000012-4x1x8x8.safetensors   one shard: samples of ONE latent shape bucket
    units/u000012.json              preprocessing bookkeeping (resume); not read by the reader

A shard is a safetensors file (no pickle) with the tensors of ``N`` samples of one bucket::

    latents    [N, C, T, H, W]   VAE latents (normalized), dtype of the data set
    text       [N, L, D]         text-encoder token embeddings, zero at padded positions
    text_mask  [N, L] bool       True = real token; L is the same for the whole data set
    pooled     [N, P]            only when the text encoder has a pooled output

and, in the safetensors header (``__metadata__``, read without touching the tensors), the key
``megatron_apt`` holding JSON ``{"format", "version", "latent_shape", "samples": [{"caption",
"source", "fps", "frames", "height", "width", "input_index"}, ...]}``.

The index (``index.json``)::

    {"format": "megatron-apt-latent-shards", "version": 1,
     "num_samples": int, "latent_channels": C, "text_length": L, "text_dim": D,
     "pooled_dim": P | null, "dtype": "bfloat16", "vae": str, "text_encoder": str,
     "bucket_presets": [str], "num_skipped": int,
     "buckets": {"CxTxHxW": {"latent_shape": [C, T, H, W], "num_samples": n, "num_shards": k}},
     "shards": [{"file": "shards/....safetensors", "bucket": "CxTxHxW",
                 "latent_shape": [C, T, H, W], "num_samples": n, "bytes": b, "sha256": hex}]}

Text is stored padded to a fixed length ``L`` (the text encoder's ``max_length``): every sample
of the data set stacks without re-padding and the model masks the padding.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_apt.utils.paths import contained

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "REPORT_FILE",
    "SHARD_META_KEY",
    "ShardCorruptError",
    "atomic_write_json",
    "bucket_key",
    "load_index",
    "sha256_file",
    "validate_index",
]

FORMAT_NAME = "megatron-apt-latent-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
REPORT_FILE = "report.json"
SHARD_META_KEY = "megatron_apt"
_INDEX_KEYS = ("num_samples", "latent_channels", "text_length", "text_dim", "buckets", "shards")
_SHARD_KEYS = ("file", "bucket", "latent_shape", "num_samples", "bytes", "sha256")


class ShardCorruptError(ValueError):
    """A shard that is missing, truncated, fails its checksum or cannot be parsed."""


def bucket_key(latent_shape: Sequence[int]) -> str:
    """``(C, T, H, W)`` -> ``"CxTxHxW"`` (the bucket's name in the index and in file names)."""
    return "x".join(str(int(s)) for s in latent_shape)


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed in ``chunk_bytes`` pieces (never fully in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary name in the same directory, then ``os.replace`` it: readers
    see either the old file or the complete new one, never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def validate_index(index: dict, source: str | Path = "<index>") -> dict:
    """Check format name, version and required keys; return ``index``. Raises ``ValueError``
    naming ``source`` for another format, another version or a broken layout."""
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise ValueError(f"{source} is not a {FORMAT_NAME} index (format field: {found!r})")
    if index.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{source} has {FORMAT_NAME} version {index.get('version')!r}; this code reads "
            f"version {FORMAT_VERSION} only (re-run tools/preprocess_data.py)"
        )
    missing = [k for k in _INDEX_KEYS if k not in index]
    bad_shards = [
        i for i, s in enumerate(index.get("shards", [])) if any(k not in s for k in _SHARD_KEYS)
    ]
    if missing or bad_shards:
        raise ValueError(
            f"{source}: malformed index (missing keys {missing}, malformed shard entries "
            f"{bad_shards[:5]})"
        )
    for s in index["shards"]:  # relative and inside the data set's directory
        contained(Path(str(source)).parent, s["file"], str(source))
    total = sum(s["num_samples"] for s in index["shards"])
    if total != index["num_samples"]:
        raise ValueError(
            f"{source}: shards hold {total} samples, index says {index['num_samples']}"
        )
    return index


def load_index(path: str | Path) -> tuple[dict, Path]:
    """Read and validate an index; ``path`` is ``index.json`` or its directory.
    Returns ``(index, root)`` where shard ``file`` entries are relative to ``root``."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"latent shard index not found: {path}")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    return validate_index(index, path), path.parent
