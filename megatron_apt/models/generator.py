"""The one-step generator (paper section 3.2, eq. 5): G(z, c) = z - Ĝ(z, c, T).

Ĝ is an :class:`~megatron_apt.models.mmdit.model.MMDiT` velocity model initialized from the
consistency-distilled weights and always evaluated at the final timestep T (t = 1 on our
[0, 1] scale). The zero-shot two-step sampler takes the one-step sample to an intermediate
time and applies Ĝ once more there, which the paper reports adds detail.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_apt.models.mmdit.model import MMDiT


class Generator(nn.Module):
    """``G(z, c) = z - Ĝ(z, c, T)`` around a velocity model."""

    def __init__(self, velocity_model: MMDiT, final_t: float = 1.0):
        super().__init__()
        if not 0.0 < final_t <= 1.0:
            raise ValueError(f"final_t={final_t} must lie in (0, 1]")
        self.model, self.final_t = velocity_model, final_t

    @property
    def cfg(self):
        return self.model.cfg

    def forward(
        self,
        noise: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        pooled_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One-step sample ``[B, C, T, H, W]`` from noise ``z`` of the same shape
        (``text_mask`` on the host, as for the MMDiT: ``models/inputs.py``)."""
        t = torch.full((noise.shape[0],), self.final_t, device=noise.device, dtype=torch.float32)
        v = self.model(noise, t, text, text_mask, pooled_text)
        return noise - self.final_t * v.to(noise.dtype)

    @torch.no_grad()
    def sample(
        self,
        noise: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        pooled_text: torch.Tensor | None = None,
        steps: int = 1,
        t_mid: float = 0.5,
        renoise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``steps=1``: G(z, c). ``steps=2`` (zero-shot): x1 = G(z, c), then
        ``x_mid = (1 - t_mid) x1 + t_mid n`` and ``x = x_mid - t_mid Ĝ(x_mid, c, t_mid)``, with
        ``n = z`` (the Euler step of the ODE through ``[1, t_mid, 0]``) unless fresh noise
        ``renoise`` is given (consistency-model style multistep)."""
        if steps not in (1, 2):
            raise ValueError(f"steps={steps}: the generator samples in 1 or 2 steps")
        x = self(noise, text, text_mask, pooled_text)
        if steps == 1:
            return x
        if not 0.0 < t_mid < self.final_t:
            raise ValueError(f"t_mid={t_mid} must lie in (0, {self.final_t})")
        n = noise if renoise is None else renoise
        x_mid = (1 - t_mid) * x + t_mid * n
        t = torch.full((noise.shape[0],), t_mid, device=noise.device, dtype=torch.float32)
        return x_mid - t_mid * self.model(x_mid, t, text, text_mask, pooled_text).to(x.dtype)
