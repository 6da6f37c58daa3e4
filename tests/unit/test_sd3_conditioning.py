"""SD3 / SD3.5 parts against diffusers on a tiny random SD3 pipeline built locally with
diffusers' and transformers' own classes (megatron_apt.testing.sd3_pipeline): the text
conditioning (CLIP-L + CLIP-G + T5) equals ``StableDiffusion3Pipeline.encode_prompt``, the
flow-matching Euler sigmas equal ``FlowMatchEulerDiscreteScheduler``'s, and the pipeline export
refuses what does not fit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline  # noqa: E402

from megatron_apt.checkpoint.pipeline_export import export_diffusers_pipeline  # noqa: E402
from megatron_apt.inference.schedule import (  # noqa: E402
    flow_match_euler_sigmas,
    read_flow_match_scheduler,
)
from megatron_apt.testing.sd3_pipeline import build_tiny_sd3_pipeline  # noqa: E402
from megatron_apt.text import (  # noqa: E402
    SD3TextEncoder,
    TextEncoder,
    build_tiny_text_encoder,
    is_sd3_pipeline_dir,
    load_text_encoder,
)

T5_LEN = 12
PROMPTS = [
    "a red circle moving left",
    # longer than the tiny CLIP context (16 tokens) and the T5 length: both truncate
    "two small shapes bouncing on a dark background while a large bright shape grows slowly",
]
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture(scope="module")
def reference(sd3_dir):
    """diffusers' own embeddings: (prompt, negative, pooled, negative pooled)."""
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, local_files_only=True)
    with torch.no_grad():
        return pipe.encode_prompt(
            PROMPTS, None, None, max_sequence_length=T5_LEN, negative_prompt=NEGATIVE
        )


def test_load_text_encoder_picks_by_directory_contents(sd3_dir, tmp_path):
    enc = load_text_encoder(sd3_dir, max_length=T5_LEN)
    assert isinstance(enc, SD3TextEncoder) and is_sd3_pipeline_dir(sd3_dir)
    assert (enc.dim, enc.pooled_dim, enc.text_length) == (32, 8 + 16, 16 + T5_LEN)
    t5_dir = build_tiny_text_encoder(tmp_path / "t5")
    t5 = load_text_encoder(t5_dir, max_length=T5_LEN)
    assert isinstance(t5, TextEncoder) and t5.pooled_dim is None
    assert not is_sd3_pipeline_dir(t5_dir)


def test_text_conditioning_equals_diffusers_encode_prompt(sd3_dir, reference):
    embeds, neg_embeds, pooled, neg_pooled = reference
    enc = load_text_encoder(sd3_dir, max_length=T5_LEN)
    ours = enc.encode(PROMPTS, batch_size=1)  # batching must not matter either
    neg = enc.encode([NEGATIVE])
    assert ours.text.shape == embeds.shape == (2, 16 + T5_LEN, 32)
    assert ours.pooled.shape == pooled.shape == (2, 24)
    torch.testing.assert_close(ours.text, embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=1e-5)
    torch.testing.assert_close(neg.text, neg_embeds[:1], rtol=0, atol=1e-5)
    torch.testing.assert_close(neg.pooled, neg_pooled[:1], rtol=0, atol=1e-5)
    assert ours.text_mask.all()  # SD3 attends every token (T5 padding included)
    # the CLIP part is zero-padded from 8 + 16 to the T5 width; the prompts differ
    assert ours.text[:, :16, 24:].abs().max() == 0
    assert (ours.text[0] - ours.text[1]).abs().max() > 1e-3


def test_a_wrong_reading_of_sd3_conditioning_is_caught(sd3_dir, reference):
    """Controls: the comparison above would see the usual slips (CLIP's last layer instead of
    the penultimate; T5 run with an attention mask over its padding)."""
    embeds = reference[0]
    enc = load_text_encoder(sd3_dir, max_length=T5_LEN)
    ids = enc.clip_tokenizers[0](
        PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        last = enc.clips[0](ids, output_hidden_states=True).hidden_states[-1]
    assert (last - embeds[:, :16, :8]).abs().max() > 1e-3
    tok = enc.t5_tokenizer(
        PROMPTS, padding="max_length", max_length=T5_LEN, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        masked = enc.t5(tok.input_ids, attention_mask=tok.attention_mask)[0]
    assert (masked - embeds[:, 16:]).abs().max() > 1e-4


def test_fixed_length_only(sd3_dir):
    enc = load_text_encoder(sd3_dir, max_length=T5_LEN)
    with pytest.raises(ValueError, match="fixed length"):
        enc.encode(PROMPTS, padding="longest")
    empty = enc.encode([])
    assert empty.text.shape == (0, 16 + T5_LEN, 32) and empty.pooled.shape == (0, 24)


def test_pickled_text_encoder_weights_are_refused(sd3_dir, tmp_path):
    broken = tmp_path / "pipe"
    shutil.copytree(sd3_dir, broken)
    (broken / "text_encoder_2" / "model.safetensors").rename(
        broken / "text_encoder_2" / "pytorch_model.bin"
    )
    with pytest.raises(FileNotFoundError, match=r"text_encoder_2.*pickle"):
        load_text_encoder(broken)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 28])
def test_flow_match_euler_sigmas_equal_diffusers(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = flow_match_euler_sigmas(steps, shift)
    torch.testing.assert_close(ours, sched.sigmas, rtol=0, atol=1e-7)
    assert ours[0] == 1 and ours[-1] == 0  # 1 step is z - v(z, 1) under any shift


def test_scheduler_config_is_read_and_checked(sd3_dir, tmp_path):
    assert read_flow_match_scheduler(sd3_dir) == {"shift": 3.0, "num_train_timesteps": 1000}
    cfg = json.loads((sd3_dir / "scheduler" / "scheduler_config.json").read_text())
    bad = tmp_path / "scheduler_config.json"
    bad.write_text(json.dumps({**cfg, "use_dynamic_shifting": True}))
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        read_flow_match_scheduler(bad)
    bad.write_text(json.dumps({**cfg, "_class_name": "EulerDiscreteScheduler"}))
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        read_flow_match_scheduler(bad)
    with pytest.raises(FileNotFoundError):
        read_flow_match_scheduler(tmp_path / "nothing")


def test_pipeline_export_refuses_a_base_that_does_not_fit(sd3_dir, tmp_path):
    from megatron_apt.checkpoint.convert import import_diffusers

    model = import_diffusers(sd3_dir, tmp_path / "sd3.safetensors")
    ok = export_diffusers_pipeline(model, sd3_dir, tmp_path / "ok")
    assert (ok / "text_encoder").is_symlink() and (ok / "transformer" / "config.json").is_file()
    index = json.loads((ok / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    # a base whose VAE has other latent channels: nothing is written
    other = tmp_path / "other"
    shutil.copytree(sd3_dir, other)
    vae_cfg = other / "vae" / "config.json"
    vae_cfg.write_text(json.dumps({**json.loads(vae_cfg.read_text()), "latent_channels": 16}))
    with pytest.raises(ValueError, match="latent_channels 16"):
        export_diffusers_pipeline(model, other, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="not an SD3"):
        export_diffusers_pipeline(model, tmp_path, tmp_path / "bad")
    with pytest.raises(FileExistsError):
        export_diffusers_pipeline(model, sd3_dir, ok)
    copied = export_diffusers_pipeline(model, sd3_dir, ok, overwrite=True, copy=True)
    assert (copied / "text_encoder").is_dir() and not (copied / "text_encoder").is_symlink()
