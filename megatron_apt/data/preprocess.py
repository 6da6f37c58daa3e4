"""Captioned images and videos -> latent shards (VAE latents + text embeddings), resumable and
split over ranks.

Work is cut into *units* of ``samples_per_shard`` consecutive inputs (inputs sorted by path);
unit ``k`` belongs to rank ``k % world_size``. A unit writes one shard per bucket it touches
(``shards/u{k:06d}-{bucket}.safetensors``, each written to a temporary name and renamed) and
then its record ``units/u{k:06d}.json`` (atomically): a unit is done exactly when its record
exists, matches the run's settings and inputs, and its shards have the recorded sizes; a re-run
skips done units. After a barrier rank 0 merges the records into ``index.json`` and
``report.json`` (skipped inputs with path and reason), but only when every unit is done. The
shards do not depend on the number of ranks: 1 rank and N ranks write the same files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megatron_apt.data.buckets import (
    BucketPreset,
    choose_preset,
    get_preset,
    resize_center_crop,
    sample_frame_indices,
)
from megatron_apt.data.format import INDEX_FILE, REPORT_FILE, atomic_write_json, bucket_key
from megatron_apt.data.media import MediaError, MediaItem, list_inputs, media_kind, read_frames
from megatron_apt.data.media import video_fps as read_fps
from megatron_apt.data.writer import build_index, write_index, write_shard
from megatron_apt.utils.paths import contained

__all__ = ["DTYPES", "PreprocessConfig", "load_item", "preprocess"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True)
class PreprocessConfig:
    """Settings of one preprocessing run (the CLI flags of ``tools/preprocess_data.py``).

    ``vae``: a ``load_vae`` spec (``identity``, a local diffusers directory ...);
    ``text_encoder``: a local T5, SD3 or Wan pipeline directory; ``max_text_length``: ``L`` of
    the stored T5 / umT5 text (fixed padding; SD3 adds its CLIP context; the CLI passes the
    encoder's own, 512 for Wan, when no flag is given); ``dtype``: storage dtype of
    latents and text embeddings;
    ``max_shards``: debug limit, stop after this many units per rank in this run;
    ``num_workers``: threads decoding and resizing media ahead of the encoders;
    ``first_frame``: a video gives its first frame as an image (image buckets; the image
    stage of a video model trained on stills of its clips);
    ``negative_prompt``: the text embedded as the consistency teacher's unconditional branch
    (None: ``megatron_apt.text.DEFAULT_NEGATIVE_PROMPT``)."""

    input: str
    output: str
    buckets: list[str] = field(default_factory=lambda: ["image-32", "video-32"])
    vae: str = "identity"
    text_encoder: str = ""
    batch_size: int = 8
    samples_per_shard: int = 64
    max_text_length: int = 256
    dtype: str = "bfloat16"
    device: str = "cpu"
    resume: bool = True
    max_shards: int | None = None
    num_workers: int = 4
    progress: bool = True
    first_frame: bool = False
    negative_prompt: str | None = None

    def fingerprint(self, items: Sequence[MediaItem]) -> str:
        """Hash of everything that determines a unit's shards: the settings, the inputs, and
        the *contents* of the VAE and text encoder (:func:`component_digest`): another model
        swapped in at the same path must not be mixed into one data set."""
        keys = ("buckets", "vae", "text_encoder", "max_text_length", "dtype", "samples_per_shard")
        settings = {k: getattr(self, k) for k in keys}
        if self.first_frame:  # only when set: the units of earlier runs stay done
            settings["first_frame"] = True
        models = {k: component_digest(getattr(self, k)) for k in ("vae", "text_encoder")}
        blob = json.dumps([settings, models, [asdict(i) for i in items]])
        return hashlib.sha256(blob.encode()).hexdigest()


SMALL_FILE = 1 << 20  # files up to this size (configs, tokenizers) are hashed in full


@functools.lru_cache(maxsize=16)
def component_digest(spec: str) -> str:
    """What identifies a model given by ``spec`` (a local file or directory; anything else,
    e.g. ``identity``, stands for itself): every file's relative name and size, and the full
    contents of the small ones (config.json, tokenizer files). Weights are not read in full
    (gigabytes): a model with another config, tokenizer or weight layout differs; so does
    one retrained to other weights of the same sizes only through its config."""
    path = Path(spec) if spec else None
    if path is None or not path.exists():
        return hashlib.sha256(spec.encode()).hexdigest()
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if f != path else f.name}:{size}\n".encode())
        if size <= SMALL_FILE:
            h.update(f.read_bytes())
    return h.hexdigest()


def load_item(
    item: MediaItem, presets: Sequence[BucketPreset], first_frame: bool = False
) -> tuple[np.ndarray, BucketPreset, dict]:
    """Read one input and fit it to its bucket preset: ``(pixels uint8 [T, H, W, 3], preset,
    sample metadata)``; with ``first_frame`` a video is read as the image of its first frame.
    Raises :class:`MediaError` (unreadable) or ``ValueError`` (no bucket for it, video too
    short)."""
    kind = media_kind(item.path)
    if first_frame and kind == "video":
        kind = "image"  # read_frames(max_frames=1) below decodes the first frame only
    fps = read_fps(item.path) if kind == "video" else None
    need = max((_frames_needed(p, fps) for p in presets if p.kind == kind), default=1)
    frames = read_frames(item.path, max_frames=need)  # [T, h, w, 3]
    src_h, src_w = frames.shape[1:3]
    preset = choose_preset(presets, kind, src_w, src_h)
    if preset is None:
        raise ValueError(f"no {kind} bucket among {[p.name for p in presets]}")
    idx = sample_frame_indices(len(frames), fps, preset)
    if idx is None:
        raise ValueError(f"too short for {preset.name}: {len(frames)} frames at {fps} fps")
    pixels = resize_center_crop(frames[idx], preset.width, preset.height)
    meta = {"caption": item.caption, "source": item.path, "fps": preset.fps}
    meta.update(frames=preset.frames, height=preset.height, width=preset.width)
    meta.update(source_height=int(src_h), source_width=int(src_w))
    return pixels, preset, meta


def _frames_needed(preset: BucketPreset, fps: float | None) -> int:
    if preset.frames == 1:
        return 1
    return int(round((preset.frames - 1) * (fps or preset.fps) / preset.fps)) + 1


class _UnitWork:
    """Encodes the inputs of one unit and accumulates per-bucket tensors."""

    def __init__(self, cfg: PreprocessConfig, vae, text_encoder, presets) -> None:
        self.cfg, self.vae, self.enc, self.presets = cfg, vae, text_encoder, presets
        self.dtype = DTYPES[cfg.dtype]
        self.acc: dict[str, dict[str, list]] = {}
        self.skipped: list[dict] = []
        self.pooled_dim: int | None = None

    def add_batch(self, loaded: Sequence[tuple[int, MediaItem, tuple | str]]) -> None:
        """Encode one batch of ``(input_index, item, load_item result or error text)``."""
        groups: dict[str, list] = {}
        for index, item, result in loaded:
            if isinstance(result, str):
                self.skipped.append({"path": item.path, "reason": result})
                continue
            pixels, preset, meta = result
            meta["input_index"] = index
            groups.setdefault(preset.name, []).append((pixels, meta))
        for group in groups.values():
            self._encode(group)

    @torch.no_grad()
    def _encode(self, group: list) -> None:
        pixels = torch.stack([torch.from_numpy(p) for p, _ in group])  # [B, T, H, W, 3] uint8
        pixels = pixels.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # [B, 3, T, H, W]
        latents = self.vae.encode(pixels).cpu()  # [B, C, T', H', W']
        emb = self.enc.encode([m["caption"] for _, m in group])
        acc = self.acc.setdefault(bucket_key(latents.shape[1:]), {})
        tensors = {"latents": latents, "text": emb.text, "text_mask": emb.text_mask}
        if emb.pooled is not None:
            tensors["pooled"] = emb.pooled
            self.pooled_dim = int(emb.pooled.shape[1])
        for name, t in tensors.items():
            t = t.cpu() if name == "text_mask" else t.to("cpu", self.dtype)
            acc.setdefault(name, []).append(t)
        acc.setdefault("samples", []).extend(m for _, m in group)

    def write(self, root: Path, unit: int) -> list[dict]:
        records = []
        for key in sorted(self.acc):
            acc = self.acc[key]
            cat = {k: torch.cat(v) for k, v in acc.items() if k != "samples"}
            path = root / "shards" / f"u{unit:06d}-{key}.safetensors"
            rec = write_shard(path, samples=acc["samples"], **_shard_args(cat))
            records.append({**rec, "file": f"shards/{rec['file']}"})
        return records


def _shard_args(cat: dict[str, torch.Tensor]) -> dict:
    return {
        "latents": cat["latents"],
        "text": cat["text"],
        "text_mask": cat["text_mask"],
        "pooled": cat.get("pooled"),
    }


def _unit_done(root: Path, unit: int, fingerprint: str) -> dict | None:
    """The unit's record if the unit is complete with these settings, else None."""
    path = root / "units" / f"u{unit:06d}.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("fingerprint") != fingerprint:
        return None
    for s in rec["shards"]:
        try:
            shard = contained(root, s.get("file"), str(path))
        except ValueError:
            return None  # not a record of ours: the unit is redone
        if not shard.is_file() or shard.stat().st_size != s["bytes"]:
            return None
    return rec


def _try_load(
    item: MediaItem, presets: Sequence[BucketPreset], first_frame: bool = False
) -> tuple | str:
    """``load_item``'s result, or the reason the input is skipped."""
    try:
        return load_item(item, presets, first_frame)
    except (MediaError, ValueError) as err:
        return str(err)


def _loaded_batches(
    items, first: int, presets, batch_size: int, pool: ThreadPoolExecutor, first_frame=False
):
    """Batches of ``batch_size`` consecutive ``(input_index, item, _try_load result)``, in
    input order; decoding runs in ``pool`` up to two batches ahead of the consumer."""
    todo = iter(enumerate(items))
    pending: deque = deque()

    def submit(count: int) -> None:
        for n, item in islice(todo, count):
            pending.append((first + n, item, pool.submit(_try_load, item, presets, first_frame)))

    submit(2 * batch_size)
    batch: list = []
    while pending:
        index, item, future = pending.popleft()
        submit(1)
        batch.append((index, item, future.result()))
        if len(batch) == batch_size or not pending:
            yield batch
            batch = []


def _run_unit(cfg, root, unit, items, first, vae, enc, presets, fingerprint) -> dict:
    work = _UnitWork(cfg, vae, enc, presets)
    with ThreadPoolExecutor(max(1, cfg.num_workers), thread_name_prefix="decode") as pool:
        batches = _loaded_batches(items, first, presets, cfg.batch_size, pool, cfg.first_frame)
        for batch in batches:
            work.add_batch(batch)
    record = {
        "unit": unit,
        "fingerprint": fingerprint,
        "num_inputs": len(items),
        "shards": work.write(root, unit),
        "skipped": work.skipped,
        "text_length": int(getattr(enc, "text_length", cfg.max_text_length)),
        "text_dim": int(enc.dim),
        "pooled_dim": work.pooled_dim,
    }
    atomic_write_json(root / "units" / f"u{unit:06d}.json", record)
    return record


def preprocess(
    cfg: PreprocessConfig,
    vae,
    text_encoder,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
) -> dict | None:
    """Run this rank's units (see the module docstring), then (rank 0, after ``barrier``)
    write the index and report. Returns the index on rank 0 when the data set is complete,
    else None. ``vae``/``text_encoder``: objects with the ``megatron_apt.vae`` /
    ``megatron_apt.text`` interfaces."""
    if cfg.batch_size < 1 or cfg.samples_per_shard < 1:
        raise ValueError(f"batch_size and samples_per_shard must be >= 1: {cfg}")
    presets = [get_preset(b) for b in cfg.buckets]
    _check_presets_fit(presets, vae)
    root = Path(cfg.output)
    for sub in ("shards", "units"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    items, listing_skipped = list_inputs(cfg.input)
    per = cfg.samples_per_shard
    units = [items[i : i + per] for i in range(0, len(items), per)]
    if rank == 0:
        _drop_stale_index(cfg, root, units)
    mine = list(range(rank, len(units), world_size))
    done = ran = 0
    for unit in tqdm(mine, desc="preprocess", disable=rank != 0 or not cfg.progress):
        fingerprint = cfg.fingerprint(units[unit])
        if cfg.resume and _unit_done(root, unit, fingerprint):
            done += 1
            continue
        if cfg.max_shards is not None and ran >= cfg.max_shards:
            break
        first = unit * cfg.samples_per_shard
        _run_unit(cfg, root, unit, units[unit], first, vae, text_encoder, presets, fingerprint)
        ran += 1
    print(f"preprocess: rank {rank}: {ran} units written, {done} already done", file=sys.stderr)
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    write_negative_prompt(root, text_encoder, cfg.negative_prompt)
    return _finish(cfg, root, units, listing_skipped)


NEGATIVE_PROMPT_FILE = "negative_prompt.safetensors"


def write_negative_prompt(root: Path, text_encoder, prompt: str | None = None) -> Path:
    """Embed the negative prompt once (``text [1, L, D]``, ``text_mask [1, L]``, and
    ``pooled_text [1, P]`` when the encoder has one) next to the shards: the consistency stage's
    classifier-free guidance uses it as the unconditional branch. ``prompt`` None: the fixed
    ``DEFAULT_NEGATIVE_PROMPT``; the text is stored in the file's metadata."""
    from safetensors.torch import save_file

    from megatron_apt.text import DEFAULT_NEGATIVE_PROMPT, embed_negative_prompt

    prompt = DEFAULT_NEGATIVE_PROMPT if prompt is None else prompt
    emb = embed_negative_prompt(text_encoder, prompt)
    tensors = {"text": emb.text.float().cpu().contiguous(), "text_mask": emb.text_mask.cpu()}
    if emb.pooled is not None:
        tensors["pooled_text"] = emb.pooled.float().cpu().contiguous()
    path = Path(root) / NEGATIVE_PROMPT_FILE
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"prompt": prompt})
    tmp.replace(path)
    return path


def _drop_stale_index(cfg: PreprocessConfig, root: Path, units: list) -> None:
    """Remove an index of an earlier run when this run has work left: shards are about to be
    rewritten, and an index is only valid for a complete data set."""
    if any(
        not (cfg.resume and _unit_done(root, k, cfg.fingerprint(u))) for k, u in enumerate(units)
    ):
        (root / INDEX_FILE).unlink(missing_ok=True)


def _check_presets_fit(presets: Sequence[BucketPreset], vae) -> None:
    """Fail before any work when the VAE cannot encode a preset's pixel shape."""
    for p in presets:
        try:
            vae.latent_shape(p.frames, p.height, p.width)
        except ValueError as err:
            raise ValueError(
                f"bucket {p.name} ({p.width}x{p.height}, {p.frames} frames) does not fit the "
                f"VAE: {err}"
            ) from err


def _finish(cfg, root: Path, units: list, listing_skipped: list[dict]) -> dict | None:
    """Rank 0: merge unit records into index.json + report.json when all units are done."""
    records = [_unit_done(root, k, cfg.fingerprint(u)) for k, u in enumerate(units)]
    missing = [k for k, r in enumerate(records) if r is None]
    if missing:
        print(
            f"preprocess: {len(units) - len(missing)}/{len(units)} units done; no index written "
            f"(re-run the same command to resume)",
            file=sys.stderr,
        )
        return None
    for tmp in (root / "shards").glob(".*.tmp-*"):  # leftovers of killed runs
        tmp.unlink(missing_ok=True)
    skipped = listing_skipped + [s for r in records for s in r["skipped"]]
    shards = [s for r in records for s in r["shards"]]
    text_length = records[0]["text_length"] if records else cfg.max_text_length
    text_dim = records[0]["text_dim"] if records else 0
    pooled_dims = {r["pooled_dim"] for r in records if r["shards"]}
    index = build_index(
        shards,
        text_length=text_length,
        text_dim=text_dim,
        pooled_dim=pooled_dims.pop() if len(pooled_dims) == 1 else None,
        dtype=cfg.dtype,
        vae=cfg.vae,
        text_encoder=cfg.text_encoder,
        bucket_presets=list(cfg.buckets),
        num_skipped=len(skipped),
    )
    report = {"num_inputs": sum(len(u) for u in units), "num_samples": index["num_samples"]}
    report.update(num_shards=len(shards), num_skipped=len(skipped), skipped=skipped)
    atomic_write_json(root / REPORT_FILE, report)
    write_index(root, index)
    _print_summary(root, index, skipped)
    return index


def _print_summary(root: Path, index: dict, skipped: list[dict]) -> None:
    for s in skipped[:20]:
        print(f"preprocess: skipped {s['path']}: {s['reason']}", file=sys.stderr)
    print(
        f"preprocess: {index['num_samples']} samples in {len(index['shards'])} shards "
        f"({', '.join(index['buckets'])}), {len(skipped)} inputs skipped "
        f"(list: {root / REPORT_FILE}); index: {root / 'index.json'}",
        file=sys.stderr,
    )
