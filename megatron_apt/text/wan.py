"""Wan2.1 text conditioning: umT5 (``UMT5EncoderModel``) and the pipeline's tokenizer, built
exactly as ``diffusers.WanPipeline.encode_prompt`` builds it (diffusers 0.42.1,
``pipelines/wan/pipeline_wan.py``):

* every prompt is cleaned by ``prompt_clean`` (``:91-93``): ``ftfy.fix_text`` when ftfy is
  importable, ``html.unescape`` twice, strip (``basic_clean``, ``:78-82``), then every run of
  whitespace (``regex``'s ``\\s+``, not ``re``'s: they differ on e.g. ``\\x1c``) becomes one
  space (``whitespace_clean``, ``:85-88``);
* the tokenizer pads to ``max_length`` (512: the pipeline's ``__call__`` default, ``:404``),
  truncates, adds EOS, and gives the attention mask (``:173-181``);
* umT5 runs WITH that mask; its output is cut at each prompt's length (the mask's count) and
  zero-padded back to ``max_length`` (``:183-191``), in the encoder's dtype.

``text_mask`` is True on the prompt's tokens (EOS included), the MMDiT's convention. The
pretrained Wan takes no mask and attends to the zero padding: to reproduce it exactly, call the
model with ``text_mask=None`` (docs/wan.md). There is no pooled vector. A negative prompt is
embedded like any prompt (the pipeline's default negative prompt is ``""``, ``:256``).

Loaded from a LOCAL Wan pipeline directory (``text_encoder/``, ``tokenizer/``): safetensors
weights only, ``local_files_only``, no remote code.
"""

from __future__ import annotations

import html
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import regex
import torch

from megatron_apt.text.encoder import EncoderProperties, TextEmbeddings, check_weights_dir

__all__ = [
    "WAN_TEXT_LENGTH",
    "WanTextEncoder",
    "basic_clean",
    "ftfy_available",
    "is_wan_pipeline_dir",
    "prompt_clean",
    "whitespace_clean",
]

WAN_TEXT_LENGTH = 512
"""Tokens per prompt of the Wan family (``WanPipeline.__call__``'s ``max_sequence_length``)."""

_DIRS = ("text_encoder", "tokenizer")


# ---------------------------------------------------------------------------------------------
# Prompt cleaning (pipeline_wan.py:78-93)
# ---------------------------------------------------------------------------------------------


def ftfy_available() -> bool:
    """Whether ``ftfy`` is importable (diffusers' ``is_ftfy_available``: then ``basic_clean``
    runs ``ftfy.fix_text`` first)."""
    return importlib.util.find_spec("ftfy") is not None


def basic_clean(text: str, use_ftfy: bool | None = None) -> str:
    """``ftfy.fix_text`` (``use_ftfy``: None = when importable, as diffusers; True = required,
    ``ImportError`` without it; False = never), ``html.unescape`` twice, strip."""
    if use_ftfy is None:
        use_ftfy = ftfy_available()
    if use_ftfy:
        try:
            import ftfy
        except ImportError as e:
            raise ImportError(
                "Wan prompt cleaning with use_ftfy=True needs the 'ftfy' package, which is not "
                "installed (diffusers' WanPipeline skips ftfy.fix_text without it)"
            ) from e
        text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def whitespace_clean(text: str) -> str:
    """Every run of Unicode whitespace (``regex`` module semantics) -> one space; strip."""
    return regex.sub(r"\s+", " ", text).strip()


def prompt_clean(text: str, use_ftfy: bool | None = None) -> str:
    """``whitespace_clean(basic_clean(text))``, diffusers' ``prompt_clean``."""
    return whitespace_clean(basic_clean(text, use_ftfy))


# ---------------------------------------------------------------------------------------------
# Directory detection and the encoder
# ---------------------------------------------------------------------------------------------


def is_wan_pipeline_dir(path: str | Path) -> bool:
    """True for a directory laid out like a diffusers Wan pipeline: ``model_index.json`` whose
    ``_class_name`` starts with ``Wan``, or ``text_encoder/`` holding a umT5 (``model_type``
    ``umt5``) next to ``tokenizer/``."""
    path = Path(path)
    index = path / "model_index.json"
    if index.is_file():
        try:
            if json.loads(index.read_text()).get("_class_name", "").startswith("Wan"):
                return True
        except (json.JSONDecodeError, AttributeError):
            pass
    cfg = path / _DIRS[0] / "config.json"
    if not (cfg.is_file() and (path / _DIRS[1]).is_dir()):
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "umt5"
    except (json.JSONDecodeError, AttributeError):
        return False


class WanTextEncoder(EncoderProperties):
    """Frozen umT5 plus the pipeline's tokenizer (module docstring). Same interface as
    :class:`megatron_apt.text.TextEncoder`: ``dim``, ``text_length``, ``pooled_dim`` (None),
    ``encode(captions)`` -> :class:`TextEmbeddings`.

    Args:
        model: a ``transformers.UMT5EncoderModel`` (put in eval mode, not trained).
        tokenizer: the pipeline's tokenizer (a ``transformers`` tokenizer object).
        max_length: tokens per prompt (truncation and fixed padding), 512 for Wan.
        use_ftfy: see :func:`basic_clean`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        max_length: int = WAN_TEXT_LENGTH,
        use_ftfy: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but umT5 only "
                f"{model.config.vocab_size} embeddings"
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_ftfy = use_ftfy

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = WAN_TEXT_LENGTH,
        use_ftfy: bool | None = None,
    ) -> WanTextEncoder:
        """Load ``text_encoder/`` (``UMT5EncoderModel``, safetensors) and ``tokenizer/``
        (``AutoTokenizer``) of a local Wan pipeline directory; never downloads."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"Wan pipeline directory not found: {path}")
        enc_dir, tok_dir = (path / d for d in _DIRS)
        check_weights_dir(enc_dir, ("umt5",))
        if not tok_dir.is_dir():
            raise FileNotFoundError(f"Wan pipeline directory {path} has no tokenizer/")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{tok_dir}: not a loadable tokenizer ({e})") from e
        model = UMT5EncoderModel.from_pretrained(
            enc_dir, local_files_only=True, use_safetensors=True, dtype=dtype
        )
        return cls(model.to(device), tokenizer, max_length=max_length, use_ftfy=use_ftfy)

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned, tokenized prompts: ``(ids [B, L] int64, attention mask [B, L] int64)``."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, got a single str")
        out = self.tokenizer(
            [prompt_clean(c, self.use_ftfy) for c in captions],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out.input_ids, out.attention_mask

    @torch.no_grad()
    def embed(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: ``(text [B, L, D], text_mask [B, L] bool)``; ``text`` is umT5's output
        cut at each prompt's length and zero beyond it."""
        ids, mask = self.tokenize(captions)  # [B, L]
        seq_lens = mask.gt(0).sum(dim=1).long()  # [B]
        hidden = self.model(ids.to(self.device), mask.to(self.device)).last_hidden_state
        keep = (
            torch.arange(ids.shape[1], device=self.device)[None] < seq_lens.to(self.device)[:, None]
        )
        return hidden.masked_fill(~keep[..., None], 0.0), keep  # [B, L, D], [B, L]

    def encode(
        self, captions: Sequence[str], padding: str | None = None, batch_size: int = 32
    ) -> TextEmbeddings:
        """Captions -> :class:`TextEmbeddings` (``text [B, max_length, D]``, ``text_mask``,
        ``pooled=None``), ``batch_size`` captions per umT5 call."""
        if padding not in (None, "max_length"):
            raise ValueError(
                f"Wan text conditioning has a fixed length (padding='max_length'), got {padding!r}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        captions = list(captions)
        parts = [
            self.embed(captions[i : i + batch_size]) for i in range(0, len(captions), batch_size)
        ]
        if parts:
            text = torch.cat([t for t, _ in parts])
            mask = torch.cat([m for _, m in parts])
        else:
            text = torch.zeros(0, self.max_length, self.dim, dtype=self.dtype, device=self.device)
            mask = torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device)
        return TextEmbeddings(text=text, text_mask=mask, pooled=None)

    def forward(self, captions: Sequence[str]) -> TextEmbeddings:
        return self.encode(captions)
