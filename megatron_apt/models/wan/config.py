"""Wan2.1 configuration, named presets and the analytic parameter count.

Field names follow diffusers' ``WanTransformer3DModel.__init__`` (diffusers 0.42.1,
models/transformers/transformer_wan.py:571-590) where they mean the same thing, so that a
diffusers ``config.json`` maps onto a :class:`WanConfig` field for field
(:func:`megatron_apt.models.wan.diffusers_mapping.wan_config_from_diffusers`). The presets are the
public Wan2.1 text-to-video transformers: ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` (12 heads of
128, ffn 8960, 30 layers) and ``Wan-AI/Wan2.1-T2V-14B-Diffusers`` (40 heads of 128, ffn 13824,
40 layers: diffusers' defaults), both with umT5-XXL text (4096 wide), 256 timestep
frequencies, 16 latent channels, (1, 2, 2) patches, RMSNorm of q and k across all heads,
an affine LayerNorm before the cross-attention, eps 1e-6, a 1024-position RoPE table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

WanQKNorm = Literal["rms_norm_across_heads"]


@dataclass(kw_only=True)
class WanConfig:
    """Architecture of a Wan2.1 text-to-video DiT.

    Shapes: latents ``[B, C, T, H, W]`` are cut into ``T/pt * H/ph * W/pw`` visual tokens of
    width ``hidden_size = num_heads * head_dim``; text is ``[B, L, text_dim]`` (umT5 tokens).
    """

    family: ClassVar[str] = "wan"  # the registry name (models/families.py)

    in_channels: int = 16
    out_channels: int | None = None  # defaults to in_channels
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw)
    num_heads: int = 12
    head_dim: int = 128
    ffn_dim: int = 8960
    num_layers: int = 30
    text_dim: int = 4096
    freq_dim: int = 256  # sinusoidal features of the timestep
    timestep_scale: float = 1000.0  # t in [0, 1] is fed to the embedding as t * scale
    qk_norm: WanQKNorm = "rms_norm_across_heads"
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_max_seq_len: int = 1024  # positions per axis of diffusers' RoPE table
    init_std: float = 0.02

    def __post_init__(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in (
            "in_channels", "num_heads", "head_dim", "ffn_dim", "num_layers", "text_dim",
            "freq_dim", "rope_max_seq_len",
        ):  # fmt: skip
            v = getattr(self, name)
            if not (is_int(v) and v >= 1):
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if not (is_int(self.out_channels) and self.out_channels >= 1):
            raise ValueError(f"out_channels={self.out_channels!r} must be a positive integer")
        for name in ("timestep_scale", "eps", "rope_theta"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r} must be a positive number")
        p = self.patch_size
        if not (
            isinstance(p, (tuple, list)) and len(p) == 3 and all(is_int(x) and x >= 1 for x in p)
        ):
            raise ValueError(f"patch_size must be 3 positive ints (pt, ph, pw), got {p!r}")
        self.patch_size = tuple(p)  # type: ignore[assignment]
        if self.qk_norm != "rms_norm_across_heads":
            # diffusers builds RMSNorm(q), RMSNorm(k) over all heads whatever qk_norm says
            # (transformer_wan.py:208-209; WanTransformerBlock ignores its qk_norm argument)
            raise ValueError(f"qk_norm={self.qk_norm!r}: only 'rms_norm_across_heads' exists")
        if not isinstance(self.cross_attn_norm, bool):
            raise ValueError(f"cross_attn_norm={self.cross_attn_norm!r} must be a bool")
        if self.head_dim % 2:
            raise ValueError(f"3D RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def ffn_hidden_size(self) -> int:
        return self.ffn_dim

    @property
    def pooled_text_dim(self) -> None:
        """Wan has no pooled text vector (the MMDiT's input checks read this)."""
        return None

    @property
    def rope_axes_dim(self) -> tuple[int, int, int]:
        """(t, h, w) rotary channels: h = w = 2 * (head_dim // 6), t the rest
        (``WanRotaryPosEmbed``, transformer_wan.py:368-369): (44, 42, 42) for 128."""
        hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * hw, hw, hw)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * math.prod(self.patch_size)

    @property
    def out_patch_dim(self) -> int:
        assert self.out_channels is not None
        return self.out_channels * math.prod(self.patch_size)

    def replace(self, **changes) -> WanConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WanConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown WanConfig fields: {unknown}")
        return cls(**d)


def count_parameters(cfg: WanConfig) -> int:
    """Parameters of :class:`~megatron_apt.models.wan.WanDiT` for ``cfg`` (TP-independent),
    from the architecture alone (a planner sizes the 14B without building it)."""
    d, f = cfg.hidden_size, cfg.ffn_dim

    def lin(i: int, o: int) -> int:
        return i * o + o

    embed = lin(cfg.patch_dim, d)  # patch embedding (diffusers: a Conv3d)
    embed += lin(cfg.text_dim, d) + lin(d, d)  # text projection (linear, GELU-tanh, linear)
    embed += lin(cfg.freq_dim, d) + lin(d, d)  # time embedder
    embed += lin(d, 6 * d)  # shared time projection to the six modulation vectors
    attn = 4 * lin(d, d) + 2 * d  # q, k, v, out + RMSNorm(q), RMSNorm(k) across heads
    block = 2 * attn + lin(d, f) + lin(f, d) + 6 * d  # self, cross, FFN, scale_shift_table
    block += 2 * d if cfg.cross_attn_norm else 0  # affine LayerNorm before the cross-attention
    final = lin(d, cfg.out_patch_dim) + 2 * d  # output projection + its (shift, scale) table
    return embed + cfg.num_layers * block + final


def wan_debug() -> WanConfig:
    """2 layers, 4 heads of 16 (width 64): the unit tests' model."""
    return WanConfig(
        in_channels=4,
        num_heads=4,
        head_dim=16,
        ffn_dim=96,
        num_layers=2,
        text_dim=32,
        freq_dim=32,
    )


def wan21_t2v_1_3b() -> WanConfig:
    """Wan2.1 T2V 1.3B: width 1536 (12 x 128), ffn 8960, 30 layers."""
    return WanConfig(num_heads=12, head_dim=128, ffn_dim=8960, num_layers=30)


def wan21_t2v_14b() -> WanConfig:
    """Wan2.1 T2V 14B: width 5120 (40 x 128), ffn 13824, 40 layers."""
    return WanConfig(num_heads=40, head_dim=128, ffn_dim=13824, num_layers=40)


def demo_wan() -> WanConfig:
    """4 layers, 4 heads of 32 (width 128), FFN 512: the Wan-family twin of the MMDiT `demo`
    preset (`make demo DEMO_ARGS="--arch wan"`: 4-channel 8x8 latents, 1x2x2 patches, the
    demo's 32-wide T5 text)."""
    return WanConfig(
        in_channels=4,
        num_heads=4,
        head_dim=32,
        ffn_dim=512,
        num_layers=4,
        text_dim=32,
    )


WAN_PRESETS: dict[str, Callable[[], WanConfig]] = {
    "wan-debug": wan_debug,
    "demo-wan": demo_wan,
    "wan2.1-t2v-1.3b": wan21_t2v_1_3b,
    "wan2.1-t2v-14b": wan21_t2v_14b,
}


def get_wan_preset(name: str, **overrides) -> WanConfig:
    """The named Wan preset with ``overrides`` applied (``ValueError`` for an unknown name)."""
    if name not in WAN_PRESETS:
        raise ValueError(f"unknown Wan preset {name!r}; choose one of {sorted(WAN_PRESETS)}")
    cfg = WAN_PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg


def forward_flops(cfg: WanConfig, n_visual: int, n_text: int, batch: int = 1) -> float:
    """Analytic FLOPs of one forward (2 per multiply-add; linears and attention, as
    :func:`megatron_apt.models.mmdit.config.forward_flops` counts the MMDiT's): per block the
    self-attention (q, k, v, out and QK^T, AV over the visual tokens), the cross-attention
    (q and out on the visual tokens, k and v on the text, QK^T and AV visual x text) and the
    FFN; plus the patch, text and output projections. Norms, RoPE, softmax and the time
    embedding are left out."""
    d, f, nv, nt = cfg.hidden_size, cfg.ffn_dim, n_visual, n_text
    block = 2 * nv * 4 * d * d + 4 * nv * nv * d  # self-attention
    block += 2 * nv * 2 * d * d + 2 * nt * 2 * d * d + 4 * nv * nt * d  # cross-attention
    block += 2 * nv * 2 * d * f  # FFN
    embed = 2 * nv * (cfg.patch_dim * d + d * cfg.out_patch_dim)
    embed += 2 * nt * (cfg.text_dim * d + d * d)  # text projection (two linears)
    return float(cfg.num_layers * block + embed) * batch
