"""Real media files -> latent shards -> data-parallel reader, end to end.

The test writes PNG images and MP4 clips of the synthetic data set plus two corrupt files,
preprocesses them with the tiny T5 and the identity VAE under ``torchrun --nproc-per-node 2``
(the real CLI), on one rank in process, and in an interrupted-then-resumed run, and reads the
shards back on 2 data-parallel ranks under torchrun.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from megatron_apt.data import (
    LatentShardReader,
    check_compatible,
    make_synthetic_dataset,
    score_sample,
)
from megatron_apt.data.preprocess import PreprocessConfig, preprocess
from megatron_apt.models.mmdit import get_preset
from megatron_apt.testing.launch import REPO_ROOT, run_launcher
from megatron_apt.text import TextEncoder, build_tiny_text_encoder
from megatron_apt.vae import build_tiny_vae, load_vae

PREPROCESS = REPO_ROOT / "tools" / "preprocess_data.py"
READER_WORKER = Path(__file__).with_name("data_reader_worker.py")
NUM_IMAGES = NUM_VIDEOS = 8
BATCH = 2  # per rank; 8 samples per bucket = 2 steps of 2 ranks x 2


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    media = root / "media"
    make_synthetic_dataset(media, NUM_IMAGES, "image", size=32, fmt="png", seed=1)
    make_synthetic_dataset(media, NUM_VIDEOS, "video", size=32, frames=9, fmt="mp4", seed=2)
    rng = np.random.default_rng(0)
    for name in ("broken.png", "broken_clip.mp4"):  # random bytes under media names
        (media / name).write_bytes(rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
        (media / name).with_suffix(".txt").write_text("a red circle\n")
    t5 = build_tiny_text_encoder(root / "t5")
    return root, media, t5


def cli_args(media, t5, output, *extra):
    args = ["--input", media, "--output", output, "--text-encoder", t5, "--vae", "identity"]
    args += ["--bucket", "image-32", "--bucket", "video-32", "--max-text-length", "16"]
    return [str(a) for a in (*args, "--samples-per-shard", "3", "--batch-size", "2", *extra)]


@pytest.fixture(scope="module")
def torchrun_out(inputs):
    root, media, t5 = inputs
    out = root / "torchrun"
    run_launcher(PREPROCESS, cli_args(media, t5, out), nproc=2, marker="preprocess_data: rank")
    return out


@pytest.fixture(scope="module")
def single_out(inputs):
    root, media, t5 = inputs
    cfg = PreprocessConfig(
        input=str(media),
        output=str(root / "single"),
        buckets=["image-32", "video-32"],
        text_encoder=str(t5),
        max_text_length=16,
        samples_per_shard=3,
        batch_size=2,
        progress=False,
    )
    enc = TextEncoder.from_pretrained(t5, max_length=16)
    assert preprocess(cfg, load_vae("identity"), enc) is not None
    return Path(cfg.output)


def shard_list(out):
    index = json.loads((out / "index.json").read_text())
    return [(s["file"], s["num_samples"], s["sha256"]) for s in index["shards"]]


def test_two_ranks_write_the_same_shards_as_one(torchrun_out, single_out):
    index = json.loads((torchrun_out / "index.json").read_text())
    assert index["num_samples"] == NUM_IMAGES + NUM_VIDEOS
    assert {k: b["num_samples"] for k, b in index["buckets"].items()} == {
        "3x1x32x32": NUM_IMAGES,
        "3x9x32x32": NUM_VIDEOS,
    }
    assert (index["text_length"], index["text_dim"], index["dtype"]) == (16, 32, "bfloat16")
    assert shard_list(torchrun_out) == shard_list(single_out)


def test_corrupt_media_is_skipped_and_reported(inputs, torchrun_out):
    _, media, _ = inputs
    report = json.loads((torchrun_out / "report.json").read_text())
    assert report["num_inputs"] == NUM_IMAGES + NUM_VIDEOS + 2
    assert report["num_skipped"] == 2
    assert {s["path"] for s in report["skipped"]} == {
        str(media / "broken.png"),
        str(media / "broken_clip.mp4"),
    }
    assert all("cannot read" in s["reason"] for s in report["skipped"])


def test_stored_latents_show_their_captions(single_out):
    """Identity VAE: latents are the pixels, so the scorer must agree with every caption."""
    seen = 0
    for batch in LatentShardReader(single_out, 4, shuffle=False):
        for latents, caption in zip(batch["latents"].float(), batch["captions"]):
            assert all(score_sample(latents, caption).values()), caption
            seen += 1
        assert batch["text_mask"][:, 0].all() and not batch["text_mask"][:, -1].any()
    assert seen == NUM_IMAGES + NUM_VIDEOS


def load_tool():
    spec = importlib.util.spec_from_file_location("preprocess_data", PREPROCESS)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_interrupted_run_resumes_without_redoing_shards(inputs, single_out, capsys):
    root, media, t5 = inputs
    out = root / "interrupted"
    tool = load_tool()
    assert tool.main(cli_args(media, t5, out, "--max-shards", "2")) == 0  # stops after 2 units
    assert not (out / "index.json").exists()
    assert "2/6 units done; no index written" in capsys.readouterr().err
    first = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert len(first) == 2
    half = out / "shards" / ".u000005-3x9x32x32.safetensors.tmp-4242"  # a killed writer's file
    half.write_bytes(b"partial")
    assert tool.main(cli_args(media, t5, out)) == 0
    assert "rank 0: 4 units written, 2 already done" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in first} == first  # finished shards not redone
    assert not half.exists()
    assert shard_list(out) == shard_list(single_out)
    # A run with other settings that stops early leaves no stale index behind; going back to
    # the first settings redoes only the unit it overwrote.
    other = cli_args(media, t5, out, "--max-shards", "1")
    other[other.index("--max-text-length") + 1] = "12"
    assert tool.main(other) == 0
    assert not (out / "index.json").exists()
    assert tool.main(cli_args(media, t5, out)) == 0
    assert "rank 0: 1 units written, 5 already done" in capsys.readouterr().err
    assert shard_list(out) == shard_list(single_out)


@pytest.fixture(scope="module")
def reader_results(torchrun_out, tmp_path_factory):
    out = tmp_path_factory.mktemp("reader") / "results.json"
    args = [torchrun_out, out, "--batch-size", BATCH]
    run_launcher(READER_WORKER, args, nproc=2, launcher="torchrun", marker="DATA-READER-DONE")
    return json.loads(out.read_text())


def ids_of(epoch):
    return [b["ids"] for b in epoch]


def test_each_sample_once_per_epoch_across_ranks(reader_results):
    ranks = reader_results["ranks"]
    assert reader_results["world"] == 2 and ranks[0]["steps"] == 4
    for epoch in range(2):
        ids = [i for r in ranks for b in r["seed0"][epoch] for i in b["ids"]]
        assert sorted(ids) == list(range(NUM_IMAGES + NUM_VIDEOS))
        for b0, b1 in zip(ranks[0]["seed0"][epoch], ranks[1]["seed0"][epoch]):
            assert b0["shape"] == b1["shape"]  # one bucket per step on every rank
            assert b0["shape"] in ([BATCH, 3, 1, 32, 32], [BATCH, 3, 9, 32, 32])
            assert b0["text"] == [BATCH, 16, 32]


def test_order_is_a_function_of_seed_and_epoch(reader_results):
    for r in reader_results["ranks"]:
        assert r["seed0"] == r["seed0_again"]  # same seed, with or without prefetch
        assert ids_of(r["seed0"][0]) != ids_of(r["seed0"][1])
    seed0 = [ids_of(r["seed0"][0]) for r in reader_results["ranks"]]
    seed1 = [ids_of(r["seed1"][0]) for r in reader_results["ranks"]]
    assert seed0 != seed1


def test_resume_from_mid_epoch_gives_the_same_batches(reader_results):
    for r in reader_results["ranks"]:
        uninterrupted = ids_of(r["seed0"][0]) + ids_of(r["seed0"][1])
        assert set(r["resumed"]) == {"1", "2", "3"}
        for k, ids in r["resumed"].items():
            assert ids == uninterrupted, k


def test_tiny_video_vae_and_model_compatibility(inputs, single_out):
    """A real (tiny, random) causal video VAE: 9 frames -> 3 latent frames, 32 px -> 8; the
    tiny model preset accepts that data and rejects the identity VAE's 3-channel latents."""
    root, media, t5 = inputs
    vae = load_vae(build_tiny_vae(root / "vae", kind="video"))
    enc = TextEncoder.from_pretrained(t5, max_length=16)
    cfg = PreprocessConfig(
        input=str(media), output=str(root / "wan"), text_encoder=str(t5), progress=False
    )
    bad = PreprocessConfig(**{**cfg.__dict__, "buckets": ["32x32x8@8"]})
    with pytest.raises(ValueError, match=r"bucket 32x32x8@8 .*does not fit the VAE.*1 \+ 4 k"):
        preprocess(bad, vae, enc)
    assert not list((root / "wan" / "units").glob("*.json"))  # failed before any work
    index = preprocess(cfg, vae, enc)
    assert set(index["buckets"]) == {"4x1x8x8", "4x3x8x8"} and index["dtype"] == "bfloat16"
    model = get_preset("tiny")
    check_compatible(root / "wan", in_channels=model.in_channels, text_dim=model.text_dim)
    with pytest.raises(ValueError, match=r"u000000-3x1x32x32.safetensors \(bucket 3x1x32x32\)"):
        check_compatible(single_out, in_channels=model.in_channels, text_dim=model.text_dim)
