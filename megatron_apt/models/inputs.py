"""The MMDiT's inputs: their shapes, the timestep range, and where each one may live.

Devices (the contract with the trainer and the pipelines): ``latents``, ``text``,
``pooled_text`` and ``timesteps`` on the compute device; ``text_mask`` on the host (a CPU bool
tensor), even when the model runs on CUDA. The model reads the mask's values on the host
(all real? right-padded? lengths, the valid keys' positions) and copies to the device only
what the kernels take, without blocking (:mod:`megatron_apt.models.masks`): a forward then
makes no host synchronization. A ``text_mask`` on the device works too, at the price of one
synchronization per forward (is every token real?) and, with padded text under the TE or
flash-attn kernels, three more (the varlen analysis of
:class:`~megatron_apt.models.specs.KeyMask`). Timesteps given on the host are moved to the
device by the model.

The timestep range: the model takes ``t`` in [0, 1]; SD3 / diffusers code passes ``sigma *
1000``, and a model fed that would train or sample silently wrong. Checking the range reads
the values: free on the host, a host synchronization on the device. So
:class:`TimestepRangeCheck` checks every call whose timesteps are on the host, and only the
first call (per model) whose timesteps are on the device: a caller's convention does not
change between its calls, and a wrong one fails at once with the message; later calls cost
nothing.
"""

from __future__ import annotations

import torch

from megatron_apt.models.embeddings import check_latent_shape
from megatron_apt.models.mmdit.config import MMDiTConfig


def check_input_shapes(cfg: MMDiTConfig, latents, timesteps, text, text_mask, pooled_text) -> None:
    """Shapes of the forward's inputs against the config (``ValueError`` naming the input);
    reads no values."""
    check_latent_shape(latents, cfg.in_channels, cfg.patch_size)
    b = latents.shape[0]
    if timesteps.shape != (b,):
        raise ValueError(f"timesteps must be [B]={b}, got shape {tuple(timesteps.shape)}")
    if text.dim() != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
        raise ValueError(
            f"text must be [B={b}, L, text_dim={cfg.text_dim}], got {tuple(text.shape)}"
        )
    if text_mask is not None and text_mask.shape != text.shape[:2]:
        raise ValueError(
            f"text_mask must be [B, L]={tuple(text.shape[:2])}, got {tuple(text_mask.shape)}"
        )
    if (pooled_text is None) != (cfg.pooled_text_dim is None):
        raise ValueError(
            f"pooled_text is {'missing' if pooled_text is None else 'given'} but the model "
            f"has pooled_text_dim={cfg.pooled_text_dim}"
        )
    if pooled_text is not None and pooled_text.shape != (b, cfg.pooled_text_dim):
        raise ValueError(
            f"pooled_text must be [B={b}, {cfg.pooled_text_dim}], got {tuple(pooled_text.shape)}"
        )


class TimestepRangeCheck:
    """Refuses timesteps outside [0, 1]: on every call with host timesteps, on the first
    ``device_checks`` calls with device timesteps (module docstring)."""

    def __init__(self, device_checks: int = 1):
        self.device_checks_left = device_checks

    def __call__(self, timesteps: torch.Tensor, timestep_scale: float) -> None:
        if timesteps.device.type != "cpu":
            if self.device_checks_left <= 0:
                return
            self.device_checks_left -= 1
        lo, hi = torch.stack(torch.aminmax(timesteps.detach().float())).tolist()  # one read
        if lo < 0.0 or hi > 1.0:  # the classic slip: passing SD3's sigma * 1000
            raise ValueError(
                f"timesteps must lie in [0, 1] (0 = data, 1 = noise), got [{lo:g}, {hi:g}]; "
                f"the model scales them by timestep_scale={timestep_scale:g} itself"
            )
