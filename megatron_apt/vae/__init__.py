"""VAE wrappers with one interface: pixels [B, 3, T, H, W] in [-1, 1] <-> normalized latents."""

from megatron_apt.vae.autoencoders import (
    VAE,
    DiffusersImageVAE,
    IdentityVAE,
    WanVideoVAE,
    build_tiny_vae,
    init_tiny_vae,
    load_vae,
)

__all__ = [
    "VAE",
    "DiffusersImageVAE",
    "IdentityVAE",
    "WanVideoVAE",
    "build_tiny_vae",
    "init_tiny_vae",
    "load_vae",
]
