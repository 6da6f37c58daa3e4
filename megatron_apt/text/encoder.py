"""T5-style text encoder: captions -> token embeddings ``[B, L, D]`` and a mask ``[B, L]``.

Weights and tokenizer come from a LOCAL directory laid out like a Hugging Face T5 directory
(e.g. ``google/t5-v1_1-xxl``, or SD3's ``text_encoder_3`` + ``tokenizer_3``)::

    config.json                                   T5Config (model_type "t5" or "umt5")
    model.safetensors | model.safetensors.index.json + shards
    spiece.model                                  sentencepiece model (may live in tokenizer_path)
    tokenizer_config.json, special_tokens_map.json  (informational; not needed to load)

Nothing is downloaded (``local_files_only=True``) and weights are read from safetensors only: a
directory with just a pickled ``pytorch_model.bin`` is refused.

Decisions: padding is to a fixed ``max_length`` by default (uniform shard shapes), or to the
longest caption of the call with ``padding="longest"``; captions are truncated to
``max_length`` tokens including EOS; embeddings of padded positions are set to zero; ``pooled``
is None (T5 has no pooled output).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import T5Config, T5EncoderModel, UMT5EncoderModel

from megatron_apt.text.tokenizer import (
    PADDING_MODES,
    SPIECE_FILE,
    SentencePieceTokenizer,
    train_sentencepiece,
)

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "TINY_CAPTIONS",
    "TextEmbeddings",
    "TextEncoder",
    "build_tiny_text_encoder",
    "check_weights_dir",
    "embed_negative_prompt",
    "init_tiny_t5",
]

DEFAULT_NEGATIVE_PROMPT = (
    "blurry, low quality, worst quality, jpeg artifacts, distorted, deformed, disfigured, "
    "bad anatomy, extra limbs, watermark, text, signature, overexposed, underexposed, "
    "static, still image, flickering, jittery motion"
)
"""Fixed negative prompt of the consistency-distillation teacher (paper: CFG 7.5 with a fixed
negative prompt; the paper does not print it)."""

_ENCODERS = {"t5": T5EncoderModel, "umt5": UMT5EncoderModel}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class TextEmbeddings:
    """Encoded captions.

    text: ``[B, L, D]`` float token embeddings, zero at padded positions.
    text_mask: ``[B, L]`` bool, True for real tokens (EOS included).
    pooled: ``[B, P]`` pooled embedding, or None (T5).
    """

    text: torch.Tensor
    text_mask: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.text.shape[0]

    def to(self, *args, **kwargs) -> TextEmbeddings:
        """``Tensor.to`` on every tensor (the mask keeps its bool dtype)."""
        text = self.text.to(*args, **kwargs)
        mask = self.text_mask.to(device=text.device)
        pooled = None if self.pooled is None else self.pooled.to(*args, **kwargs)
        return TextEmbeddings(text, mask, pooled)

    def repeat(self, n: int) -> TextEmbeddings:
        """Batch-1 embeddings repeated to batch ``n`` (e.g. a negative prompt for CFG)."""
        if len(self) != 1:
            raise ValueError(f"repeat needs batch-1 embeddings, got batch {len(self)}")
        pooled = None if self.pooled is None else self.pooled.expand(n, -1)
        return TextEmbeddings(self.text.expand(n, -1, -1), self.text_mask.expand(n, -1), pooled)


class EncoderProperties(torch.nn.Module):
    """What every (u)T5-style encoder of ours reports: ``self.model`` (a transformers encoder)
    and ``self.max_length`` set by the subclass."""

    @property
    def dim(self) -> int:
        """Width ``D`` of the token embeddings (the model's ``d_model``)."""
        return self.model.config.d_model

    @property
    def text_length(self) -> int:
        """``L`` of the embeddings with the default padding to ``max_length``."""
        return self.max_length

    @property
    def pooled_dim(self) -> None:
        """(u)T5 gives no pooled vector."""
        return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


class TextEncoder(EncoderProperties):
    """A frozen T5 encoder plus its sentencepiece tokenizer.

    Args:
        model: a ``T5EncoderModel`` (or ``UMT5EncoderModel``); put in eval mode, not trained.
        tokenizer: the matching tokenizer.
        max_length: tokens per caption including EOS (truncation; and ``L`` when padding to
            ``max_length``). 256 is SD3's choice for T5-XXL; Wan uses 512.
        padding: ``"max_length"`` (default: ``L = max_length``) or ``"longest"``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: SentencePieceTokenizer,
        max_length: int = 256,
        padding: str = "max_length",
    ) -> None:
        super().__init__()
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
        vocab = model.config.vocab_size
        if tokenizer.vocab_size > vocab:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} pieces but the model only {vocab} "
                f"embeddings ({tokenizer.source})"
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding = padding

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = 256,
        padding: str = "max_length",
        tokenizer_path: str | Path | None = None,
    ) -> TextEncoder:
        """Load from a local T5 directory (layout in the module docstring); never downloads.

        ``tokenizer_path``: directory (or file) of ``spiece.model`` when it is not in ``path``
        (diffusers layouts: ``text_encoder_3/`` + ``tokenizer_3/``). T5 overflows in float16;
        use float32 or bfloat16.
        """
        path = Path(path)
        model_type = check_weights_dir(path)
        tok_path = Path(tokenizer_path) if tokenizer_path is not None else path
        tokenizer = SentencePieceTokenizer.from_file(tok_path)
        model = _ENCODERS[model_type].from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=dtype
        )
        return cls(model.to(device), tokenizer, max_length=max_length, padding=padding)

    def tokenize(
        self, captions: Sequence[str], padding: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [B, L] int64, mask [B, L] bool)`` on CPU."""
        return self.tokenizer(captions, self.max_length, padding or self.padding)

    @torch.no_grad()
    def embed_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]`` and mask ``[B, L]`` -> embeddings ``[B, L, D]`` in the model's
        dtype on its device, zero where ``mask`` is False."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return hidden.masked_fill(~mask[..., None], 0.0)  # [B, L, D]

    @torch.no_grad()
    def encode(
        self, captions: Sequence[str], padding: str | None = None, batch_size: int = 32
    ) -> TextEmbeddings:
        """Captions -> :class:`TextEmbeddings` (``text [B, L, D]``, ``text_mask [B, L]``).

        Runs the model in chunks of ``batch_size`` captions under ``no_grad``; every chunk has
        the same ``L`` (with ``padding="longest"``: the longest caption of the whole call).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids, mask = self.tokenize(captions, padding)  # [B, L]
        chunks = [
            self.embed_ids(ids[i : i + batch_size], mask[i : i + batch_size])
            for i in range(0, len(captions), batch_size)
        ]
        if chunks:
            text = torch.cat(chunks)
        else:
            text = torch.zeros(0, ids.shape[1], self.dim, dtype=self.dtype, device=self.device)
        return TextEmbeddings(text=text, text_mask=mask.to(text.device), pooled=None)

    def forward(self, captions: Sequence[str]) -> TextEmbeddings:
        return self.encode(captions)


def embed_negative_prompt(
    encoder: TextEncoder, text: str = DEFAULT_NEGATIVE_PROMPT
) -> TextEmbeddings:
    """The fixed negative prompt, embedded once: batch 1, ``L`` as ``encoder.encode`` gives it.
    Expand to a batch with :meth:`TextEmbeddings.repeat`."""
    return encoder.encode([text])


def check_weights_dir(path: Path, model_types=tuple(_ENCODERS)) -> str:
    """Check that ``path`` holds a loadable transformers model of one of ``model_types``
    (``config.json`` + safetensors weights; a pickled ``pytorch_model.bin`` is refused);
    return its ``model_type``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"text encoder directory {path} has no config.json")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in model_types:
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is not supported "
            f"(expected one of {sorted(model_types)})"
        )
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        pickled = [f for f in _PICKLE_FILES if (path / f).is_file()]
        hint = (
            f"; found only pickle-based {pickled[0]}, which is not loaded (it can execute "
            "code): convert it once to safetensors in a trusted environment"
            if pickled
            else ""
        )
        raise FileNotFoundError(
            f"text encoder directory {path} has no {' or '.join(_WEIGHT_FILES)}{hint}"
        )
    return model_type


# ---------------------------------------------------------------------------------------------
# Tiny random encoder for tests and the CPU demo
# ---------------------------------------------------------------------------------------------

_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
_SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
_MOTIONS = ("moving left", "moving right", "moving up", "moving down", "spinning", "standing still")
TINY_CAPTIONS: tuple[str, ...] = tuple(
    f"a {c} {s} {m}" for c in _COLORS for s in _SHAPES for m in _MOTIONS
) + (
    "two small shapes bouncing on a dark background",
    "a large bright shape growing slowly",
    "a tiny shape shrinking and fading away",
)
"""Built-in caption-like corpus (coloured shapes moving) for the tiny tokenizer."""


def init_tiny_t5(
    vocab_size: int,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    d_ff: int = 64,
    seed: int = 0,
) -> T5EncoderModel:
    """A tiny random ``T5EncoderModel`` (T5 v1.1 style: gated-GELU, untied), seeded init;
    deterministic for the same arguments and leaves the global RNG untouched."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        is_encoder_decoder=False,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(config).eval()


def build_tiny_text_encoder(
    path: str | Path,
    corpus: Sequence[str] | None = None,
    vocab_size: int = 128,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    d_ff: int = 64,
    max_length: int = 32,
    seed: int = 0,
) -> Path:
    """Train a sentencepiece model on ``corpus`` (default :data:`TINY_CAPTIONS`), build a tiny
    random T5 encoder (see :func:`init_tiny_t5`) sized to the trained vocabulary, and save both
    into ``path`` in a real T5 directory's layout. Returns ``path``.

    The model's ``vocab_size`` is the number of pieces actually trained (``hard_vocab_limit``
    is off, so it may be below ``vocab_size``). ``max_length`` goes to ``tokenizer_config.json``
    only (``TextEncoder.from_pretrained`` takes its own ``max_length``).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    proto = train_sentencepiece(list(corpus or TINY_CAPTIONS), vocab_size)
    tokenizer = SentencePieceTokenizer(proto)
    model = init_tiny_t5(tokenizer.vocab_size, d_model, num_layers, num_heads, d_ff, seed)
    model.save_pretrained(path, safe_serialization=True)
    (path / SPIECE_FILE).write_bytes(proto)
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    tok_config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": max_length}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (path / "tokenizer_config.json").write_text(
        json.dumps({**tok_config, **special}, indent=2) + "\n"
    )
    return path
