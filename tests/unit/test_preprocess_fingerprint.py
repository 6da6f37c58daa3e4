"""Preprocessing's resume fingerprint follows the contents of the VAE and text encoder, not
only their paths (issue 16, item 9): swapping the model at the same path used to mix two
models' embeddings (even of different widths) in one data set."""

from __future__ import annotations

from megatron_apt.data.preprocess import PreprocessConfig, component_digest


def test_fingerprint_changes_with_the_encoder_at_the_same_path(tmp_path):
    enc = tmp_path / "t5"
    enc.mkdir()
    (enc / "config.json").write_text('{"d_model": 8}')
    (enc / "model.safetensors").write_bytes(b"\0" * (2 << 20))  # large: name and size only
    cfg = PreprocessConfig(input="in", output="out", text_encoder=str(enc), vae="identity")
    first = cfg.fingerprint([])
    component_digest.cache_clear()
    assert cfg.fingerprint([]) == first  # nothing changed: the same units are done
    (enc / "config.json").write_text('{"d_model": 16}')  # another model at the same path
    component_digest.cache_clear()
    second = cfg.fingerprint([])
    assert second != first
    (enc / "model.safetensors").write_bytes(b"\0" * (3 << 20))  # other weights' layout
    component_digest.cache_clear()
    assert cfg.fingerprint([]) not in (first, second)
    assert component_digest("identity") == component_digest("identity")  # not a path
