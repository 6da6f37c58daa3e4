"""The MMDiT family's diffusers mapping: ``SD3Transformer2DModel`` state dicts and
``config.json`` <-> this project's MMDiT (TP=1), both ways. Pure torch: nothing read from
disk here (``megatron_apt.checkpoint.diffusers_dir`` reads and writes the directories).

One-to-one except two layout changes: SD3's separate ``to_q/to_k/to_v`` (and ``add_*_proj``)
become one fused QKV stored per head as ``[heads, (q, k, v), head_dim]``, and the patch-embed
Conv2d weight ``[D, C, p, p]`` becomes a linear ``[D, C*1*p*p]`` (a (1, p, p) 3D patch).
SD3.5 Medium's second ("dual") attention is not supported and is named in the error.
"""

from __future__ import annotations

import torch

from megatron_apt.models.mmdit.config import MMDiTConfig

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


# --------------------------------------------------------------------------------------
# The inverse map and the config.json mapping
# --------------------------------------------------------------------------------------

SD3_CLASS = "SD3Transformer2DModel"
SD3_CONFIG_KEYS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "out_channels",
    "pos_embed_max_size",
    "dual_attention_layers",
    "qk_norm",
)
_QK_NORM = {None: "none", "rms_norm": "rms"}


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`fuse_qkv`: ``[h*(3*hd), ...]`` -> q, k, v ``[h*hd, ...]``."""
    per_head = qkv.reshape(num_heads, 3, -1, *qkv.shape[1:])  # [heads, 3, hd, ...]
    return tuple(per_head[:, i].reshape(-1, *qkv.shape[1:]).contiguous() for i in range(3))


def sd3_config_to_mmdit(config: dict, source: str = "config.json") -> MMDiTConfig:
    """An :class:`MMDiTConfig` from a diffusers ``SD3Transformer2DModel`` ``config.json`` dict.

    ``ValueError`` naming ``source`` for another model class, SD3.5-Medium's dual attention
    layers, unknown fields or values this MMDiT does not implement.
    """
    cls = config.get("_class_name", SD3_CLASS)
    if cls != SD3_CLASS:
        raise ValueError(f"{source}: _class_name is {cls!r}, expected {SD3_CLASS!r}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in SD3_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown SD3Transformer2DModel fields {unknown}")
    c = {k: config[k] for k in SD3_CONFIG_KEYS if k in config}
    missing = sorted(set(SD3_CONFIG_KEYS) - set(c) - {"dual_attention_layers", "qk_norm"})
    if missing:
        raise ValueError(f"{source}: missing SD3Transformer2DModel fields {missing}")
    if c.get("dual_attention_layers"):
        raise ValueError(
            f"{source}: dual_attention_layers={list(c['dual_attention_layers'])} (SD3.5-Medium's "
            "second attention, attn2) is not supported by this MMDiT; use an SD3 / SD3.5-Large "
            "style model"
        )
    if c.get("qk_norm") not in _QK_NORM:
        raise ValueError(f"{source}: qk_norm={c['qk_norm']!r} is not supported (None, 'rms_norm')")
    heads, hd, p = c["num_attention_heads"], c["attention_head_dim"], c["patch_size"]
    if c["caption_projection_dim"] != heads * hd:
        raise ValueError(
            f"{source}: caption_projection_dim={c['caption_projection_dim']} differs from "
            f"num_attention_heads * attention_head_dim = {heads * hd}"
        )
    if not c["pos_embed_max_size"]:
        raise ValueError(f"{source}: pos_embed_max_size is required (SD3's cropped table)")
    return MMDiTConfig(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"] or c["in_channels"],
        patch_size=(1, p, p),
        hidden_size=heads * hd,
        num_layers=c["num_layers"],
        num_heads=heads,
        mlp_ratio=4.0,
        text_dim=c["joint_attention_dim"],
        pooled_text_dim=c["pooled_projection_dim"],
        timestep_freq_dim=256,
        timestep_scale=1000.0,
        qk_norm=_QK_NORM[c.get("qk_norm")],
        pos_embed="sincos2d",
        pos_embed_max_size=c["pos_embed_max_size"],
        pos_embed_base_size=c["sample_size"] // p,
        context_pre_only_last=True,
        norm_eps=1e-6,
    )


def mmdit_to_sd3_config(cfg: MMDiTConfig) -> dict:
    """The diffusers ``config.json`` dict of an SD3-style :class:`MMDiTConfig`; ``ValueError``
    listing every field without a diffusers equivalent (e.g. rope3d video models)."""
    if not isinstance(cfg, MMDiTConfig):
        raise ValueError(f"a {type(cfg).__name__} has no diffusers {SD3_CLASS} equivalent")
    pt, ph, pw = cfg.patch_size
    wrong = {
        "pos_embed": (cfg.pos_embed, "sincos2d"),
        "pooled_text_dim": (cfg.pooled_text_dim, "set"),
        "patch_size": (cfg.patch_size, "(1, p, p)"),
        "mlp_ratio": (cfg.mlp_ratio, 4.0),
        "timestep_freq_dim": (cfg.timestep_freq_dim, 256),
        "timestep_scale": (cfg.timestep_scale, 1000.0),
        "context_pre_only_last": (cfg.context_pre_only_last, True),
        "norm_eps": (cfg.norm_eps, 1e-6),
        "pos_embed_base_size": (cfg.pos_embed_base_size, "set"),
    }
    ok = {
        "pos_embed": cfg.pos_embed == "sincos2d",
        "pooled_text_dim": bool(cfg.pooled_text_dim),
        "patch_size": pt == 1 and ph == pw,
        "mlp_ratio": cfg.mlp_ratio == 4.0,
        "timestep_freq_dim": cfg.timestep_freq_dim == 256,
        "timestep_scale": cfg.timestep_scale == 1000.0,
        "context_pre_only_last": cfg.context_pre_only_last,
        "norm_eps": cfg.norm_eps == 1e-6,
        "pos_embed_base_size": cfg.pos_embed_base_size is not None,
    }
    bad = [f"{k}={wrong[k][0]!r} (needs {wrong[k][1]})" for k, good in ok.items() if not good]
    if bad:
        raise ValueError(
            "this model has no diffusers SD3Transformer2DModel equivalent: " + ", ".join(bad)
        )
    try:
        import diffusers

        version = diffusers.__version__
    except ImportError:  # pragma: no cover
        version = "0.42.1"
    return {
        "_class_name": SD3_CLASS,
        "_diffusers_version": version,
        "sample_size": cfg.pos_embed_base_size * ph,
        "patch_size": ph,
        "in_channels": cfg.in_channels,
        "num_layers": cfg.num_layers,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.text_dim,
        "caption_projection_dim": cfg.hidden_size,
        "pooled_projection_dim": cfg.pooled_text_dim,
        "out_channels": cfg.out_channels,
        "pos_embed_max_size": cfg.pos_embed_max_size,
        "dual_attention_layers": [],
        "qk_norm": "rms_norm" if cfg.qk_norm == "rms" else None,
    }


def sd3_pos_embed(cfg: MMDiTConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """diffusers' ``pos_embed.pos_embed`` buffer ``[1, G*G, D]`` (bit-identical to its
    ``get_2d_sincos_pos_embed``; tested)."""
    from megatron_apt.models.embeddings import sincos_2d_table

    g = cfg.pos_embed_max_size
    table = sincos_2d_table(cfg.hidden_size, g, cfg.pos_embed_base_size)
    return table.reshape(1, g * g, cfg.hidden_size).to(dtype)


def mmdit_to_sd3(
    sd: dict[str, torch.Tensor], cfg: MMDiTConfig, pos_embed: bool = True
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`sd3_to_mmdit` plus (``pos_embed``) diffusers' ``pos_embed.pos_embed``
    buffer; every key of ``sd`` must be used (``ValueError`` naming the rest)."""
    mmdit_to_sd3_config(cfg)  # refuses configs without an SD3 equivalent
    out, used = {}, set()

    def take(src: str) -> torch.Tensor:
        if src not in sd:
            raise KeyError(f"state dict has no key {src!r}")
        used.add(src)
        return sd[src]

    for ours, theirs in _TOP.items():
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = take(f"{ours}.{p}")
    p = cfg.patch_size[1]
    w = out["pos_embed.proj.weight"]
    out["pos_embed.proj.weight"] = w.reshape(cfg.hidden_size, cfg.in_channels, p, p)
    for i in range(cfg.num_layers):
        pre_only = cfg.context_pre_only_last and i == cfg.num_layers - 1
        for stream, names in _STREAM.items():
            src, dst = f"blocks.{i}.{stream}.", f"transformer_blocks.{i}."
            for p_ in ("weight", "bias"):
                parts = split_qkv(take(src + "qkv." + p_), cfg.num_heads)
                for name, t in zip(names["qkv"], parts):
                    out[dst + name + "." + p_] = t
            keys = ["adaln"] + ([] if stream == "text" and pre_only else ["proj", "fc1", "fc2"])
            for key in keys:
                for p_ in ("weight", "bias"):
                    out[dst + names[key] + "." + p_] = take(src + key + "." + p_)
            if cfg.qk_norm == "rms":
                for key in ("q_norm", "k_norm"):
                    out[dst + names[key] + ".weight"] = take(src + key + ".weight")
    unused = sorted(k for k in set(sd) - used if not k.endswith("_extra_state"))
    if unused:
        raise ValueError(f"keys without a diffusers SD3 equivalent: {unused[:8]}")
    if pos_embed:
        out["pos_embed.pos_embed"] = sd3_pos_embed(cfg, out["pos_embed.proj.weight"].dtype)
    return out


def sd3_shapes(cfg: MMDiTConfig) -> dict[str, torch.Size]:
    """Every tensor of diffusers' ``SD3Transformer2DModel`` state dict for ``cfg``: key ->
    shape, the ``pos_embed.pos_embed`` table (a persistent buffer, ``[1, G*G, D]``) included.
    Computed on a meta-device skeleton: nothing is allocated, whatever ``cfg`` claims."""
    from megatron_apt.models.builders import tensor_layout

    skeleton = {k: torch.empty(s, device="meta") for k, (s, _) in tensor_layout(cfg).items()}
    out = {k: v.shape for k, v in mmdit_to_sd3(skeleton, cfg, pos_embed=False).items()}
    g = cfg.pos_embed_max_size
    out["pos_embed.pos_embed"] = torch.Size((1, g * g, cfg.hidden_size))
    return out
