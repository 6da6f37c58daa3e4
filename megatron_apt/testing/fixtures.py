"""Tiny, seeded inputs and weights (diffusers' ``get_dummy_inputs`` idea, for the MMDiT)."""

from __future__ import annotations

import torch

from megatron_apt.models.mmdit.config import MMDiTConfig


def dummy_inputs(
    cfg: MMDiTConfig,
    batch: int = 2,
    frames: int = 1,
    height: int = 8,
    width: int = 8,
    text_len: int = 5,
    masked: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor | None]:
    """Keyword arguments of ``MMDiT.forward``: latents ``[B, C, T, H, W]``, timesteps in
    (0, 1), text ``[B, L, text_dim]``, a text mask with the last tokens of sample 1 masked
    (when ``masked``) and pooled text when the config has it. Same values on every rank."""
    g = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor | None] = {
        "latents": torch.randn(batch, cfg.in_channels, frames, height, width, generator=g),
        "timesteps": torch.rand(batch, generator=g),
        "text": torch.randn(batch, text_len, cfg.text_dim, generator=g),
        "text_mask": None,
        "pooled_text": None,
    }
    if masked:
        mask = torch.ones(batch, text_len, dtype=torch.bool)
        mask[-1, max(1, text_len // 2) :] = False
        inputs["text_mask"] = mask
    if cfg.pooled_text_dim:
        inputs["pooled_text"] = torch.randn(batch, cfg.pooled_text_dim, generator=g)
    return {
        k: (v.to(dtype) if v is not None and v.is_floating_point() else v)
        for k, v in inputs.items()
    }


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Overwrite every parameter with seeded noise (norm weights around 1), so that tests do
    not run through adaLN-Zero's zeros. Deterministic in parameter order and shape."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        if name.endswith("norm.weight"):
            noise += 1.0
        p.copy_(noise.to(p.dtype))
