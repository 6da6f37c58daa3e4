"""Analytic FLOPs of one MMDiT forward (matmuls of the linear layers + attention).

Counted as 2 FLOPs per multiply-add. Linear layers: 2 x (weights that a token passes through)
per token; attention: QK^T and AV, 2 x 2 x S^2 x hidden per layer over the joint sequence.
Norms, RoPE, softmax and elementwise work are left out (a few percent at these widths).
"""

from __future__ import annotations

from megatron_apt.config.model import MMDiTConfig


def visual_tokens(cfg: MMDiTConfig, frames: int, height: int, width: int) -> int:
    """Tokens of a latent ``[C, frames, height, width]`` after patchify (sizes in latents)."""
    pt, ph, pw = cfg.patch_size
    return (frames // pt) * (height // ph) * (width // pw)


def forward_flops(cfg: MMDiTConfig, n_visual: int, n_text: int, batch: int = 1) -> float:
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
