"""Data-parallel, deterministic, resumable reader of latent shards.

Epoch plan (the same on every rank, from ``seed`` and the epoch number): per bucket, the sample
ids are shuffled and cut into *global batches* of ``batch_size * dp_size`` samples; the
remainder of each bucket (fewer than a global batch) is **dropped** for that epoch (a different
remainder each epoch since the shuffle changes). The global batches of all buckets are then
shuffled together. At step ``s`` rank ``r`` reads part ``r`` of global batch ``s``: every rank
sees the same bucket (shape) at the same step, and no sample is read twice in an epoch.

Prefetch: a thread pool reads the next ``prefetch`` batches in plan order; results are consumed
in order, so batches do not depend on thread timing. ``state_dict()`` is ``{epoch, position}``
(batches handed out in the epoch) plus the settings that must match on resume.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from megatron_apt.data.format import SHARD_META_KEY, ShardCorruptError, load_index, sha256_file
from megatron_apt.utils.paths import contained

__all__ = ["VERIFY_MODES", "LatentShardReader", "check_compatible"]

VERIFY_MODES = ("lazy", "open", "none")


class LatentShardReader:
    """Micro-batches ``{"latents" [B,C,T,H,W], "text" [B,L,D], "text_mask" [B,L] bool,
    "pooled_text" [B,P] (only if stored), "captions": list[str], "sample_ids" [B] int64}``.

    Args:
        index: ``index.json`` or its directory.
        batch_size: micro-batch size per rank.
        dp_rank, dp_size: this rank in the data-parallel group and the group size.
        seed: shuffling seed (the epoch plan is a function of ``(seed, epoch)``).
        shuffle: False keeps index order (buckets one after another).
        verify: ``"lazy"`` sha256-checks a shard the first time it is read, ``"open"`` checks
            every shard in the constructor, ``"none"`` skips checksums. Sizes and presence of
            all shards are always checked in the constructor.
        prefetch: batches read ahead by ``num_workers`` threads (0: read synchronously).
    """

    def __init__(
        self,
        index: str | Path,
        batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        verify: str = "lazy",
        prefetch: int = 2,
        num_workers: int = 2,
    ) -> None:
        if batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad batch_size={batch_size} / dp_rank={dp_rank} / dp_size={dp_size}")
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.index, self.root = load_index(index)
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.verify = seed, shuffle, verify
        self.prefetch, self.num_workers = prefetch, max(1, num_workers)
        self.shards = self.index["shards"]
        counts = np.array([s["num_samples"] for s in self.shards], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])  # shard i: [off[i], off[i+1])
        self._verified: set[int] = set()
        self._meta: dict[int, list[dict]] = {}
        self._lock = threading.Lock()
        self.epoch, self.position = 0, 0
        self._plan_cache: tuple[int, np.ndarray] | None = None
        self._check_files()
        if verify == "open":
            for i in range(len(self.shards)):
                self._verify(i)

    # ---- files and checks ---------------------------------------------------------------
    def shard_path(self, i: int) -> Path:
        return contained(self.root, self.shards[i]["file"], f"{self.root} index")

    def _check_files(self) -> None:
        for i, s in enumerate(self.shards):
            path = self.shard_path(i)
            if not path.is_file():
                raise ShardCorruptError(f"latent shard {path} listed in the index is missing")
            size = path.stat().st_size
            if size != s["bytes"]:
                raise ShardCorruptError(
                    f"latent shard {path} has {size} bytes, the index records {s['bytes']} "
                    "(truncated or rewritten)"
                )
            self._check_header(i, path)

    def _check_header(self, i: int, path: Path) -> None:
        """The shard's tensors, read from its safetensors header only, against the index: its
        bucket is one of the index's (else it would never be read), its latents are
        ``[num_samples, *latent_shape]``, its text ``[num_samples, text_length, text_dim]``
        and its pooled vectors ``[num_samples, pooled_dim]``. A mismatch used to surface
        later, in a prefetch thread, without naming the shard."""
        s, idx = self.shards[i], self.index
        where = f"latent shard {path} (bucket {s['bucket']})"
        if s["bucket"] not in idx["buckets"]:
            raise ShardCorruptError(
                f"{where}: its bucket is not in the index's buckets {sorted(idx['buckets'])}"
            )
        n = s["num_samples"]
        want = {
            "latents": [n, *s["latent_shape"]],
            "text": [n, idx["text_length"], idx["text_dim"]],
            "text_mask": [n, idx["text_length"]],
        }
        if idx.get("pooled_dim"):
            want["pooled"] = [n, idx["pooled_dim"]]
        try:
            with safe_open(str(path), framework="pt") as h:
                got = {k: list(h.get_slice(k).get_shape()) for k in h.keys()}  # noqa: SIM118
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: an unreadable header
            raise ShardCorruptError(f"{where}: unreadable safetensors header ({e})") from e
        for k, shape in want.items():
            if got.get(k) != shape:
                raise ShardCorruptError(
                    f"{where}: tensor {k!r} has shape {got.get(k)}, the index implies {shape}"
                )

    def _verify(self, i: int) -> None:
        with self._lock:
            if i in self._verified or self.verify == "none":
                return
            path = self.shard_path(i)
            if sha256_file(path) != self.shards[i]["sha256"]:
                raise ShardCorruptError(f"latent shard {path} fails its sha256 check (corrupt)")
            self._verified.add(i)

    def _samples_meta(self, i: int, handle) -> list[dict]:
        if i not in self._meta:
            header = json.loads(handle.metadata()[SHARD_META_KEY])
            self._meta[i] = header["samples"]
        return self._meta[i]

    # ---- epoch plan ---------------------------------------------------------------------
    def _plan(self, epoch: int) -> np.ndarray:
        """Global batches of ``epoch``: ``[steps, dp_size, batch_size]`` sample ids."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        per_global = self.batch_size * self.dp_size
        batches = []
        for key in sorted(self.index["buckets"]):
            ids = np.concatenate(
                [
                    np.arange(self._offsets[i], self._offsets[i + 1])
                    for i in self._bucket_shards(key)
                ]
            )
            ids = rng.permutation(ids) if self.shuffle else ids
            n = len(ids) // per_global
            batches.append(ids[: n * per_global].reshape(n, self.dp_size, self.batch_size))
        plan = np.concatenate(batches) if batches else np.zeros((0, self.dp_size, 1), np.int64)
        plan = plan[rng.permutation(len(plan))] if self.shuffle else plan
        self._plan_cache = (epoch, plan)
        return plan

    def _bucket_shards(self, key: str) -> list[int]:
        return [i for i, s in enumerate(self.shards) if s["bucket"] == key]

    def bucket_sizes(self) -> dict[str, int]:
        """Samples per bucket (shape key)."""
        return {
            key: int(sum(self._offsets[i + 1] - self._offsets[i] for i in self._bucket_shards(key)))
            for key in sorted(self.index["buckets"])
        }

    def __len__(self) -> int:
        """Micro-batches per epoch (the same on every rank)."""
        return len(self._plan(self.epoch))

    # ---- reading ------------------------------------------------------------------------
    def read_samples(self, ids: np.ndarray | list[int]) -> dict:
        """Read samples by global id (all of one bucket) into a batch dict. Each shard is
        opened once per call and only the rows asked for are read (safetensors slices)."""
        ids = np.asarray(ids, dtype=np.int64)
        shard_of = np.searchsorted(self._offsets, ids, side="right") - 1
        rows: dict[str, list] = {"latents": [], "text": [], "text_mask": [], "pooled": []}
        captions = []
        with ExitStack() as stack:
            handles: dict[int, object] = {}
            for sid, shard in zip(ids.tolist(), shard_of.tolist()):
                if shard not in handles:
                    handles[shard] = stack.enter_context(self._open(shard))
                row = sid - int(self._offsets[shard])
                captions.append(self._read_row(shard, handles[shard], row, rows))
        shapes = {tuple(t.shape[1:]) for t in rows["latents"]}
        if len(shapes) > 1:
            raise ValueError(f"samples {ids.tolist()} span several buckets: {sorted(shapes)}")
        batch = {k: torch.cat(v) for k, v in rows.items() if v}
        if "pooled" in batch:
            batch["pooled_text"] = batch.pop("pooled")
        batch["captions"] = captions
        batch["sample_ids"] = torch.from_numpy(ids.copy())
        return batch

    @contextmanager
    def _open(self, shard: int) -> Iterator:
        """``safe_open`` handle of a shard (checksum first when ``verify="lazy"``); any
        failure to parse or read it becomes a :class:`ShardCorruptError` naming the file."""
        if self.verify == "lazy":
            self._verify(shard)
        path = self.shard_path(shard)
        try:
            with safe_open(str(path), framework="pt") as f:
                yield f
        except (ShardCorruptError, GeneratorExit):
            raise
        except Exception as err:  # safetensors raises its own error types
            raise ShardCorruptError(f"cannot read latent shard {path}: {err}") from err

    def _read_row(self, shard: int, f, row: int, out: dict[str, list]) -> str:
        """Append row ``row`` of an open shard (``[1, ...]`` tensors) to ``out``; return its
        caption."""
        try:
            for name in f.keys():
                out[name].append(f.get_slice(name)[row : row + 1])
            return self._samples_meta(shard, f)[row]["caption"]
        except Exception as err:
            raise ShardCorruptError(
                f"cannot read latent shard {self.shard_path(shard)}: {err}"
            ) from err

    def _read_step(self, epoch: int, step: int) -> dict:
        return self.read_samples(self._plan(epoch)[step, self.dp_rank])

    def __iter__(self) -> Iterator[dict]:
        """The remaining micro-batches of the current epoch; at its end the reader moves to the
        next epoch at position 0 (iterate again for the next epoch)."""
        epoch, start = self.epoch, self.position
        steps = len(self._plan(epoch))
        if self.prefetch <= 0:
            for step in range(start, steps):
                batch = self._read_step(epoch, step)
                self.position = step + 1
                yield batch
        else:
            yield from self._iter_prefetch(epoch, start, steps)
        self.epoch, self.position = epoch + 1, 0

    def _iter_prefetch(self, epoch: int, start: int, steps: int) -> Iterator[dict]:
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="latent-reader") as pool:
            pending: deque = deque()
            nxt = start
            for step in range(start, steps):
                while nxt < steps and len(pending) <= self.prefetch:
                    pending.append(pool.submit(self._read_step, epoch, nxt))
                    nxt += 1
                batch = pending.popleft().result()
                self.position = step + 1
                yield batch

    # ---- resume -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able position: ``epoch``, ``position`` (micro-batches handed out in the
        epoch; an epoch read to its end is reported as the next epoch at position 0) and the
        settings that must match when loading."""
        epoch, position = self.epoch, self.position
        if position >= len(self._plan(epoch)):
            epoch, position = epoch + 1, 0
        return {
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "dp_size": self.dp_size,
            "num_samples": self.index["num_samples"],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict`); the next batch is the one the
        saving reader would have given next."""
        for key in ("seed", "batch_size", "dp_size", "num_samples"):
            mine = self.index["num_samples"] if key == "num_samples" else getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(
                    f"reader state has {key}={state.get(key)!r} but this reader has {mine!r}; "
                    "resume with the same data set, seed, batch size and data-parallel size"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if not 0 <= self.position <= len(self._plan(self.epoch)):
            raise ValueError(f"reader state position {self.position} is outside the epoch")

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self.epoch, self.position = int(epoch), 0


def check_compatible(
    data: LatentShardReader | dict | str | os.PathLike,
    in_channels: int,
    text_dim: int,
    pooled_text_dim: int | None = None,
) -> None:
    """Raise ``ValueError`` (naming the shard, its bucket and both values) when the data set
    does not fit a model with ``in_channels`` latent channels and ``text_dim`` text width,
    or lacks the pooled text a model with ``pooled_text_dim`` needs. Call before training."""
    if isinstance(data, LatentShardReader):
        index, root = data.index, data.root
    elif isinstance(data, dict):
        index, root = data, Path("<index>")
    else:
        index, root = load_index(data)
    for s in index["shards"]:
        where = f"latent shard {root / s['file']} (bucket {s['bucket']})"
        if s["latent_shape"][0] != in_channels:
            raise ValueError(
                f"{where} has {s['latent_shape'][0]} latent channels but the model takes "
                f"in_channels={in_channels} (wrong VAE for this model?)"
            )
    if index["text_dim"] != text_dim:
        raise ValueError(
            f"latent shard index in {root} has text_dim={index['text_dim']} but the model takes "
            f"text_dim={text_dim} (wrong text encoder for this model?)"
        )
    if pooled_text_dim and index.get("pooled_dim") != pooled_text_dim:
        raise ValueError(
            f"the model needs pooled text of width {pooled_text_dim}; the data in {root} has "
            f"pooled_dim={index.get('pooled_dim')}"
        )
