"""Text conditioning: sentencepiece tokenizer and T5-style encoder (local weights only)."""

from megatron_apt.text.encoder import (
    DEFAULT_NEGATIVE_PROMPT,
    TINY_CAPTIONS,
    TextEmbeddings,
    TextEncoder,
    build_tiny_text_encoder,
    embed_negative_prompt,
    init_tiny_t5,
)
from megatron_apt.text.tokenizer import PADDING_MODES, SentencePieceTokenizer, train_sentencepiece

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "PADDING_MODES",
    "TINY_CAPTIONS",
    "SentencePieceTokenizer",
    "TextEmbeddings",
    "TextEncoder",
    "build_tiny_text_encoder",
    "embed_negative_prompt",
    "init_tiny_t5",
    "train_sentencepiece",
]
