"""Latent shard format and reader: round trip, data-parallel split, determinism, exact resume,
prefetch, corruption detection and the model-compatibility check (one process)."""

import json

import numpy as np
import pytest
import torch

from megatron_apt.data import (
    FORMAT_VERSION,
    LatentShardReader,
    ShardCorruptError,
    build_index,
    check_compatible,
    load_index,
    write_index,
    write_shard,
)

L, D = 5, 8


def make_dataset(root, buckets, per_shard=4, pooled_dim=None, seed=0):
    """Shards of random samples; caption ``s{n}`` where n is the write order. Returns the
    written tensors by caption."""
    g = torch.Generator().manual_seed(seed)
    (root / "shards").mkdir(parents=True)
    records, written, n = [], {}, 0
    for shape, count in buckets.items():
        for start in range(0, count, per_shard):
            k = min(per_shard, count - start)
            t = {
                "latents": torch.randn(k, *shape, generator=g),
                "text": torch.randn(k, L, D, generator=g),
                "text_mask": torch.rand(k, L, generator=g) > 0.3,
                "pooled": torch.randn(k, pooled_dim, generator=g) if pooled_dim else None,
            }
            samples = [{"caption": f"s{n + i}", "source": f"src{n + i}"} for i in range(k)]
            for i, s in enumerate(samples):
                written[s["caption"]] = {name: v[i] for name, v in t.items() if v is not None}
            path = root / "shards" / f"{len(records):04d}.safetensors"
            rec = write_shard(path, samples=samples, **t)
            records.append({**rec, "file": f"shards/{rec['file']}"})
            n += k
    write_index(root, build_index(records, text_length=L, text_dim=D, pooled_dim=pooled_dim))
    return written


@pytest.fixture
def data(tmp_path):
    written = make_dataset(tmp_path, {(4, 1, 4, 4): 12, (4, 3, 2, 2): 8})
    return tmp_path, written


def epoch_ids(reader):
    return [b["sample_ids"].tolist() for b in reader]


def test_round_trip_exact(data):
    root, written = data
    reader = LatentShardReader(root, batch_size=1, shuffle=False, prefetch=0)
    batches = list(reader)
    assert len(batches) == 20 and reader.state_dict()["epoch"] == 1
    for b in batches:
        want = written[b["captions"][0]]
        assert torch.equal(b["latents"][0], want["latents"])
        assert torch.equal(b["text"][0], want["text"])
        assert b["text_mask"].dtype == torch.bool and torch.equal(
            b["text_mask"][0], want["text_mask"]
        )
        assert "pooled_text" not in b


def test_pooled_is_returned(tmp_path):
    written = make_dataset(tmp_path, {(4, 1, 2, 2): 4}, pooled_dim=6)
    b = next(iter(LatentShardReader(tmp_path, batch_size=2)))
    assert b["pooled_text"].shape == (2, 6)
    assert torch.equal(b["pooled_text"][0], written[b["captions"][0]]["pooled"])
    assert load_index(tmp_path)[0]["pooled_dim"] == 6


def test_dp_ranks_read_every_sample_once_with_one_bucket_per_step(data):
    root, _ = data
    readers = [LatentShardReader(root, 2, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for _ in range(2):  # two epochs
        per_rank = [list(r) for r in readers]
        assert len(per_rank[0]) == len(per_rank[1]) == 5
        ids = [i for batches in per_rank for b in batches for i in b["sample_ids"].tolist()]
        assert sorted(ids) == list(range(20))
        for b0, b1 in zip(*per_rank):  # same bucket (shape) on both ranks at every step
            assert b0["latents"].shape == b1["latents"].shape
            assert b0["latents"].shape[0] == 2


def test_remainder_of_each_bucket_is_dropped(tmp_path):
    make_dataset(tmp_path, {(4, 1, 2, 2): 10, (4, 2, 2, 2): 7})
    readers = [LatentShardReader(tmp_path, 2, dp_rank=r, dp_size=2) for r in range(2)]
    seen_per_epoch = []
    for _ in range(3):
        ids = [i for r in readers for b in r for i in b["sample_ids"].tolist()]
        assert len(ids) == len(set(ids)) == 4 * (10 // 4 + 7 // 4)
        seen_per_epoch.append(frozenset(ids))
    assert len(set(seen_per_epoch)) > 1  # the dropped samples change with the epoch


def test_order_is_deterministic_per_seed_and_epoch(data):
    root, _ = data
    a, b = (LatentShardReader(root, 2, seed=7) for _ in range(2))
    first = epoch_ids(a)
    assert first == epoch_ids(b)
    assert epoch_ids(a) != first  # epoch 1 reshuffles
    assert epoch_ids(LatentShardReader(root, 2, seed=8)) != first
    unshuffled = epoch_ids(LatentShardReader(root, 2, shuffle=False))
    assert [i for b in unshuffled for i in b] == list(range(20))


def test_prefetch_gives_the_same_batches(data):
    root, _ = data
    sync = epoch_ids(LatentShardReader(root, 2, seed=1, prefetch=0))
    assert epoch_ids(LatentShardReader(root, 2, seed=1, prefetch=4, num_workers=3)) == sync


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_resume_from_mid_epoch_state(data, k):
    root, _ = data
    full = LatentShardReader(root, 2, dp_rank=1, dp_size=2, seed=5)
    expected = epoch_ids(full) + epoch_ids(full)  # two uninterrupted epochs
    first = LatentShardReader(root, 2, dp_rank=1, dp_size=2, seed=5, prefetch=3)
    it = iter(first)
    got = [next(it)["sample_ids"].tolist() for _ in range(k)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["position"] == k % 5 and state["epoch"] == k // 5
    resumed = LatentShardReader(root, 2, dp_rank=1, dp_size=2, seed=5)
    resumed.load_state_dict(state)
    got += epoch_ids(resumed)
    if len(got) < len(expected):
        got += epoch_ids(resumed)
    assert got == expected


def test_load_state_with_other_settings_is_an_error(data):
    root, _ = data
    state = LatentShardReader(root, 2).state_dict()
    with pytest.raises(ValueError, match="batch_size=2.*has 4"):
        LatentShardReader(root, 4).load_state_dict(state)


def _shard(root, i=0):
    index, _ = load_index(root)
    return root / index["shards"][i]["file"]


def test_flipped_bytes_are_detected_and_named(data):
    root, _ = data
    path = _shard(root, 1)
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0xFF  # inside the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardCorruptError, match=f"{path}.*sha256"):
        LatentShardReader(root, 2, verify="open")
    reader = LatentShardReader(root, 1, shuffle=False, verify="lazy")
    with pytest.raises(ShardCorruptError, match=str(path)):
        list(reader)


def test_truncated_and_missing_shards_are_named(data):
    root, _ = data
    path = _shard(root, 2)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ShardCorruptError, match=f"{path}.*truncated"):
        LatentShardReader(root, 2, verify="none")
    path.unlink()
    with pytest.raises(ShardCorruptError, match=f"{path}.*missing"):
        LatentShardReader(root, 2)


def test_corrupt_header_is_named_without_checksums(data):
    root, _ = data
    path = _shard(root, 0)
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"\x00\x00\x00\x00"  # break the JSON header
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardCorruptError, match=str(path)):
        list(LatentShardReader(root, 1, shuffle=False, verify="none", prefetch=0))


def test_other_version_or_format_is_a_clear_error(data):
    root, _ = data
    index = json.loads((root / "index.json").read_text())
    (root / "index.json").write_text(json.dumps({**index, "version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match=f"version {FORMAT_VERSION + 1}.*reads version"):
        LatentShardReader(root, 2)
    (root / "index.json").write_text(json.dumps({**index, "format": "webdataset"}))
    with pytest.raises(ValueError, match="not a megatron-apt-latent-shards index.*webdataset"):
        load_index(root)
    del index["shards"][0]["sha256"]
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="malformed"):
        load_index(root / "index.json")


def test_check_compatible_names_shard_bucket_and_values(data):
    root, _ = data
    reader = LatentShardReader(root, 2)
    check_compatible(reader, in_channels=4, text_dim=D)
    with pytest.raises(
        ValueError, match=r"shards/0000.safetensors \(bucket 4x1x4x4\).*4 latent.*in_channels=16"
    ):
        check_compatible(reader, in_channels=16, text_dim=D)
    with pytest.raises(ValueError, match=f"text_dim={D}.*text_dim=4096"):
        check_compatible(root, in_channels=4, text_dim=4096)
    with pytest.raises(ValueError, match="pooled"):
        check_compatible(reader.index, in_channels=4, text_dim=D, pooled_text_dim=2048)


def test_write_shard_rejects_mismatched_tensors(tmp_path):
    with pytest.raises(ValueError, match="disagree"):
        write_shard(
            tmp_path / "x.safetensors",
            torch.zeros(2, 4, 1, 2, 2),
            torch.zeros(3, L, D),
            torch.ones(3, L, dtype=torch.bool),
            samples=[{}, {}],
        )
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_sample_rows_are_read_without_loading_the_shard(data, monkeypatch):
    """A batch reads only its rows: slicing through safe_open, never load_file."""
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", None)
    root, _ = data
    reader = LatentShardReader(root, 3, shuffle=False)
    batch = reader.read_samples(np.array([0, 5, 11]))
    assert batch["captions"] == ["s0", "s5", "s11"]
    with pytest.raises(ValueError, match="several buckets"):
        reader.read_samples([0, 13])


def test_stream_refuses_a_data_set_without_one_step_and_reports_dropped_buckets(tmp_path):
    """Issue 16, item 2: a data set in which no bucket holds micro x DP samples has no step (it
    ended in a bare StopIteration after the engines were built); buckets too small are named."""
    import dataclasses

    from megatron_apt.config.recipes import get_recipe
    from megatron_apt.config.training import DataConfig
    from megatron_apt.engine.data import ShardStream
    from megatron_apt.models.mmdit import get_preset

    make_dataset(tmp_path, {(4, 1, 4, 4): 6, (4, 1, 2, 2): 3})
    cfg = get_recipe("tiny-apt").replace(
        model=dataclasses.replace(get_preset("tiny"), text_dim=D),
        data=DataConfig(path=str(tmp_path)),
    )
    with pytest.raises(ValueError, match=r"9 samples in 2 bucket\(s\).*a step reads 8 samples"):
        ShardStream(cfg, micro=4, dp_rank=0, dp_size=2)
    stream = ShardStream(cfg, micro=2, dp_rank=0, dp_size=2)  # 4 per step: the 3 are dropped
    assert list(stream.dropped.values()) == [3]
    assert stream.next()[0]["latents"].shape[0] == 2


def test_stream_epochs_follow_each_other_and_resume_at_an_epoch_end(tmp_path):
    """Issue 16, item 10: the stream advanced the epoch a second time after the reader had
    (epochs 0, 2, 4, ...), so a checkpoint taken exactly at an epoch end resumed into epoch 1
    while the uninterrupted run read epoch 2."""
    import dataclasses

    from megatron_apt.config.recipes import get_recipe
    from megatron_apt.config.training import DataConfig
    from megatron_apt.engine.data import ShardStream
    from megatron_apt.models.mmdit import get_preset

    make_dataset(tmp_path, {(4, 1, 4, 4): 12})
    cfg = get_recipe("tiny-apt").replace(
        model=dataclasses.replace(get_preset("tiny"), text_dim=D),
        data=DataConfig(path=str(tmp_path)),
    )

    def ids(stream, n):
        return [stream.next()[0]["latents"][:, 0, 0, 0, 0].tolist() for _ in range(n)]

    a = ShardStream(cfg, micro=2, dp_rank=0, dp_size=1)
    per_epoch = len(a.reader)
    ids(a, per_epoch)  # epoch 0, read to its end
    state = a.state_dict()
    rest = ids(a, per_epoch)  # what the uninterrupted run reads next
    b = ShardStream(cfg, micro=2, dp_rank=0, dp_size=1)
    b.load_state_dict(state)
    assert ids(b, per_epoch) == rest
    reader = LatentShardReader(tmp_path, batch_size=2, seed=cfg.seed)
    reader.set_epoch(1)
    assert [bt["latents"][:, 0, 0, 0, 0].tolist() for bt in reader] == rest  # epoch 1, not 2


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd"])
def test_index_entries_outside_the_data_set_are_refused(tmp_path, name):
    """Issue 16, item 6 (see tests/unit/test_paths.py)."""
    make_dataset(tmp_path, {(4, 1, 2, 2): 4})
    f = tmp_path / "index.json"
    index = json.loads(f.read_text())
    index["shards"][0]["file"] = name
    f.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index.json: file entry .* points outside"):
        LatentShardReader(tmp_path, batch_size=1)


def test_resume_with_another_data_source_is_refused(tmp_path):
    """Issue 16, item 7: a synthetic-data checkpoint resumed on shards died with KeyError
    'reader'; a shard checkpoint resumed without --data-path trained on synthetic data; another
    data set of the same size was accepted. The stream state records its source."""
    import dataclasses

    from megatron_apt.config.recipes import get_recipe
    from megatron_apt.config.training import DataConfig
    from megatron_apt.engine.data import ShardStream, SyntheticStream
    from megatron_apt.models.mmdit import get_preset

    make_dataset(tmp_path / "a", {(4, 1, 4, 4): 8})
    make_dataset(tmp_path / "b", {(4, 1, 4, 4): 8}, seed=1)  # same size, other samples
    base = get_recipe("tiny-apt").replace(model=dataclasses.replace(get_preset("tiny"), text_dim=D))

    def shards(root):
        return ShardStream(base.replace(data=DataConfig(path=str(root))), 2, 0, 1)

    synthetic = SyntheticStream(base, 2, 0, 1)
    with pytest.raises(ValueError, match="read synthetic data, this run reads --data-path"):
        shards(tmp_path / "a").load_state_dict(synthetic.state_dict())
    with pytest.raises(
        ValueError, match=r"read --data-path \(latent shards\), this run reads synth"
    ):
        SyntheticStream(base, 2, 0, 1).load_state_dict(shards(tmp_path / "a").state_dict())
    with pytest.raises(ValueError, match="has index_sha256=.*resume with the same data set"):
        shards(tmp_path / "b").load_state_dict(shards(tmp_path / "a").state_dict())
    old = shards(tmp_path / "a").state_dict()
    del old["source"]  # a checkpoint of an earlier version: its kind from the reader state
    shards(tmp_path / "a").load_state_dict(old)
    with pytest.raises(ValueError, match="read --data-path"):
        SyntheticStream(base, 2, 0, 1).load_state_dict(old)


def test_shard_headers_are_checked_against_the_index_at_open(tmp_path):
    """Issue 16, item 9: a shard of a bucket the index does not list was never read (no word);
    a shard whose text width differed from the index failed later in a prefetch thread
    without naming it. Both are refused at open, naming the shard."""
    make_dataset(tmp_path, {(4, 1, 4, 4): 4, (4, 1, 2, 2): 4})
    f = tmp_path / "index.json"
    good = f.read_text()
    index = json.loads(good)
    index["shards"][0]["bucket"] = "4x9x9x9"
    f.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shards/0000.safetensors \(bucket 4x9x9x9\): its bucket"):
        LatentShardReader(tmp_path, batch_size=1)
    index = json.loads(good)
    index["text_dim"] = D + 1  # the shards hold D-wide text
    f.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"tensor 'text' has shape \[4, {L}, {D}\], the index"):
        LatentShardReader(tmp_path, batch_size=1)
