"""Sentencepiece tokenizer with T5's conventions, read from a ``spiece.model`` file.

T5 tokenizes with a sentencepiece unigram model and appends ``</s>`` (EOS); padding uses
``<pad>``. We call sentencepiece directly instead of ``transformers.T5Tokenizer`` because that
class is backed by ``tokenizers`` since transformers 5 and no longer reads ``spiece.model`` on its
own; for plain captions the ids are the same as T5's (no sentinel ``<extra_id_*>`` tokens).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
import torch

__all__ = ["PADDING_MODES", "SentencePieceTokenizer", "train_sentencepiece"]

PADDING_MODES = ("max_length", "longest")
SPIECE_FILE = "spiece.model"


class SentencePieceTokenizer:
    """Captions -> token ids ``[B, L]`` (int64) and mask ``[B, L]`` (bool, True = real token).

    Every caption becomes its pieces, truncated to ``max_length - 1`` pieces, then EOS; the rest
    of the row is ``pad_id``. ``padding="max_length"`` gives ``L = max_length`` (fixed shapes for
    shards and compiled models); ``padding="longest"`` gives ``L`` = the longest row.
    """

    def __init__(self, model_proto: bytes, source: str = "<bytes>") -> None:
        self.source = source
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.eos_id = self.sp.piece_to_id("</s>")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.piece_to_id("<pad>")
        unk = self.sp.unk_id()
        for name, idx in (("</s>", self.eos_id), ("<pad>", self.pad_id)):
            if idx == unk or idx < 0:
                raise ValueError(f"sentencepiece model {source} has no {name} piece (T5 needs it)")

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        """Load a ``spiece.model`` file (or the directory that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / SPIECE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        return cls(path.read_bytes(), source=str(path))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def tokenize(self, text: str, max_length: int) -> list[int]:
        """One caption -> ids ending with EOS, at most ``max_length`` of them."""
        return self.sp.encode(text)[: max_length - 1] + [self.eos_id]

    def __call__(
        self, texts: Sequence[str], max_length: int, padding: str = "max_length"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(ids [B, L] int64, mask [B, L] bool)``; see the class docstring for ``L``."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got a single str")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
        rows = [self.tokenize(t, max_length) for t in texts]
        length = max_length if padding == "max_length" else max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids, mask


def train_sentencepiece(corpus: Sequence[str], vocab_size: int = 128) -> bytes:
    """Train a sentencepiece model with T5's special ids (pad 0, EOS 1, unk 2, no BOS) on a
    small corpus.

    BPE rather than T5's unigram: on a few hundred short captions unigram keeps mostly single
    characters, BPE keeps whole words (same file format, same loader).
    ``hard_vocab_limit=False``: tiny corpora may yield fewer pieces than ``vocab_size``.
    Deterministic for a given corpus (single thread). Returns the serialized model.
    """
    if not corpus:
        raise ValueError("corpus for the sentencepiece model is empty")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)),
        model_writer=out,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()
