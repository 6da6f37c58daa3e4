"""diffusers' ``SD3Transformer2DModel`` as a reference: the tests' tiny random SD3 transformer
and, for the benchmark, one of the same width, depth, heads and token count as an MMDiT config.

diffusers is imported only when a model is built (it is a test/benchmark dependency).
"""

from __future__ import annotations

import math

import torch

from megatron_apt.models.mmdit.config import MMDiTConfig

# diffusers' tester size (its own SD3 unit tests): the ``tiny-sd3`` preset's twin
# (hidden 4 x 16 = 64, 2 layers, text 32, pooled 24, base size 8 // 2 = 4, table 16).
TINY_SD3_KWARGS = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    caption_projection_dim=64,
    pooled_projection_dim=24,
    out_channels=4,
    pos_embed_max_size=16,
)


def sd3_transformer(**kwargs) -> torch.nn.Module:
    """``diffusers.SD3Transformer2DModel(**kwargs)`` (imported here, not at module import)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**kwargs)


def tiny_sd3_transformer(
    qk_norm: str | None = None,
    dual_attention_layers: tuple[int, ...] = (),
    *,
    randomize: bool = False,
    std: float = 0.05,
) -> torch.nn.Module:
    """The tester-size SD3 transformer (:data:`TINY_SD3_KWARGS`).

    ``randomize=False``: built as diffusers initializes it (global RNG, train mode).
    ``randomize=True``: ``torch.manual_seed(0)`` before building, eval mode, and seeded noise
    ``N(0, std^2)`` added to every weight, so that every weight matters in a comparison.
    """
    if randomize:
        torch.manual_seed(0)
    model = sd3_transformer(
        **TINY_SD3_KWARGS, qk_norm=qk_norm, dual_attention_layers=tuple(dual_attention_layers)
    )
    if randomize:
        model.eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * std)
    return model


def sd3_kwargs_like(cfg: MMDiTConfig, height: int, width: int) -> dict:
    """``SD3Transformer2DModel`` arguments for a model of ``cfg``'s size on ``height x width``
    image latents (latent units): same width (heads x head_dim), depth, heads, patch, channels,
    text width and token count.

    What cannot match is mapped to the nearest SD3 choice: positions are SD3's cropped 2-D
    sin-cos table (sized to fit the latent) whatever ``cfg.pos_embed`` is; QK norm is
    ``rms_norm`` when ``cfg.qk_norm == "rms"``; SD3 always has a pooled-text projection, so a
    config without one gets ``pooled_projection_dim = text_dim`` (the caller must feed a pooled
    vector; its cost is one [B, dim] x [dim, hidden] product). ``ValueError`` for a config whose
    size has no SD3 equivalent (a temporal patch, non-square patches, mlp_ratio != 4).
    """
    pt, ph, pw = cfg.patch_size
    bad = []
    if pt != 1:
        bad.append(f"temporal patch pt={pt} (SD3 is images-only: needs 1)")
    if ph != pw:
        bad.append(f"non-square patch {ph}x{pw}")
    if cfg.mlp_ratio != 4.0:
        bad.append(f"mlp_ratio={cfg.mlp_ratio} (SD3's FeedForward is 4x)")
    if height % ph or width % pw:
        bad.append(f"latent {height}x{width} not divisible by the patch {ph}x{pw}")
    if bad:
        raise ValueError("no same-size diffusers SD3 transformer: " + "; ".join(bad))
    grid = max(math.ceil(height / ph), math.ceil(width / pw))
    if cfg.pos_embed == "sincos2d" and cfg.pos_embed_base_size:
        sample_size = cfg.pos_embed_base_size * ph
        max_size = max(cfg.pos_embed_max_size, grid)
    else:
        sample_size, max_size = grid * ph, grid
    return dict(
        sample_size=sample_size,
        patch_size=ph,
        in_channels=cfg.in_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.text_dim,
        caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.pooled_text_dim or cfg.text_dim,
        out_channels=cfg.out_channels,
        pos_embed_max_size=max_size,
        qk_norm="rms_norm" if cfg.qk_norm == "rms" else None,
    )
