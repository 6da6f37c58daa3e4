"""A tiny random Stable Diffusion 3 pipeline directory, built locally with diffusers' and
transformers' own classes and saved with ``save_pretrained``: the stand-in for a downloaded
``stabilityai/stable-diffusion-3.5-large`` in tests (nothing is fetched).

Layout (as on the Hub)::

    model_index.json                 StableDiffusion3Pipeline
    scheduler/                       FlowMatchEulerDiscreteScheduler (shift 3, as SD3)
    text_encoder/   tokenizer/       CLIPTextModelWithProjection + CLIPTokenizer   ("CLIP-L")
    text_encoder_2/ tokenizer_2/     CLIPTextModelWithProjection + CLIPTokenizer   ("CLIP-G")
    text_encoder_3/ tokenizer_3/     T5EncoderModel + T5Tokenizer                  ("T5-XXL")
    transformer/                     SD3Transformer2DModel (tests' tiny size)
    vae/                             AutoencoderKL (4 channels, SD3's shift/scale)

Sizes: CLIP widths 8 and 16 (pooled 8 + 16 = 24 = the transformer's ``pooled_projection_dim``),
T5 width 32 (= ``joint_attention_dim``), CLIP context ``clip_length`` tokens (77 in SD3).
The tokenizers are trained on the built-in caption corpus: a byte-level BPE for CLIP (saved as
``vocab.json`` + ``merges.txt``, as on the Hub), the sentencepiece pieces of
:func:`megatron_apt.text.train_sentencepiece` for T5 (``tokenizer.json``).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import torch

from megatron_apt.text import TINY_CAPTIONS, train_sentencepiece

__all__ = ["TINY_CLIP_WIDTHS", "TINY_T5_WIDTH", "build_tiny_sd3_pipeline", "tiny_sd3_pipeline"]

TINY_CLIP_WIDTHS = (8, 16)
TINY_T5_WIDTH = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clip_bpe(corpus, num_merges: int = 120) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and merges in CLIP's format (``</w>`` ends a word),
    learned greedily on the lower-cased words of ``corpus``."""
    chars = list(_bytes_to_unicode().values())
    words = collections.Counter(w for line in corpus for w in line.lower().split())
    seqs = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def tiny_sd3_pipeline(clip_length: int = 16, seed: int = 0):
    """The tiny pipeline object (``StableDiffusion3Pipeline``), seeded; leaves the global RNG
    untouched."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Tokenizer,
    )

    from megatron_apt.testing.diffusers_ref import TINY_SD3_KWARGS, sd3_transformer
    from megatron_apt.text import init_tiny_t5
    from megatron_apt.text.tokenizer import SentencePieceTokenizer
    from megatron_apt.vae.autoencoders import TINY_IMAGE_CONFIG

    corpus = list(TINY_CAPTIONS)
    vocab, merges = _clip_bpe(corpus)
    clip_tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=clip_length)
    # SD3's CLIP-G tokenizer pads with "!" instead of <|endoftext|>: keep that difference
    clip_tok_2 = CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=clip_length, pad_token="!"
    )
    sp = SentencePieceTokenizer(train_sentencepiece(corpus, 128)).sp
    pieces = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
    t5_tok = T5Tokenizer(vocab=pieces, extra_ids=0)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoders = []
        for width in TINY_CLIP_WIDTHS:
            cfg = CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=width,
                intermediate_size=2 * width,
                projection_dim=width,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=clip_length,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
            encoders.append(CLIPTextModelWithProjection(cfg).eval())
        t5 = init_tiny_t5(len(pieces), d_model=TINY_T5_WIDTH, seed=seed + 1)
        transformer = sd3_transformer(**TINY_SD3_KWARGS).eval()
        with torch.no_grad():  # diffusers zero-initializes the output layers: wake them up
            for p in transformer.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        vae = AutoencoderKL(**TINY_IMAGE_CONFIG).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=clip_tok,
        text_encoder_2=encoders[1],
        tokenizer_2=clip_tok_2,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


def _hub_clip_tokenizer_layout(folder: Path) -> None:
    """Rewrite a saved CLIP tokenizer as the Hub's SD3 repositories ship it: ``vocab.json`` +
    ``merges.txt`` + ``tokenizer_config.json``, no ``tokenizer.json``."""
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    (folder / "tokenizer.json").unlink()


def build_tiny_sd3_pipeline(path: str | Path, clip_length: int = 16, seed: int = 0) -> Path:
    """Save :func:`tiny_sd3_pipeline` into ``path`` (safetensors weights; the CLIP tokenizers
    in the Hub's vocab.json + merges.txt layout). Returns ``path``."""
    path = Path(path)
    tiny_sd3_pipeline(clip_length, seed).save_pretrained(path, safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):
        _hub_clip_tokenizer_layout(path / folder)
    return path
