"""Key map from a diffusers ``SD3Transformer2DModel`` state dict to this project's MMDiT (TP=1).

One-to-one except two layout changes: SD3's separate ``to_q/to_k/to_v`` (and ``add_*_proj``)
become one fused QKV stored per head as ``[heads, (q, k, v), head_dim]``, and the patch-embed
Conv2d weight ``[D, C, p, p]`` becomes a linear ``[D, C*1*p*p]`` (a (1, p, p) 3D patch).
SD3.5 Medium's second ("dual") attention is not supported and is named in the error.
"""

from __future__ import annotations

import torch

from megatron_apt.config.model import MMDiTConfig

_STREAM = {  # (ours, diffusers) per stream: visual, text
    "visual": {
        "adaln": "norm1.linear",
        "proj": "attn.to_out.0",
        "fc1": "ff.net.0.proj",
        "fc2": "ff.net.2",
        "q_norm": "attn.norm_q",
        "k_norm": "attn.norm_k",
        "qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    },
    "text": {
        "adaln": "norm1_context.linear",
        "proj": "attn.to_add_out",
        "fc1": "ff_context.net.0.proj",
        "fc2": "ff_context.net.2",
        "q_norm": "attn.norm_added_q",
        "k_norm": "attn.norm_added_k",
        "qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    },
}
_TOP = {
    "patch_embed": "pos_embed.proj",
    "text_embed": "context_embedder",
    "time_embed.linear_1": "time_text_embed.timestep_embedder.linear_1",
    "time_embed.linear_2": "time_text_embed.timestep_embedder.linear_2",
    "pooled_embed.linear_1": "time_text_embed.text_embedder.linear_1",
    "pooled_embed.linear_2": "time_text_embed.text_embedder.linear_2",
    "final_adaln": "norm_out.linear",
    "final_proj": "proj_out",
}


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[h*hd, ...]`` x 3 -> ``[h*(3*hd), ...]`` in per-head ``(q, k, v)`` order."""
    parts = [t.reshape(num_heads, -1, *t.shape[1:]) for t in (q, k, v)]
    fused = torch.stack(parts, dim=1)  # [heads, 3, hd, ...]
    return fused.reshape(-1, *q.shape[1:])


def sd3_to_mmdit(sd: dict[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Map a diffusers SD3 state dict onto our key names; every source key must be used."""
    dual = sorted(k for k in sd if ".attn2." in k)
    if dual:
        raise ValueError(f"SD3.5-Medium dual attention (attn2) is not supported: {dual[:3]}...")
    out, used = {}, set()

    def take(src: str) -> torch.Tensor:
        if src not in sd:
            raise KeyError(f"diffusers state dict has no key {src!r}")
        used.add(src)
        return sd[src]

    for ours, theirs in _TOP.items():
        if ours.startswith("pooled_embed") and not cfg.pooled_text_dim:
            continue
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = take(f"{theirs}.{p}")
    out["patch_embed.weight"] = out["patch_embed.weight"].reshape(cfg.hidden_size, -1)
    for i in range(cfg.num_layers):
        pre_only = cfg.context_pre_only_last and i == cfg.num_layers - 1
        for stream, names in _STREAM.items():
            src, dst = f"transformer_blocks.{i}.", f"blocks.{i}.{stream}."
            for p in ("weight", "bias"):
                out[dst + "qkv." + p] = fuse_qkv(
                    *(take(src + n + "." + p) for n in names["qkv"]), num_heads=cfg.num_heads
                )
            keys = ["adaln"] + ([] if stream == "text" and pre_only else ["proj", "fc1", "fc2"])
            for key in keys:
                for p in ("weight", "bias"):
                    out[dst + key + "." + p] = take(src + names[key] + "." + p)
            if cfg.qk_norm == "rms":
                for key in ("q_norm", "k_norm"):
                    out[dst + key + ".weight"] = take(src + names[key] + ".weight")
    unused = sorted(set(sd) - used - {"pos_embed.pos_embed"})
    if unused:
        raise ValueError(f"diffusers keys not mapped (another architecture?): {unused[:8]}")
    return out
