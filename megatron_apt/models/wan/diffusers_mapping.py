"""diffusers ``WanTransformer3DModel`` <-> :class:`~megatron_apt.models.wan.WanDiT` state
dicts (TP=1) and configs, both ways, exact inverses.

One rule per tensor; three kinds of layout change:

* the per-head fusions: ``attn1.to_q/to_k/to_v`` -> ``self_attn.qkv`` laid out
  ``[heads, (q, k, v), head_dim]`` and ``attn2.to_k/to_v`` -> ``cross_attn.kv`` laid out
  ``[heads, (k, v), head_dim]`` (weights and biases), so a contiguous TP split keeps whole heads;
* the patch embedding's Conv3d weight ``[h, C, pt, ph, pw]`` -> a linear ``[h, C*pt*ph*pw]``
  (stride = kernel, so the same numbers; the features in (C, pt, ph, pw) order as
  :func:`~megatron_apt.models.embeddings.patchify`);
* the modulation tables ``[1, 6, h]`` / ``[1, 2, h]`` -> ``[6, h]`` / ``[2, h]``.

Both directions first check the keys and shapes of the whole input against those the config
implies, and refuse with every missing and unexpected key named, or the first wrong shape
with its key, the shape found and the one expected. Pure torch: no checkpoint code, nothing
read from disk here (the caller reads safetensors; nothing is unpickled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_apt.models.wan.config import WanConfig

WAN_CLASS = "WanTransformer3DModel"


@dataclass(frozen=True)
class Rule:
    """One tensor of ours made of ``theirs`` (one key, or several fused per head)."""

    ours: str
    theirs: tuple[str, ...]
    theirs_shapes: tuple[tuple[int, ...], ...]
    ours_shape: tuple[int, ...]
    fuse_heads: int = 0  # > 0: fuse ``theirs`` per head into [heads, len(theirs), hd, ...]


def _rules(cfg: WanConfig) -> list[Rule]:
    d, f = cfg.hidden_size, cfg.ffn_dim
    rules: list[Rule] = []

    def lin(ours: str, theirs: str, i: int, o: int) -> None:
        rules.append(Rule(f"{ours}.weight", (f"{theirs}.weight",), ((o, i),), (o, i)))
        rules.append(Rule(f"{ours}.bias", (f"{theirs}.bias",), ((o,),), (o,)))

    def vec(ours: str, theirs: str, shape_theirs: tuple[int, ...], shape_ours: tuple[int, ...]):
        rules.append(Rule(ours, (theirs,), (shape_theirs,), shape_ours))

    def fused(ours: str, theirs: list[str], i: int) -> None:
        n = len(theirs)
        for p, shape in (("weight", (d, i)), ("bias", (d,))):
            rules.append(
                Rule(
                    f"{ours}.{p}",
                    tuple(f"{t}.{p}" for t in theirs),
                    (shape,) * n,
                    (n * d, *shape[1:]),
                    fuse_heads=cfg.num_heads,
                )
            )

    conv = (d, cfg.in_channels, *cfg.patch_size)
    vec("patch_embed.weight", "patch_embedding.weight", conv, (d, cfg.patch_dim))
    vec("patch_embed.bias", "patch_embedding.bias", (d,), (d,))
    ce = "condition_embedder"
    lin("time_embed.linear_1", f"{ce}.time_embedder.linear_1", cfg.freq_dim, d)
    lin("time_embed.linear_2", f"{ce}.time_embedder.linear_2", d, d)
    lin("time_proj", f"{ce}.time_proj", d, 6 * d)
    lin("text_embed.linear_1", f"{ce}.text_embedder.linear_1", cfg.text_dim, d)
    lin("text_embed.linear_2", f"{ce}.text_embedder.linear_2", d, d)
    for i in range(cfg.num_layers):
        ours, theirs = f"blocks.{i}.", f"blocks.{i}."
        for mine, attn in (("self_attn", "attn1"), ("cross_attn", "attn2")):
            a, t = ours + mine, theirs + attn
            if mine == "self_attn":
                fused(f"{a}.qkv", [f"{t}.to_q", f"{t}.to_k", f"{t}.to_v"], d)
            else:
                lin(f"{a}.q", f"{t}.to_q", d, d)
                fused(f"{a}.kv", [f"{t}.to_k", f"{t}.to_v"], d)
            vec(f"{a}.q_norm.weight", f"{t}.norm_q.weight", (d,), (d,))
            vec(f"{a}.k_norm.weight", f"{t}.norm_k.weight", (d,), (d,))
            lin(f"{a}.proj", f"{t}.to_out.0", d, d)
        if cfg.cross_attn_norm:
            vec(ours + "cross_norm.weight", theirs + "norm2.weight", (d,), (d,))
            vec(ours + "cross_norm.bias", theirs + "norm2.bias", (d,), (d,))
        lin(ours + "fc1", theirs + "ffn.net.0.proj", d, f)
        lin(ours + "fc2", theirs + "ffn.net.2", f, d)
        vec(ours + "scale_shift_table", theirs + "scale_shift_table", (1, 6, d), (6, d))
    lin("final_proj", "proj_out", d, cfg.out_patch_dim)
    vec("final_scale_shift_table", "scale_shift_table", (1, 2, d), (2, d))
    return rules


def diffusers_shapes(cfg: WanConfig) -> dict[str, torch.Size]:
    """The state dict of diffusers' ``WanTransformer3DModel`` for ``cfg``: key -> shape."""
    return {k: torch.Size(s) for r in _rules(cfg) for k, s in zip(r.theirs, r.theirs_shapes)}


def wan_shapes(cfg: WanConfig) -> dict[str, torch.Size]:
    """Our (TP=1) state dict for ``cfg``: key -> shape."""
    return {r.ours: torch.Size(r.ours_shape) for r in _rules(cfg)}


def check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, torch.Size], what: str):
    """``ValueError`` naming every missing and unexpected key, else the first wrong shape."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{what} does not fit the config: missing keys {missing}, unexpected keys {unexpected}"
        )
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise ValueError(
                f"{what}: {k} has shape {tuple(sd[k].shape)}, the config needs {tuple(shape)}"
            )


def fuse_heads(parts: list[torch.Tensor], num_heads: int) -> torch.Tensor:
    """``[h*hd, ...]`` x n -> ``[h*(n*hd), ...]`` in per-head order (head-major)."""
    per_head = [t.reshape(num_heads, -1, *t.shape[1:]) for t in parts]
    fused = torch.stack(per_head, dim=1)  # [heads, n, hd, ...]
    return fused.reshape(-1, *parts[0].shape[1:])


def split_heads(fused: torch.Tensor, n: int, num_heads: int) -> list[torch.Tensor]:
    """Inverse of :func:`fuse_heads`."""
    per_head = fused.reshape(num_heads, n, -1, *fused.shape[1:])  # [heads, n, hd, ...]
    return [per_head[:, i].reshape(-1, *fused.shape[1:]).contiguous() for i in range(n)]


def diffusers_to_wan(sd: dict[str, torch.Tensor], cfg: WanConfig) -> dict[str, torch.Tensor]:
    """A diffusers ``WanTransformer3DModel`` state dict -> ours (TP=1). Every key is used;
    tensors keep their dtype (the fused ones are new tensors, the others reshaped views)."""
    check_state_dict(sd, diffusers_shapes(cfg), f"diffusers {WAN_CLASS} state dict")
    out = {}
    for r in _rules(cfg):
        if r.fuse_heads:
            out[r.ours] = fuse_heads([sd[k] for k in r.theirs], r.fuse_heads)
        else:
            out[r.ours] = sd[r.theirs[0]].reshape(r.ours_shape)
    return out


def wan_to_diffusers(sd: dict[str, torch.Tensor], cfg: WanConfig) -> dict[str, torch.Tensor]:
    """Ours (TP=1) -> a diffusers ``WanTransformer3DModel`` state dict; the exact inverse of
    :func:`diffusers_to_wan`. Transformer Engine's ``_extra_state`` entries are dropped."""
    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    check_state_dict(sd, wan_shapes(cfg), "Wan state dict")
    out = {}
    for r in _rules(cfg):
        if r.fuse_heads:
            parts = split_heads(sd[r.ours], len(r.theirs), r.fuse_heads)
            out.update(zip(r.theirs, parts))
        else:
            out[r.theirs[0]] = sd[r.ours].reshape(r.theirs_shapes[0])
    return out


# --------------------------------------------------------------------------------------
# config.json <-> WanConfig
# --------------------------------------------------------------------------------------

_UNSUPPORTED_NULL = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")  # image-to-video
_KNOWN = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
    "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps",
    "rope_max_seq_len", *_UNSUPPORTED_NULL,
)  # fmt: skip
_DEFAULTS = dict(  # WanTransformer3DModel.__init__ defaults (tw:574-589)
    patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16,
    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip


def wan_config_from_diffusers(config: dict, source: str = "config.json") -> WanConfig:
    """A :class:`WanConfig` from a diffusers ``WanTransformer3DModel`` config dict (absent
    fields take diffusers' defaults); ``ValueError`` naming ``source`` for another class,
    unknown fields, or the image-to-video fields (not supported)."""
    cls = config.get("_class_name", WAN_CLASS)
    if cls != WAN_CLASS:
        raise ValueError(f"{source}: _class_name is {cls!r}, expected {WAN_CLASS!r}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _KNOWN)
    if unknown:
        raise ValueError(f"{source}: unknown {WAN_CLASS} fields {unknown}")
    i2v = {k: config[k] for k in _UNSUPPORTED_NULL if config.get(k) is not None}
    if i2v:
        raise ValueError(f"{source}: image-to-video fields {i2v} are not supported")
    c = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
    if c["qk_norm"] is None:  # diffusers builds the across-heads RMSNorm anyway (tw:208-209)
        c["qk_norm"] = "rms_norm_across_heads"
    return WanConfig(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"] or c["in_channels"],
        patch_size=tuple(c["patch_size"]),
        num_heads=c["num_attention_heads"],
        head_dim=c["attention_head_dim"],
        ffn_dim=c["ffn_dim"],
        num_layers=c["num_layers"],
        text_dim=c["text_dim"],
        freq_dim=c["freq_dim"],
        qk_norm=c["qk_norm"],
        cross_attn_norm=c["cross_attn_norm"],
        eps=c["eps"],
        rope_max_seq_len=c["rope_max_seq_len"],
    )


def wan_config_to_diffusers(cfg: WanConfig) -> dict:
    """The diffusers ``config.json`` dict of ``cfg``; ``ValueError`` for fields diffusers
    hard-codes (RoPE theta 10000, timestep scale 1000)."""
    bad = []
    if cfg.rope_theta != 10000.0:
        bad.append(f"rope_theta={cfg.rope_theta} (diffusers: 10000)")
    if cfg.timestep_scale != 1000.0:
        bad.append(f"timestep_scale={cfg.timestep_scale} (diffusers takes t * 1000)")
    if bad:
        raise ValueError(f"no diffusers {WAN_CLASS} equivalent: " + ", ".join(bad))
    return {
        "_class_name": WAN_CLASS,
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": cfg.qk_norm,
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": cfg.rope_max_seq_len,
        "pos_embed_seq_len": None,
    }
