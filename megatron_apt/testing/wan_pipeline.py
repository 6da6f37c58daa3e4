"""A tiny random Wan2.1 text-to-video pipeline directory, built locally with diffusers' and
transformers' own classes and saved with ``save_pretrained``: the stand-in for a downloaded
``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` in tests (nothing is fetched).

Layout (as on the Hub)::

    model_index.json          WanPipeline
    scheduler/                FlowMatchEulerDiscreteScheduler (shift 3)
    text_encoder/             UMT5EncoderModel (width 32 = the transformer's text_dim)
    tokenizer/                T5Tokenizer of the sentencepiece pieces of
                              megatron_apt.text.train_sentencepiece on the built-in captions
    transformer/              WanTransformer3DModel of the ``wan-debug`` preset
    vae/                      AutoencoderKLWan: z_dim 4, base_dim 8, dim_mult [1, 2, 4, 4]
                              (8x spatial, as Wan2.1's), 4x causal temporal, its own
                              per-channel latents_mean / latents_std
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_apt.text import TINY_CAPTIONS, train_sentencepiece

__all__ = [
    "TINY_WAN_VAE_CONFIG",
    "build_tiny_wan_pipeline",
    "load_wan_pipeline",
    "tiny_wan_pipeline",
]

TINY_WAN_VAE_CONFIG = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.05, 0.3],
    latents_std=[1.5, 0.8, 2.0, 1.2],
)
"""Wan2.1's VAE architecture (``dim_mult``, ``temperal_downsample``) at base width 8, 4
latent channels: 4x causal temporal and 8x spatial compression."""


def tiny_umt5(vocab_size: int, d_model: int = 32, seed: int = 0):
    """A tiny random ``UMT5EncoderModel`` (gated-GELU, per-layer relative attention bias, as
    umt5-xxl), seeded; leaves the global RNG untouched."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
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
        model = UMT5EncoderModel(config).eval()
        with torch.no_grad():  # wake up every weight (norm weights start at 1)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_wan_pipeline(seed: int = 0):
    """The tiny pipeline object (``diffusers.WanPipeline``), seeded; leaves the global RNG
    untouched."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import T5Tokenizer

    from megatron_apt.models.wan.config import get_wan_preset
    from megatron_apt.testing.wan_ref import tiny_wan_transformer
    from megatron_apt.text.tokenizer import SentencePieceTokenizer

    cfg = get_wan_preset("wan-debug")
    sp = SentencePieceTokenizer(train_sentencepiece(list(TINY_CAPTIONS), 128)).sp
    pieces = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    with torch.random.fork_rng(devices=[]):
        text_encoder = tiny_umt5(len(pieces), d_model=cfg.text_dim, seed=seed + 1)
        transformer = tiny_wan_transformer(cfg, seed=seed + 2)
        torch.manual_seed(seed + 3)
        vae = AutoencoderKLWan(**TINY_WAN_VAE_CONFIG).eval()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


def build_tiny_wan_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Save :func:`tiny_wan_pipeline` into ``path`` (safetensors weights). Returns ``path``."""
    path = Path(path)
    tiny_wan_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


def load_wan_pipeline(path: str | Path):
    """``WanPipeline.from_pretrained(path)`` with its transformer, in fp32: without
    ``accelerate`` diffusers 0.42.1 refuses classes with ``_keep_in_fp32_modules``
    (``modeling_utils.py:1081`` then ``:1231``); the class attribute is cleared for this load
    and restored after it (docs/wan.md)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    saved = WanTransformer3DModel.__dict__.get("_keep_in_fp32_modules", _UNSET)
    WanTransformer3DModel._keep_in_fp32_modules = None
    try:
        return WanPipeline.from_pretrained(path, local_files_only=True)
    finally:
        if saved is _UNSET:
            del WanTransformer3DModel._keep_in_fp32_modules
        else:
            WanTransformer3DModel._keep_in_fp32_modules = saved


_UNSET = object()
