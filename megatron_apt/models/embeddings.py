"""Patchify/unpatchify and the position and timestep embeddings of the MMDiT.

Pure functions of shapes and config; every table is computed in float64/float32 and cast by
the caller. The sin-cos table reproduces SD3's (diffusers ``get_2d_sincos_pos_embed`` with a
center crop of a ``pos_embed_max_size`` grid), so SD3-family weights load exactly.
"""

from __future__ import annotations

import math

import torch


def check_latent_shape(latents: torch.Tensor, in_channels: int, patch: tuple[int, int, int]):
    """Validate ``[B, C, T, H, W]`` against the model; raise ``ValueError`` naming the mismatch."""
    if latents.dim() != 5:
        raise ValueError(
            f"latents must be [B, C, T, H, W] (T=1 for images), got shape {tuple(latents.shape)}"
        )
    b, c, t, h, w = latents.shape
    if c != in_channels:
        raise ValueError(f"latents have {c} channels, the model expects in_channels={in_channels}")
    for name, size, p in (("T", t, patch[0]), ("H", h, patch[1]), ("W", w, patch[2])):
        if size % p:
            raise ValueError(f"latent {name}={size} is not divisible by its patch size {p}")


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """``[B, C, T, H, W]`` -> ``[B, N, C*pt*ph*pw]``; tokens in (t, h, w) raster order and
    features in (C, pt, ph, pw) order (a Conv2d/Conv3d weight flattened)."""
    b, c, t, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, T', H', W', C, pt, ph, pw]
    return x.reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(
    tokens: torch.Tensor, patch: tuple[int, int, int], grid: tuple[int, int, int], channels: int
) -> torch.Tensor:
    """``[B, N, pt*ph*pw*C]`` (features in (pt, ph, pw, C) order, as SD3's ``proj_out``)
    -> ``[B, C, T, H, W]``."""
    b = tokens.shape[0]
    gt, gh, gw = grid
    pt, ph, pw = patch
    x = tokens.reshape(b, gt, gh, gw, pt, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, T', pt, H', ph, W', pw]
    return x.reshape(b, channels, gt * pt, gh * ph, gw * pw)


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[B, dim]`` of (already scaled) timesteps ``[B]``, cos first
    (diffusers ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)``)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d_table(dim: int, grid_size: int, base_size: int | None = None) -> torch.Tensor:
    """SD3's 2-D sin-cos table ``[grid_size, grid_size, dim]`` (float32), indexed [row, col].

    Positions are ``arange(grid) / (grid / base_size)``; the first half of the channels
    encodes the column, the second half the row (diffusers' meshgrid(w, h) convention).
    """
    base = grid_size if base_size is None else base_size
    coords = torch.arange(grid_size, dtype=torch.float64) / (grid_size / base)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    return emb.reshape(grid_size, grid_size, dim).float()


def crop_sincos_2d(table: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Center crop ``[G, G, D]`` -> ``[grid_h * grid_w, D]`` (SD3's ``cropped_pos_embed``)."""
    g = table.shape[0]
    if grid_h > g or grid_w > g:
        raise ValueError(
            f"latent grid {grid_h}x{grid_w} (after patchify) exceeds pos_embed_max_size={g}"
        )
    top, left = (g - grid_h) // 2, (g - grid_w) // 2
    return table[top : top + grid_h, left : left + grid_w].reshape(grid_h * grid_w, -1)


def rope_3d(
    grid: tuple[int, int, int],
    axes_dim: tuple[int, int, int],
    theta: float = 10000.0,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary angles of the ``grid`` = (T', H', W') visual tokens: ``(cos, sin)``, each
    ``[N, head_dim / 2]`` float32, one angle per channel pair, axes concatenated (t, h, w)."""
    gt, gh, gw = grid
    pos = (
        torch.stack(
            torch.meshgrid(
                torch.arange(gt, device=device),
                torch.arange(gh, device=device),
                torch.arange(gw, device=device),
                indexing="ij",
            ),
            dim=-1,
        )
        .reshape(-1, 3)
        .double()
    )  # [N, 3]
    angles = []
    for axis, d in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
        angles.append(pos[:, axis, None] * freqs[None])
    ang = torch.cat(angles, dim=1)  # [N, head_dim/2]
    return torch.cos(ang).float(), torch.sin(ang).float()


def rope_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``cos + i sin`` as ``[N, 1, 1, head_dim/2]`` complex64, broadcastable over ``[N, b,
    heads, head_dim/2]``: built once per forward and shared by every block."""
    return torch.complex(cos.float(), sin.float())[:, None, None, :]


def apply_rotation(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of ``x [N, b, heads, head_dim]`` by
    :func:`rope_rotation`; computed in float32, returned in ``x.dtype``.

    One complex multiplication per pair, ``(x0 + i x1)(cos + i sin)``, instead of four real
    products, a sum, a difference and a stack: the same numbers, fewer passes over the tensor
    in forward and backward; autograd keeps only the (shared) rotation."""
    xf = x.float()
    if torch.compiler.is_compiling():  # real arithmetic: no complex views, no stride checks
        x0, x1 = xf.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = rotation.real, rotation.imag
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.flatten(-2).to(x.dtype)
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(s % 2 for s in xf.stride()[:-1]):
        xf = xf.contiguous()
    xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rotation).flatten(-2).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of ``x [N, b, heads, head_dim]`` by the angles
    ``[N, head_dim/2]`` (``cos``, ``sin`` of :func:`rope_3d`); float32 math, ``x.dtype`` out."""
    return apply_rotation(x, rope_rotation(cos, sin))
