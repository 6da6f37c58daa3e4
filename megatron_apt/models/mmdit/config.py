"""MMDiT model configuration, named presets and the analytic parameter and FLOP counts.

The architecture follows the MMDiT of Esser et al. (2024), as used by SD3/SD3.5 and by the
paper's 36-layer, ~8B-parameter video model: two token streams (text and visual) with separate
weights, joint attention over their concatenation, adaLN-Zero modulation from the timestep
embedding (plus an optional pooled text vector) and a "context pre-only" last block whose text
stream only provides keys and values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

PosEmbed = Literal["rope3d", "sincos2d", "none"]
QKNorm = Literal["rms", "none"]


@dataclass(kw_only=True)
class MMDiTConfig:
    """Architecture of an MMDiT velocity model.

    Shapes: latents are ``[B, C, T, H, W]`` (T = 1 for images); patchify turns them into
    ``T/pt * H/ph * W/pw`` visual tokens of width ``hidden_size``; text embeddings are
    ``[B, L, text_dim]``.
    """

    family: ClassVar[str] = "mmdit"  # the registry name (models/families.py)

    in_channels: int = 16
    out_channels: int | None = None  # defaults to in_channels
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw)
    hidden_size: int = 1024
    num_layers: int = 4
    num_heads: int = 16
    mlp_ratio: float = 4.0
    text_dim: int = 4096  # width of the text encoder's token embeddings
    pooled_text_dim: int | None = None  # SD3 family: 2048 (CLIP-L + CLIP-G pooled)
    timestep_freq_dim: int = 256  # sinusoidal features of the timestep
    timestep_scale: float = 1000.0  # t in [0, 1] is fed to the embedding as t * scale
    qk_norm: QKNorm = "rms"
    pos_embed: PosEmbed = "rope3d"
    rope_theta: float = 10000.0
    rope_axes_dim: tuple[int, int, int] | None = None  # (t, h, w) split of head_dim
    pos_embed_max_size: int = 192  # sincos2d: side of the table that is center-cropped
    pos_embed_base_size: int | None = None  # sincos2d: SD3's base_size (sample_size // ph)
    context_pre_only_last: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self._check_types()
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(
                f"patch_size must be 3 positive ints (pt, ph, pw), got {self.patch_size}"
            )
        if self.pos_embed not in ("rope3d", "sincos2d", "none"):
            raise ValueError(f"pos_embed={self.pos_embed!r}: use 'rope3d', 'sincos2d' or 'none'")
        if self.qk_norm not in ("rms", "none"):
            raise ValueError(f"qk_norm={self.qk_norm!r}: use 'rms' or 'none'")
        if self.pos_embed == "rope3d":
            if self.rope_axes_dim is None:
                self.rope_axes_dim = default_rope_axes_dim(self.head_dim)
            self.rope_axes_dim = tuple(int(d) for d in self.rope_axes_dim)  # type: ignore
            if sum(self.rope_axes_dim) != self.head_dim or any(d % 2 for d in self.rope_axes_dim):
                raise ValueError(
                    f"rope_axes_dim={self.rope_axes_dim} must be even numbers summing to "
                    f"head_dim={self.head_dim}"
                )
        if self.pos_embed == "sincos2d" and self.hidden_size % 4 != 0:
            raise ValueError(f"sincos2d needs hidden_size % 4 == 0, got {self.hidden_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * math.prod(self.patch_size)

    @property
    def out_patch_dim(self) -> int:
        assert self.out_channels is not None
        return self.out_channels * math.prod(self.patch_size)

    def replace(self, **changes) -> MMDiTConfig:
        return dataclasses.replace(self, **changes)

    def _check_types(self) -> None:
        """Types and signs first (a config may come from an untrusted file header): one
        ``ValueError`` naming the field instead of a TypeError or ZeroDivisionError later."""

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v) -> bool:
            return (is_int(v) or isinstance(v, float)) and math.isfinite(v)

        for name in (
            "in_channels", "hidden_size", "num_layers", "num_heads", "text_dim",
            "timestep_freq_dim", "pos_embed_max_size",
        ):  # fmt: skip
            v = getattr(self, name)
            if not (is_int(v) and v >= 1):
                raise ValueError(f"{name}={v!r} must be a positive integer")
        for name in ("out_channels", "pooled_text_dim", "pos_embed_base_size"):
            v = getattr(self, name)
            if v is not None and not (is_int(v) and v >= 1):
                raise ValueError(f"{name}={v!r} must be a positive integer or None")
        for name in ("mlp_ratio", "timestep_scale", "rope_theta", "norm_eps"):
            v = getattr(self, name)
            if not (is_real(v) and v > 0):
                raise ValueError(f"{name}={v!r} must be a positive number")
        if not (is_real(self.init_std) and self.init_std >= 0):
            raise ValueError(f"init_std={self.init_std!r} must be a number >= 0")
        for name in ("patch_size", "rope_axes_dim"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (tuple, list)) and all(is_int(x) for x in v)):
                raise ValueError(f"{name}={v!r} must be a sequence of integers")
        if not isinstance(self.context_pre_only_last, bool):
            raise ValueError(f"context_pre_only_last={self.context_pre_only_last!r} must be a bool")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MMDiTConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a model config is a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MMDiTConfig fields: {unknown}")
        d = dict(d)
        for key in ("patch_size", "rope_axes_dim"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)


def default_rope_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """Split ``head_dim`` into even (t, h, w) rotary sub-dimensions, spatial axes equal."""
    if head_dim % 2:
        raise ValueError(f"rope3d needs an even head_dim, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return (head_dim - 2 * hw, hw, hw)


# --------------------------------------------------------------------------------------
# Analytic parameter count
# --------------------------------------------------------------------------------------


@dataclass
class ParamCount:
    embed: int
    blocks: int
    final: int
    per_block: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.embed + self.blocks + self.final


def count_parameters(cfg: MMDiTConfig) -> ParamCount:
    """Number of parameters of :class:`~megatron_apt.models.MMDiT` for ``cfg`` (TP-independent).

    Derived from the architecture, not from a built model, so the tests can check one against
    the other and a planner can size an 8B model without allocating it.
    """
    d, f = cfg.hidden_size, cfg.ffn_hidden_size

    def lin(i: int, o: int) -> int:
        return i * o + o

    embed = lin(cfg.patch_dim, d)  # patch embedding
    embed += lin(cfg.text_dim, d)  # text (context) embedding
    embed += lin(cfg.timestep_freq_dim, d) + lin(d, d)  # timestep MLP
    if cfg.pooled_text_dim:
        embed += lin(cfg.pooled_text_dim, d) + lin(d, d)  # pooled text MLP
    qk = 2 * cfg.head_dim if cfg.qk_norm == "rms" else 0

    def stream(pre_only: bool) -> int:
        n = lin(d, 3 * d) + qk  # fused QKV (+ q/k RMSNorm weights)
        if pre_only:
            return n + lin(d, 2 * d)  # adaLN-continuous (scale, shift)
        return n + lin(d, 6 * d) + lin(d, d) + lin(d, f) + lin(f, d)  # adaLN-Zero, out, MLP

    per_block = []
    for i in range(cfg.num_layers):
        pre_only = cfg.context_pre_only_last and i == cfg.num_layers - 1
        per_block.append(stream(False) + stream(pre_only))
    final = lin(d, 2 * d) + lin(d, cfg.out_patch_dim)
    return ParamCount(embed=embed, blocks=sum(per_block), final=final, per_block=per_block)


def forward_flops(cfg: MMDiTConfig, n_visual: int, n_text: int, batch: int = 1) -> float:
    """Analytic FLOPs of one forward (linears and attention), counted as 2 FLOPs per
    multiply-add. Linear layers: 2 x (weights that a token passes through) per token;
    attention: QK^T and AV, 2 x 2 x S^2 x hidden per layer over the joint sequence. Norms,
    RoPE, softmax and elementwise work are left out (a few percent at these widths)."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    s = n_visual + n_text
    stream_full = 3 * d * d + d * d + 2 * d * f  # qkv, out, mlp
    flops = 0.0
    for i in range(cfg.num_layers):
        pre_only = cfg.context_pre_only_last and i == cfg.num_layers - 1
        flops += 2 * n_visual * stream_full
        flops += 2 * n_text * (3 * d * d if pre_only else stream_full)
        flops += 4 * s * s * d
    flops += 2 * n_visual * (cfg.patch_dim * d + d * cfg.out_patch_dim)
    flops += 2 * n_text * cfg.text_dim * d
    return flops * batch


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------


def tiny() -> MMDiTConfig:
    """2 layers, width 64: unit tests and the CPU demo."""
    return MMDiTConfig(
        in_channels=4,
        patch_size=(1, 2, 2),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        text_dim=32,
        rope_axes_dim=(4, 6, 6),
    )


def tiny_sd3() -> MMDiTConfig:
    """2 layers, SD3-style (sin-cos positions, pooled text, no QK norm)."""
    return MMDiTConfig(
        in_channels=4,
        patch_size=(1, 2, 2),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        text_dim=32,
        pooled_text_dim=24,
        pos_embed="sincos2d",
        qk_norm="none",
        pos_embed_max_size=16,
        pos_embed_base_size=4,
    )


def demo() -> MMDiTConfig:
    """4 layers, width 128: ``make demo`` (16x16 RGB clips through the demo's trained KL VAE
    -> 4-channel 8x8 latents, 2x2 patches: 16 tokens per frame)."""
    return MMDiTConfig(
        in_channels=4,
        patch_size=(1, 2, 2),
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        text_dim=32,
    )


def mid() -> MMDiTConfig:
    """Width 512, 4 layers: benchmarks and the mid-size tests."""
    return MMDiTConfig(
        in_channels=16,
        hidden_size=512,
        num_layers=4,
        num_heads=8,
        text_dim=512,
    )


def mmdit_8b() -> MMDiTConfig:
    """The paper's model: 36 dual-stream layers, ~8B parameters, 3D RoPE, T5-XXL text.

    The paper gives depth (36) and size (8B) but not the width; hidden 2560 with 20 heads of
    128 is the 128-aligned width that lands nearest 8B at mlp_ratio 4 (see tools/plan_model.py).
    """
    return MMDiTConfig(
        in_channels=16,
        patch_size=(1, 2, 2),
        hidden_size=2560,
        num_layers=36,
        num_heads=20,
        text_dim=4096,
        pos_embed="rope3d",
        qk_norm="rms",
    )


def sd3_medium() -> MMDiTConfig:
    """Stable Diffusion 3 Medium (diffusers ``SD3Transformer2DModel`` defaults, 2.03B)."""
    return MMDiTConfig(
        in_channels=16,
        patch_size=(1, 2, 2),
        hidden_size=1536,
        num_layers=24,
        num_heads=24,
        text_dim=4096,
        pooled_text_dim=2048,
        pos_embed="sincos2d",
        qk_norm="none",
        pos_embed_max_size=192,
        pos_embed_base_size=64,
    )


def sd35_large() -> MMDiTConfig:
    """Stable Diffusion 3.5 Large (38 layers, hidden 2432, RMS QK norm)."""
    return MMDiTConfig(
        in_channels=16,
        patch_size=(1, 2, 2),
        hidden_size=2432,
        num_layers=38,
        num_heads=38,
        text_dim=4096,
        pooled_text_dim=2048,
        pos_embed="sincos2d",
        qk_norm="rms",
        pos_embed_max_size=192,
        pos_embed_base_size=64,
    )


PRESETS: dict[str, Callable[[], MMDiTConfig]] = {
    "tiny": tiny,
    "tiny-sd3": tiny_sd3,
    "demo": demo,
    "mid": mid,
    "mmdit-8b": mmdit_8b,
    "sd3-medium": sd3_medium,
    "sd3.5-large": sd35_large,
}


def get_preset(name: str, **overrides) -> MMDiTConfig:
    """The named preset with ``overrides`` applied (``ValueError`` for an unknown name)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
