"""Micro-batch streams for training: latent shards or synthetic latents made on the fly.

Sample positions in the global data stream are counted by draws (one micro-batch per DP rank
per draw): the sample at slot k of rank r in draw d has position
``d * micro * dp + r * micro + k``. Positions seed the per-sample random numbers (noise,
timesteps) of the training steps, so they do not depend on the batch split; TP peers of a DP
rank get identical micro-batches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from megatron_apt.config.training import TrainConfig
from megatron_apt.data.format import INDEX_FILE


class SyntheticLatents:
    """A small conditional data set, generated from the sample index: 4 classes, each a fixed
    random latent pattern (plus 10 % noise) with a fixed text embedding; every other sample
    masks its last text token. Deterministic in ``seed``; no files."""

    def __init__(self, cfg: TrainConfig, seed: int):
        d, m = cfg.data, cfg.model
        self.n, self.seed = d.num_samples, seed
        self.shape = (m.in_channels, d.frames, d.height, d.width)
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(4, *self.shape, generator=g)
        self.texts = torch.randn(4, d.text_len, m.text_dim, generator=g)
        self.pooled = torch.randn(4, m.pooled_text_dim, generator=g) if m.pooled_text_dim else None

    def __len__(self) -> int:
        return self.n

    def item(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7_368_787 + i)
        k = i % 4
        mask = torch.ones(self.texts.shape[1], dtype=torch.bool)
        if i % 2:
            mask[-1] = False
        out = {
            "latents": self.patterns[k] + 0.1 * torch.randn(self.shape, generator=g),
            "text": self.texts[k] * mask[:, None],
            "text_mask": mask,
        }
        if self.pooled is not None:
            out["pooled_text"] = self.pooled[k]
        return out


class SyntheticStream:
    """Epoch-shuffled, DP-sharded micro-batches of :class:`SyntheticLatents`; stateless in
    the draw counter (the trainer checkpoints ``draws``)."""

    def __init__(self, cfg: TrainConfig, micro: int, dp_rank: int, dp_size: int):
        self.data = SyntheticLatents(cfg, cfg.seed)
        self.cfg_data = cfg.data
        self.micro, self.dp_rank, self.dp_size, self.seed = micro, dp_rank, dp_size, cfg.seed
        self.draws = 0

    def positions(self, draw: int, rank: int | None = None) -> list[int]:
        r = self.dp_rank if rank is None else rank
        base = draw * self.micro * self.dp_size + r * self.micro
        return list(range(base, base + self.micro))

    def sample_index(self, pos: int) -> int:
        n = len(self.data)
        epoch, k = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(perm[k])

    def next(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        pos = self.positions(self.draws)
        self.draws += 1
        items = [self.data.item(self.sample_index(p)) for p in pos]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        return batch, pos

    def source(self) -> dict:
        d = self.cfg_data
        return {"kind": "synthetic", "num_samples": d.num_samples, "seed": self.seed}

    def state_dict(self) -> dict:
        return {"draws": self.draws, "source": self.source()}

    def load_state_dict(self, state: dict) -> None:
        check_source(state, self.source())
        self.draws = int(state["draws"])


class ShardStream:
    """Micro-batches from latent shards (``tools/preprocess_data.py``) through
    :class:`~megatron_apt.data.reader.LatentShardReader`, epochs chained."""

    def __init__(self, cfg: TrainConfig, micro: int, dp_rank: int, dp_size: int):
        from megatron_apt.data.reader import LatentShardReader, check_compatible

        self.reader = LatentShardReader(
            cfg.data.path, batch_size=micro, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed
        )
        check_compatible(
            self.reader, cfg.model.in_channels, cfg.model.text_dim, cfg.model.pooled_text_dim
        )
        self.micro, self.dp_rank, self.dp_size = micro, dp_rank, dp_size
        index_file = self.reader.root / INDEX_FILE
        self.index_sha256 = hashlib.sha256(index_file.read_bytes()).hexdigest()
        # one step reads micro x DP samples of one bucket; a bucket with fewer is never read,
        # and a data set without any such bucket has no step at all: say so now, not with a
        # bare StopIteration after the engines are built
        need, sizes = micro * dp_size, self.reader.bucket_sizes()
        self.dropped = {k: n for k, n in sizes.items() if n < need}
        if len(self.reader) == 0:
            raise ValueError(
                f"--data-path {cfg.data.path}: {sum(sizes.values())} samples in {len(sizes)} "
                f"bucket(s) {sizes}, but a step reads {need} samples of one bucket (micro "
                f"{micro} x DP {dp_size}): no step fits; add data or lower --micro-batch-size"
            )
        self.draws = 0
        self._it = iter(self.reader)

    def next(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        try:
            batch = next(self._it)
        except StopIteration:  # the reader has moved to the next epoch itself
            self._it = iter(self.reader)
            batch = next(self._it)
        base = self.draws * self.micro * self.dp_size + self.dp_rank * self.micro
        self.draws += 1
        keep = ("latents", "text", "text_mask", "pooled_text")
        return {k: v for k, v in batch.items() if k in keep}, list(range(base, base + self.micro))

    def source(self) -> dict:
        return {"kind": "shards", "index_sha256": self.index_sha256}

    def state_dict(self) -> dict:
        return {"draws": self.draws, "reader": self.reader.state_dict(), "source": self.source()}

    def load_state_dict(self, state: dict) -> None:
        check_source(state, self.source())
        self.draws = int(state["draws"])
        self.reader.load_state_dict(state["reader"])
        self._it = iter(self.reader)


def check_source(state: dict, mine: dict) -> None:
    """A checkpoint's data stream must be this run's: the same kind (synthetic / shards) and,
    for shards, the same index (its sha256), for synthetic data the same size and seed.
    Checkpoints of earlier versions name no source: their kind is told by the reader state."""
    saved = state.get("source") or {"kind": "shards" if "reader" in state else "synthetic"}
    if saved.get("kind") != mine["kind"]:
        how = {"shards": "--data-path (latent shards)", "synthetic": "synthetic data"}
        raise ValueError(
            f"the checkpoint's data stream read {how.get(saved.get('kind'), saved.get('kind'))}, "
            f"this run reads {how[mine['kind']]}: resume with the same data source"
        )
    for key, value in mine.items():
        if key in saved and saved[key] != value:
            raise ValueError(
                f"the checkpoint's data stream has {key}={saved[key]!r}, this run's "
                f"{value!r}: resume with the same data set"
            )


def build_stream(cfg: TrainConfig, micro: int, dp_rank: int, dp_size: int):
    if cfg.data.path:
        return ShardStream(cfg, micro, dp_rank, dp_size)
    return SyntheticStream(cfg, micro, dp_rank, dp_size)


HOST_KEYS = ("text_mask",)  # batch entries the trainer keeps on the host (Trainer._next)


def load_negative_prompt(cfg: TrainConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """The teacher's unconditional branch: the negative prompt embedded by
    tools/preprocess_data.py next to the shards (with its pooled vector for SD3-style models),
    or one zero token without shards."""
    from safetensors.torch import load_file

    from megatron_apt.data.preprocess import NEGATIVE_PROMPT_FILE

    path = Path(cfg.data.path or "") / NEGATIVE_PROMPT_FILE
    if cfg.data.path and path.is_file():
        emb = load_file(str(path))
        if emb["text"].shape[-1] != cfg.model.text_dim:
            raise ValueError(
                f"{path}: text width {emb['text'].shape[-1]} but the model "
                f"takes text_dim={cfg.model.text_dim}"
            )
    else:
        emb = {
            "text": torch.zeros(1, 1, cfg.model.text_dim),
            "text_mask": torch.ones(1, 1, dtype=torch.bool),
        }
    if cfg.model.pooled_text_dim and "pooled_text" not in emb:
        emb["pooled_text"] = torch.zeros(1, cfg.model.pooled_text_dim)
    # the mask stays on the host like the batches' (HOST_KEYS): the model reads it there
    return {k: v if k in HOST_KEYS else v.to(device) for k, v in emb.items()}
