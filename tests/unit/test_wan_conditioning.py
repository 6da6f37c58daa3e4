"""Wan2.1's text conditioning (umT5) and VAE against diffusers' ``WanPipeline`` on a tiny random
Wan pipeline built locally with diffusers' and transformers' own classes
(megatron_apt.testing.wan_pipeline): the embeddings equal ``WanPipeline.encode_prompt``'s
bitwise, the VAE's normalized latents equal the pipelines' formula bitwise, and
tools/preprocess_data.py writes 512-token shards from the pipeline directory."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import WanPipeline  # noqa: E402
from diffusers.pipelines.wan import pipeline_wan  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from megatron_apt.testing.wan_pipeline import build_tiny_wan_pipeline  # noqa: E402
from megatron_apt.text import (  # noqa: E402
    WAN_TEXT_LENGTH,
    WanTextEncoder,
    is_sd3_pipeline_dir,
    is_wan_pipeline_dir,
    load_text_encoder,
)
from megatron_apt.text.wan import basic_clean, ftfy_available, prompt_clean  # noqa: E402
from megatron_apt.vae import WanVideoVAE, load_vae  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "a red circle moving left",
    # HTML twice escaped, tabs, newlines, a non-breaking and an ideographic space
    "  two small shapes &amp;amp; a\tstar\n\nbouncing on a\xa0dark background\u3000while a "
    "large bright shape grows slowly, a tiny shape shrinking and fading away  ",
    "a blue star spinning",
]
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return build_tiny_wan_pipeline(tmp_path_factory.mktemp("wan") / "pipe")


@pytest.fixture(scope="module")
def pipe(wan_dir):
    """diffusers' own pipeline from the directory (its transformer is not needed: without
    ``accelerate`` diffusers refuses to load it, see docs/wan.md)."""
    return WanPipeline.from_pretrained(wan_dir, local_files_only=True, transformer=None)


# -- prompt cleaning ------------------------------------------------------------------------


CLEAN_CASES = [
    *PROMPTS,
    "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;x&#39; &amp;lt;double&amp;gt;",
    "\t\n  leading and trailing \r\n",
    "separators\x1cand\x1d\x1e\x1fcontrol \x85 next-line \u2028 line-sep \u200b zero-width",
    "",
    "   ",
]


def test_prompt_clean_equals_diffusers():
    for text in CLEAN_CASES:
        assert prompt_clean(text) == pipeline_wan.prompt_clean(text), repr(text)
        assert basic_clean(text) == pipeline_wan.basic_clean(text), repr(text)
    assert prompt_clean("  a &amp;amp; b\t\n c &lt;d&gt; ") == "a & b c <d>"  # unescaped twice
    # regex's \s (Unicode White_Space) is not re's (str.isspace): \x1c stays, as in diffusers
    assert prompt_clean("a\x1cb\u3000c") == "a\x1cb c" != re.sub(r"\s+", " ", "a\x1cb\u3000c")


@pytest.mark.skipif(ftfy_available(), reason="ftfy is installed")
def test_ftfy_required_but_missing_is_named():
    assert basic_clean("caf\u00c3\u00a9", use_ftfy=None) == "caf\u00c3\u00a9"  # as diffusers
    with pytest.raises(ImportError, match="needs the 'ftfy' package"):
        basic_clean("x", use_ftfy=True)


# -- text encoder -----------------------------------------------------------------------------


def test_load_text_encoder_picks_wan_by_directory_contents(wan_dir, tmp_path):
    enc = load_text_encoder(wan_dir)
    assert isinstance(enc, WanTextEncoder) and enc.text_length == WAN_TEXT_LENGTH == 512
    assert (enc.dim, enc.pooled_dim) == (32, None)
    assert is_wan_pipeline_dir(wan_dir) and not is_sd3_pipeline_dir(wan_dir)
    bare = tmp_path / "bare"  # no model_index.json: a umT5 text_encoder/ + tokenizer/
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(wan_dir / sub, bare / sub)
    assert is_wan_pipeline_dir(bare) and not is_wan_pipeline_dir(wan_dir / "text_encoder")
    assert isinstance(load_text_encoder(bare, max_length=12), WanTextEncoder)


@pytest.mark.parametrize("length", [512, 12])  # 12: the long prompt is truncated
def test_embeddings_equal_wan_pipeline_encode_prompt(wan_dir, pipe, length):
    enc = load_text_encoder(wan_dir, max_length=length)
    with torch.no_grad():
        ref, ref_neg = pipe.encode_prompt(
            PROMPTS, negative_prompt=NEGATIVE, max_sequence_length=length, device="cpu"
        )
    emb = enc.encode(PROMPTS)
    assert emb.text.shape == ref.shape == (3, length, 32) and emb.pooled is None
    assert torch.equal(emb.text, ref)  # bitwise
    ids = pipe.tokenizer([pipeline_wan.prompt_clean(p) for p in PROMPTS]).input_ids
    lens = torch.tensor([min(len(i), length) for i in ids])
    assert torch.equal(emb.text_mask.sum(1), lens) and len(set(lens.tolist())) == 3
    assert torch.equal(emb.text_mask, torch.arange(length)[None] < lens[:, None])
    assert emb.text[~emb.text_mask].abs().max() == 0 and emb.text[emb.text_mask].abs().min() > 0
    assert torch.equal(enc.encode([NEGATIVE] * 3).text, ref_neg)
    assert torch.equal(enc.encode(PROMPTS, batch_size=1).text, ref)  # batch-independent here


def test_a_wrong_reading_of_wan_conditioning_is_caught(wan_dir, pipe):
    """Negative controls: without the cleaning, or umT5 run without the mask (as SD3's T5 is),
    or the padding left as umT5 outputs it, the embeddings differ from the pipeline's."""
    enc = load_text_encoder(wan_dir, max_length=64)
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(
            PROMPTS, do_classifier_free_guidance=False, max_sequence_length=64, device="cpu"
        )
        raw = enc.tokenizer(
            PROMPTS, padding="max_length", max_length=64, truncation=True, return_tensors="pt"
        )
        unclean = enc.model(raw.input_ids, raw.attention_mask).last_hidden_state
        ids, mask = enc.tokenize(PROMPTS)
        unmasked = enc.model(ids).last_hidden_state * mask[..., None]
        unpadded = enc.model(ids, mask).last_hidden_state
    assert torch.equal(enc.encode(PROMPTS).text, ref)
    assert not torch.equal(unclean[1] * raw.attention_mask[1, :, None], ref[1])
    assert (unmasked - ref).abs().max() > 1e-3
    assert not torch.equal(unpadded, ref) and torch.equal(unpadded * mask[..., None], ref)


def test_bf16_embeddings_equal_the_bf16_pipeline(wan_dir):
    ref_pipe = WanPipeline.from_pretrained(
        wan_dir, local_files_only=True, transformer=None, torch_dtype=torch.bfloat16
    )
    enc = load_text_encoder(wan_dir, dtype=torch.bfloat16, max_length=24)
    with torch.no_grad():
        ref, _ = ref_pipe.encode_prompt(
            PROMPTS, do_classifier_free_guidance=False, max_sequence_length=24, device="cpu"
        )
    emb = enc.encode(PROMPTS)
    assert emb.text.dtype == ref.dtype == torch.bfloat16 and torch.equal(emb.text, ref)


def test_default_negative_prompt_is_empty_string(wan_dir, pipe):
    enc = load_text_encoder(wan_dir, max_length=16)
    with torch.no_grad():
        _, neg = pipe.encode_prompt(PROMPTS[:2], max_sequence_length=16, device="cpu")
    empty = enc.encode([""])
    assert torch.equal(empty.repeat(2).text, neg) and empty.text_mask.sum() == 1  # EOS only


def test_wan_text_errors(wan_dir, tmp_path):
    with pytest.raises(ValueError, match="max_length must be an int >= 1, got 0"):
        load_text_encoder(wan_dir, max_length=0)
    enc = load_text_encoder(wan_dir, max_length=8)
    with pytest.raises(ValueError, match="fixed length"):
        enc.encode(["a"], padding="longest")
    with pytest.raises(TypeError, match="single str"):
        enc.tokenize("a red circle")
    broken = tmp_path / "broken"
    shutil.copytree(wan_dir / "text_encoder", broken / "text_encoder")
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(FileNotFoundError, match="has no tokenizer/"):
        load_text_encoder(broken)
    (broken / "text_encoder" / "model.safetensors").rename(
        broken / "text_encoder" / "pytorch_model.bin"
    )
    with pytest.raises(FileNotFoundError, match="pickle-based pytorch_model.bin"):
        load_text_encoder(broken)


# -- VAE --------------------------------------------------------------------------------------


def _pixels(b: int, t: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


def _pipeline_normalize(vae, raw: torch.Tensor) -> torch.Tensor:
    """pipeline_wan_video2video.py:428-435 (and pipeline_wan_i2v.py:443-462), verbatim."""
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(raw.device, raw.dtype)
    recip = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(
        raw.device, raw.dtype
    )
    return (raw - mean) * recip


def _pipeline_denormalize(vae, latents: torch.Tensor) -> torch.Tensor:
    """pipeline_wan.py:663-672, verbatim (up to ``vae.decode``)."""
    cfg = vae.config
    latents = latents.to(vae.dtype)
    mean = (
        torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    )
    recip = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(
        latents.device, latents.dtype
    )
    return latents / recip + mean


def test_wan_vae_normalization_equals_the_pipelines(wan_dir, pipe):
    vae = load_vae(str(wan_dir))  # the pipeline root: its vae/ is read
    assert isinstance(vae, WanVideoVAE) and vae.causal
    assert (vae.latent_channels, vae.temporal_compression, vae.spatial_compression) == (4, 4, 8)
    x = _pixels(2, 5, 32, 16)
    z = vae.encode(x)
    assert tuple(z.shape) == (2, *vae.latent_shape(5, 32, 16)) == (2, 4, 2, 4, 2)
    with torch.no_grad():
        raw = pipe.vae.encode(x).latent_dist.mode()
        ref = _pipeline_normalize(pipe.vae, raw)
        assert torch.equal(z, ref)  # bitwise
        # pipeline_wan_video2video.py:424-435 encodes one video per VAE call: the convolutions
        # of a batch of 1 round differently on CPU (6.4e-7 seen, latents up to 0.4)
        per_video = torch.cat([pipe.vae.encode(v[None]).latent_dist.mode() for v in x])
        per_video = _pipeline_normalize(pipe.vae, per_video)
        assert torch.equal(torch.cat([vae.encode(v[None]) for v in x]), per_video)
        torch.testing.assert_close(z, per_video, atol=5e-6, rtol=0)
        video = pipe.vae.decode(_pipeline_denormalize(pipe.vae, z), return_dict=False)[0]
    assert torch.equal(vae.decode(z), video.clamp(-1, 1))
    assert vae.pixel_shape(2, 4, 2) == (3, 5, 32, 16)


def test_wan_vae_denormalize_in_bf16_as_the_pipeline(wan_dir, pipe):
    vae = WanVideoVAE(pipe.vae).to(torch.bfloat16)
    z = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    ref = _pipeline_denormalize(vae.model, z)
    out = vae.denormalize(z)
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.equal(out, ref)
    vae.to(torch.float32)


def test_wan_vae_refuses_frames_that_are_not_4k_plus_1(wan_dir):
    vae = load_vae(str(wan_dir))
    with pytest.raises(
        ValueError, match=r"WanVideoVAE: the number of frames must be 1 \+ 4 k.*got 6"
    ):
        vae.encode(_pixels(1, 6, 16, 16))
    with pytest.raises(ValueError, match=r"divisible by 8 .*got 20x16"):
        vae.latent_shape(5, 20, 16)
    for frames in (1, 5, 9):
        assert vae.latent_shape(frames, 16, 16) == (4, 1 + (frames - 1) // 4, 2, 2)


# -- preprocessing ----------------------------------------------------------------------------


def test_preprocess_a_wan_directory_writes_512_token_shards(wan_dir, tmp_path):
    import importlib.util

    from megatron_apt.data.preprocess import NEGATIVE_PROMPT_FILE
    from megatron_apt.data.synthetic import make_synthetic_dataset
    from megatron_apt.text import DEFAULT_NEGATIVE_PROMPT

    if importlib.util.find_spec("imageio") is None:
        pytest.skip("imageio (GIF reader) is not installed")
    media = tmp_path / "media"
    make_synthetic_dataset(media, 3, "video", size=32, frames=9, fmt="gif", seed=3)
    spec = importlib.util.spec_from_file_location(
        "preprocess_data", REPO_ROOT / "tools" / "preprocess_data.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "shards"
    args = ["--input", media, "--output", out, "--vae", wan_dir, "--text-encoder", wan_dir]
    args += ["--bucket", "video-32", "--dtype", "float32", "--num-workers", "1", "--no-progress"]
    assert tool.main([str(a) for a in args]) == 0
    index = json.loads((out / "index.json").read_text())
    assert (index["text_length"], index["text_dim"]) == (512, 32)
    shard = load_file(str(next((out / "shards").glob("*.safetensors"))))
    assert tuple(shard["latents"].shape[1:]) == (4, 3, 4, 4)  # 9 x 32 x 32 -> 3 x 4 x 4
    assert shard["text"].shape[1:] == (512, 32) and shard["text_mask"].shape[1] == 512
    enc = load_text_encoder(wan_dir)
    captions = [(media / f"video_{i:05d}.txt").read_text().strip() for i in range(3)]
    expect = {c: e for c, e in zip(captions, enc.encode(captions).text)}
    assert len(shard["text"]) == 3
    for text, mask in zip(shard["text"], shard["text_mask"]):
        match = [c for c, e in expect.items() if torch.equal(e, text)]
        assert len(match) == 1 and torch.equal(mask, text.abs().sum(-1) > 0)
    negative = load_file(str(out / NEGATIVE_PROMPT_FILE))  # the fixed negative prompt, 512 long
    assert torch.equal(negative["text"], enc.encode([DEFAULT_NEGATIVE_PROMPT]).text)
    assert negative["text_mask"].shape == (1, 512) and "pooled_text" not in negative
