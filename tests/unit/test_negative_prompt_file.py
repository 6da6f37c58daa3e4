"""Preprocessing stores the negative prompt's embedding next to the shards, exactly."""

import torch
from safetensors.torch import load_file

from megatron_apt.data.preprocess import write_negative_prompt
from megatron_apt.text import (
    DEFAULT_NEGATIVE_PROMPT,
    TextEncoder,
    build_tiny_text_encoder,
    embed_negative_prompt,
)


def test_negative_prompt_file_matches_the_encoder(tmp_path):
    enc = TextEncoder.from_pretrained(build_tiny_text_encoder(tmp_path / "te"), max_length=16)
    path = write_negative_prompt(tmp_path, enc)
    stored = load_file(str(path))
    ref = embed_negative_prompt(enc, DEFAULT_NEGATIVE_PROMPT)
    assert torch.equal(stored["text"], ref.text.float())
    assert torch.equal(stored["text_mask"], ref.text_mask)
    assert stored["text"].shape == (1, 16, enc.dim) and "pooled_text" not in stored
