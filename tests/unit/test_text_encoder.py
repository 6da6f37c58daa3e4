"""Text encoder: exact local loading, tokenization, padding, truncation, errors, negative prompt."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import UMT5Config, UMT5EncoderModel

from megatron_apt.text import (
    DEFAULT_NEGATIVE_PROMPT,
    TextEncoder,
    build_tiny_text_encoder,
    embed_negative_prompt,
    init_tiny_t5,
)

CAPTIONS = ["a red circle moving left", "", "two small shapes bouncing on a dark background"]
MAX_LEN = 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_text_encoder(tmp_path_factory.mktemp("t5") / "tiny-t5", seed=3)


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return TextEncoder.from_pretrained(tiny_dir, max_length=MAX_LEN)


def test_layout_is_a_t5_directory(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "spiece.model", "tokenizer_config.json"} <= names
    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "t5"


def test_loaded_encoder_equals_saved_model_exactly(tiny_dir, encoder):
    """The issue's requirement: same embeddings as the in-memory model that was saved."""
    model = init_tiny_t5(encoder.tokenizer.vocab_size, seed=3)  # what build_tiny saved
    saved = load_file(tiny_dir / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], tensor), name
    for name, tensor in encoder.model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name

    ids, mask = encoder.tokenize(CAPTIONS)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    out = encoder.encode(CAPTIONS)
    assert torch.equal(out.text[mask], ref[mask]) and (out.text[~mask] == 0).all()
    assert out.text.shape == (3, MAX_LEN, 32) and encoder.dim == 32
    assert out.text.dtype == torch.float32 and out.pooled is None


def test_tokenization_deterministic_mask_and_zero_padding(encoder):
    ids, mask = encoder.tokenize(CAPTIONS)
    ids2, mask2 = encoder.tokenize(CAPTIONS)
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)
    assert mask.dtype == torch.bool and ids.dtype == torch.long
    sp = encoder.tokenizer.sp
    for i, caption in enumerate(CAPTIONS):
        n = min(len(sp.encode(caption)) + 1, MAX_LEN)  # pieces + EOS, truncated
        assert mask[i].tolist() == [True] * n + [False] * (MAX_LEN - n)
        assert ids[i, n - 1] == encoder.tokenizer.eos_id
        assert (ids[i, n:] == encoder.tokenizer.pad_id).all()
    # "a red circle moving left": whole words in the tiny vocabulary
    assert mask[0].sum() == 6 and mask[1].sum() == 1  # "" is just EOS
    out = encoder.encode(CAPTIONS)
    assert (out.text[~out.text_mask] == 0).all()
    assert (out.text[out.text_mask].abs().sum(-1) > 0).all()
    assert torch.equal(out.text, encoder.encode(CAPTIONS).text)


def test_truncation_keeps_eos(encoder):
    long = " ".join(["a blue star spinning"] * 20)
    ids, mask = encoder.tokenize([long])
    assert ids.shape == (1, MAX_LEN) and mask.all()
    assert ids[0, -1] == encoder.tokenizer.eos_id
    assert ids[0, :-1].tolist() == encoder.tokenizer.sp.encode(long)[: MAX_LEN - 1]


def test_padding_longest_and_batching(encoder):
    fixed = encoder.encode(CAPTIONS[:2])
    longest = encoder.encode(CAPTIONS[:2], padding="longest", batch_size=1)
    length = 6  # "a red circle moving left" + EOS; chunks share the call's longest length
    assert longest.text.shape == (2, length, 32)
    assert torch.equal(longest.text_mask, fixed.text_mask[:, :length])
    torch.testing.assert_close(longest.text, fixed.text[:, :length], atol=1e-5, rtol=1e-5)
    one_by_one = encoder.encode(CAPTIONS, batch_size=1)
    torch.testing.assert_close(one_by_one.text, encoder.encode(CAPTIONS).text, atol=1e-5, rtol=0)
    assert encoder.encode([]).text.shape == (0, MAX_LEN, 32)
    with pytest.raises(ValueError, match="padding"):
        encoder.encode(CAPTIONS, padding="left")
    with pytest.raises(TypeError, match="single str"):
        encoder.encode("a red circle")


def test_negative_prompt_is_batch_one_and_equals_encode(encoder):
    neg = embed_negative_prompt(encoder)
    assert neg.text.shape == (1, MAX_LEN, 32) and len(neg) == 1
    ref = encoder.encode([DEFAULT_NEGATIVE_PROMPT])
    assert torch.equal(neg.text, ref.text) and torch.equal(neg.text_mask, ref.text_mask)
    batch = neg.repeat(4)
    assert batch.text.shape == (4, MAX_LEN, 32) and torch.equal(batch.text[3], neg.text[0])
    custom = embed_negative_prompt(encoder, "blurry")
    assert torch.equal(custom.text, encoder.encode(["blurry"]).text)


def test_bfloat16_load(tiny_dir):
    enc = TextEncoder.from_pretrained(tiny_dir, dtype=torch.bfloat16, max_length=8)
    out = enc.encode(CAPTIONS[:1])
    assert out.text.dtype == torch.bfloat16 and out.text.shape == (1, 8, 32)


def test_tiny_init_is_seeded_and_keeps_global_rng():
    state = torch.get_rng_state()
    a, b, c = init_tiny_t5(50, seed=1), init_tiny_t5(50, seed=1), init_tiny_t5(50, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    wa, wb, wc = (m.shared.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def _copy(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_files_are_named(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextEncoder.from_pretrained(tmp_path / "nowhere")
    for missing in ("config.json", "spiece.model", "model.safetensors"):
        d = _copy(tiny_dir, tmp_path / f"no-{missing}", skip={missing})
        with pytest.raises(FileNotFoundError, match=missing) as err:
            TextEncoder.from_pretrained(d)
        assert str(d) in str(err.value)


def test_separate_tokenizer_dir(tiny_dir, tmp_path):
    model_dir = _copy(tiny_dir, tmp_path / "text_encoder_3", skip={"spiece.model"})
    tok_dir = tmp_path / "tokenizer_3"
    tok_dir.mkdir()
    (tok_dir / "spiece.model").write_bytes((tiny_dir / "spiece.model").read_bytes())
    enc = TextEncoder.from_pretrained(model_dir, tokenizer_path=tok_dir, max_length=MAX_LEN)
    ref = TextEncoder.from_pretrained(tiny_dir, max_length=MAX_LEN)
    assert torch.equal(enc.encode(CAPTIONS).text, ref.encode(CAPTIONS).text)


def test_pickle_only_weights_are_refused(tiny_dir, tmp_path):
    """A directory with only a pickled pytorch_model.bin is refused (pickle can run code)."""
    d = _copy(tiny_dir, tmp_path / "pickled", skip={"model.safetensors"})
    torch.save(init_tiny_t5(8).state_dict(), d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        TextEncoder.from_pretrained(d)


def test_unsupported_model_type(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "bert", skip={"config.json"})
    config = json.loads((tiny_dir / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert'"):
        TextEncoder.from_pretrained(d)


def test_umt5_directory(tiny_dir, tmp_path):
    """Wan's text encoder family (UMT5) loads through the same path."""
    t5 = init_tiny_t5(TextEncoder.from_pretrained(tiny_dir).tokenizer.vocab_size, seed=4)
    fields = {k: v for k, v in t5.config.to_dict().items() if k in UMT5Config().to_dict()}
    fields.pop("model_type")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = UMT5EncoderModel(UMT5Config(**fields)).eval()
    model.save_pretrained(tmp_path / "umt5")
    (tmp_path / "umt5" / "spiece.model").write_bytes((tiny_dir / "spiece.model").read_bytes())
    enc = TextEncoder.from_pretrained(tmp_path / "umt5", max_length=MAX_LEN)
    assert isinstance(enc.model, UMT5EncoderModel)
    ids, mask = enc.tokenize(CAPTIONS)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert torch.equal(enc.encode(CAPTIONS).text[mask], ref[mask])
