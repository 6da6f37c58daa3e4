"""Text conditioning: sentencepiece tokenizer and T5-style encoder, SD3's CLIP-L + CLIP-G + T5,
Wan's umT5 (local weights only); :func:`load_text_encoder` picks one by a directory's contents."""

from megatron_apt.text.encoder import (
    DEFAULT_NEGATIVE_PROMPT,
    TINY_CAPTIONS,
    TextEmbeddings,
    TextEncoder,
    build_tiny_text_encoder,
    check_weights_dir,
    embed_negative_prompt,
    init_tiny_t5,
)
from megatron_apt.text.loading import load_text_encoder
from megatron_apt.text.sd3 import SD3TextEncoder, is_sd3_pipeline_dir
from megatron_apt.text.tokenizer import PADDING_MODES, SentencePieceTokenizer, train_sentencepiece
from megatron_apt.text.wan import (
    WAN_TEXT_LENGTH,
    WanTextEncoder,
    is_wan_pipeline_dir,
    prompt_clean,
)

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "PADDING_MODES",
    "SD3TextEncoder",
    "TINY_CAPTIONS",
    "SentencePieceTokenizer",
    "TextEmbeddings",
    "TextEncoder",
    "WAN_TEXT_LENGTH",
    "WanTextEncoder",
    "build_tiny_text_encoder",
    "check_weights_dir",
    "embed_negative_prompt",
    "init_tiny_t5",
    "is_sd3_pipeline_dir",
    "is_wan_pipeline_dir",
    "load_text_encoder",
    "prompt_clean",
    "train_sentencepiece",
]
