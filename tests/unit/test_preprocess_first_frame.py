"""``tools/preprocess_data.py --first-frame`` and ``--negative-prompt`` (the Wan chain,
examples/wan_apt.sh): the image stage of a video model trains on stills of its clips, and the
consistency teacher's negative prompt is the one given.

* ``--first-frame`` with an image bucket: every clip becomes one sample of 1 frame whose latents
  are the identity VAE's encoding of the clip's first decoded frame, exactly; without the flag
  the same clips find no bucket and are skipped (the flag is what makes the stills); the
  flag is part of the resume fingerprint only when set (earlier data sets stay done).
* ``--negative-prompt``: the stored embedding is the encoder's of that text, the text is in
  the file's metadata; without it, the repository's fixed prompt (unchanged).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_apt.data import LatentShardReader, make_synthetic_dataset
from megatron_apt.data.media import read_frames
from megatron_apt.data.preprocess import PreprocessConfig, component_digest
from megatron_apt.testing.launch import REPO_ROOT
from megatron_apt.text import DEFAULT_NEGATIVE_PROMPT, TextEncoder, build_tiny_text_encoder
from megatron_apt.vae import load_vae

NEGATIVE = "blurry, static"
TEXT_LEN = 8


def _tool():
    spec = importlib.util.spec_from_file_location(
        "preprocess_tool_first_frame", REPO_ROOT / "tools" / "preprocess_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_frame_stills_and_negative_prompt(tmp_path):
    media = tmp_path / "media"
    clips = make_synthetic_dataset(media, 3, "video", size=32, frames=9, fmt="gif", seed=4)
    t5 = build_tiny_text_encoder(tmp_path / "t5")
    tool = _tool()
    common = ["--input", media, "--text-encoder", t5, "--vae", "identity", "--bucket", "image-32"]
    common += ["--max-text-length", TEXT_LEN, "--no-progress", "--dtype", "float32"]

    out = tmp_path / "stills"
    argv = [*common, "--output", out, "--first-frame", "--negative-prompt", NEGATIVE]
    assert tool.main([str(a) for a in argv]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == 3 and index["num_skipped"] == 0
    reader = LatentShardReader(out, batch_size=3, shuffle=False)
    batch = next(iter(reader))
    assert batch["latents"].shape[2] == 1  # one frame per clip
    assert batch["sample_ids"].tolist() == [0, 1, 2]  # input order: the clips' sorted paths
    vae = load_vae("identity")
    for k, path in enumerate(clips):
        first = torch.from_numpy(read_frames(path, max_frames=1))  # [1, 32, 32, 3]
        pixels = first.permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
        torch.testing.assert_close(batch["latents"][k : k + 1], vae.encode(pixels), rtol=0, atol=0)
        assert batch["captions"][k] == path.with_suffix(".txt").read_text().strip()
        # a later frame is another image: the still is the first frame, not any frame
        later = torch.from_numpy(read_frames(path)[4:5]).permute(3, 0, 1, 2)[None].float()
        assert (vae.encode(later / 127.5 - 1.0) - batch["latents"][k : k + 1]).abs().max() > 0.1

    negative = load_file(str(out / "negative_prompt.safetensors"))
    enc = TextEncoder.from_pretrained(t5, max_length=TEXT_LEN)
    expect = enc.encode([NEGATIVE])
    assert torch.equal(negative["text"], expect.text.float())
    assert torch.equal(negative["text_mask"], expect.text_mask)
    with safe_open(str(out / "negative_prompt.safetensors"), "pt") as f:
        assert f.metadata()["prompt"] == NEGATIVE

    # without the flag the clips have no (video) bucket: all skipped; the default prompt
    plain = tmp_path / "plain"
    assert tool.main([str(a) for a in [*common, "--output", plain]]) == 0
    report = json.loads((plain / "report.json").read_text())
    assert (report["num_samples"], report["num_skipped"]) == (0, 3)
    assert all("no video bucket" in s["reason"] for s in report["skipped"]), report
    default = load_file(str(plain / "negative_prompt.safetensors"))
    assert torch.equal(default["text"], enc.encode([DEFAULT_NEGATIVE_PROMPT]).text.float())


def test_first_frame_enters_the_fingerprint_only_when_set():
    cfg = PreprocessConfig(input="in", output="out", text_encoder="t5", vae="identity")
    plain = cfg.fingerprint([])
    # the formula before the flag existed: data sets preprocessed then are still done
    keys = ("buckets", "vae", "text_encoder", "max_text_length", "dtype", "samples_per_shard")
    models = {k: component_digest(getattr(cfg, k)) for k in ("vae", "text_encoder")}
    blob = json.dumps([{k: getattr(cfg, k) for k in keys}, models, []])
    assert plain == hashlib.sha256(blob.encode()).hexdigest()
    cfg.negative_prompt = NEGATIVE  # not in the shards: no unit is redone for it
    assert cfg.fingerprint([]) == plain
    cfg.first_frame = True
    assert cfg.fingerprint([]) != plain
