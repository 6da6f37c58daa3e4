"""VAE wrappers: pixels ``[B, 3, T, H, W]`` in [-1, 1] <-> latents ``[B, C, T', H', W']``.

Every wrapper has the same interface (:class:`VAE`), so preprocessing and generation never look
at the model behind it:

* ``encode`` returns latents ALREADY normalized for the diffusion model (shift/scale applied
  inside), deterministic by default (the posterior's mode; ``sample=True`` draws from it);
* ``decode`` undoes the normalization and returns pixels clamped to [-1, 1];
* ``latent_shape(frames, height, width)`` gives ``(C, T', H', W')`` and raises a ``ValueError``
  for a pixel size the VAE cannot take.

Outputs of both directions are float32 whatever the VAE's dtype. ``T = 1`` for images.

Supported (``load_vae(spec)``):

* ``"identity"``, ``"identity:<p>"`` or ``"identity:<p>:<shift>:<scale>"``:
  :class:`IdentityVAE`, pixels are the latents after a ``p x p`` pixel-unshuffle per frame
  (``C = 3 p^2``, ``H' = H / p``), normalized as ``(pixels - shift) * scale``; for toy demos.
* a local diffusers directory (or ``"tiny:<dir>"``, e.g. from :func:`build_tiny_vae`; a model
  directory with a ``vae/`` subfolder also works), dispatched on ``config.json``'s
  ``_class_name``:

  - ``AutoencoderKL`` (image VAE, e.g. SD3's): applied frame by frame, ``T' = T``;
    ``latents = (mean - shift_factor) * scaling_factor``, or with per-channel
    ``latents_mean``/``latents_std`` in the config,
    ``latents = (mean - latents_mean) * scaling_factor / latents_std``;
  - ``AutoencoderKLWan`` (causal video VAE, Wan 2.1/2.2): ``T = 1 + 4k`` frames ->
    ``T' = 1 + k``; ``latents = (mean - latents_mean) * (1 / latents_std)`` (per channel,
    in the Wan pipelines' order).

  ``AutoencoderKLCogVideoX`` is not supported: its decoder maps ``T'`` latent frames back to
  ``1 + 4 (T' - 1)`` frames only for odd ``T'``.

Weights are read from safetensors only and nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderKLWan

__all__ = [
    "VAE",
    "DiffusersImageVAE",
    "IdentityVAE",
    "WanVideoVAE",
    "build_tiny_vae",
    "init_tiny_vae",
    "load_vae",
]

_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
)


class VAE(torch.nn.Module):
    """Common interface. Subclasses set the three attributes and implement ``_encode`` /
    ``_decode`` on validated tensors.

    Attributes:
        latent_channels: ``C``.
        temporal_compression: frames per latent frame (1 for image VAEs).
        spatial_compression: pixels per latent pixel along H and W.
        causal: True when the first frame is encoded alone (``T = 1 + tc * k``,
            ``T' = 1 + k``); False: ``T' = T / tc``.
    """

    latent_channels: int
    temporal_compression: int = 1
    spatial_compression: int = 1
    causal: bool = False

    # -- shapes ----------------------------------------------------------------------------

    def check_pixel_shape(self, frames: int, height: int, width: int) -> None:
        """Raise ``ValueError`` unless ``[3, frames, height, width]`` pixels can be encoded."""
        s, tc = self.spatial_compression, self.temporal_compression
        name = type(self).__name__
        if min(frames, height, width) < 1:
            raise ValueError(
                f"{name}: frames, height, width must be >= 1, got {(frames, height, width)}"
            )
        if height % s or width % s:
            raise ValueError(
                f"{name}: height and width must be divisible by {s} (spatial compression), "
                f"got {height}x{width}"
            )
        if self.causal and (frames - 1) % tc:
            raise ValueError(
                f"{name}: the number of frames must be 1 + {tc} k (causal temporal "
                f"compression {tc}), got {frames}"
            )
        if not self.causal and frames % tc:
            raise ValueError(f"{name}: frames must be divisible by {tc}, got {frames}")

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, T', H', W')`` of the latents of ``frames x height x width`` pixels."""
        self.check_pixel_shape(frames, height, width)
        tc, s = self.temporal_compression, self.spatial_compression
        t = 1 + (frames - 1) // tc if self.causal else frames // tc
        return (self.latent_channels, t, height // s, width // s)

    def pixel_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(3, T, H, W)`` that ``decode`` gives for ``T' x H' x W'`` latents."""
        tc, s = self.temporal_compression, self.spatial_compression
        t = 1 + (frames - 1) * tc if self.causal else frames * tc
        return (3, t, height * s, width * s)

    # -- encode / decode -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device  # every VAE has at least one buffer

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    @torch.no_grad()
    def encode(
        self,
        pixels: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Pixels ``[B, 3, T, H, W]`` in [-1, 1] -> normalized latents ``[B, C, T', H', W']``
        (float32, contiguous, on the VAE's device). ``sample``: draw from the posterior with
        ``generator`` instead of taking its mode (IdentityVAE ignores it)."""
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(
                f"{type(self).__name__}.encode expects pixels [B, 3, T, H, W], "
                f"got {tuple(pixels.shape)}"
            )
        self.check_pixel_shape(*pixels.shape[2:])
        latents = self._encode(pixels.to(self.device, self.dtype), sample, generator)
        return latents.float().contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents ``[B, C, T', H', W']`` -> pixels ``[B, 3, T, H, W]`` in [-1, 1]
        (float32, clamped, contiguous, on the VAE's device)."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"{type(self).__name__}.decode expects latents [B, {self.latent_channels}, "
                f"T', H', W'], got {tuple(latents.shape)}"
            )
        pixels = self._decode(latents.to(self.device, torch.float32))
        return pixels.float().clamp(-1.0, 1.0).contiguous()

    def _encode(
        self, pixels: torch.Tensor, sample: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------


class IdentityVAE(VAE):
    """Pixels are the latents, after a ``patch x patch`` pixel-unshuffle of every frame:
    ``[B, 3, T, H, W] -> [B, 3 patch^2, T, H / patch, W / patch]``, channel order of
    ``F.pixel_unshuffle`` (``c * p^2 + i * p + j``), then normalized like a real VAE's latents
    (SD3's ``shift_factor`` / ``scaling_factor``): ``latents = (pixels - shift) * scale``.
    The defaults (0, 1) keep latents in [-1, 1]; the demo passes its data's mean and 1/std
    so that the diffusion model sees zero-mean, unit-variance latents. ``decode(encode(x))
    == x`` up to float round-off. ``patch = 2`` halves the token count of toy demos."""

    def __init__(self, patch: int = 1, shift: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        if not isinstance(patch, int) or patch < 1:
            raise ValueError(f"IdentityVAE patch must be an int >= 1, got {patch!r}")
        if not (math.isfinite(shift) and math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"IdentityVAE needs a finite shift and a finite scale > 0, got {shift}, {scale}"
            )
        self.patch, self.shift, self.scale = patch, float(shift), float(scale)
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        self.latent_channels = 3 * patch * patch
        self.spatial_compression = patch

    def _encode(
        self, pixels: torch.Tensor, sample: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        latents = _per_frame(pixels, lambda x: F.pixel_unshuffle(x, self.patch))
        return (
            latents
            if self.shift == 0.0 and self.scale == 1.0
            else (latents - self.shift) * self.scale
        )

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.shift != 0.0 or self.scale != 1.0:
            latents = latents / self.scale + self.shift
        return _per_frame(latents, lambda x: F.pixel_shuffle(x, self.patch))


def _per_frame(
    x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], chunk: int | None = None
) -> torch.Tensor:
    """Apply an image function ``[N, C, H, W] -> [N, C', H', W']`` to every frame of
    ``[B, C, T, H, W]``, ``chunk`` frames at a time; returns ``[B, C', T, H', W']``."""
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, C, H, W]
    step = chunk or frames.shape[0]
    out = torch.cat([fn(frames[i : i + step]) for i in range(0, frames.shape[0], step)])
    return out.reshape(b, t, *out.shape[1:]).transpose(1, 2)  # [B, C', T, H', W']


# ---------------------------------------------------------------------------------------------
# diffusers autoencoders
# ---------------------------------------------------------------------------------------------


class _DiffusersVAE(VAE):
    """A diffusers autoencoder plus the affine normalization
    ``latents = (mean - shift) * mul / div`` with ``[C]`` float32 buffers; ``mul`` or ``div`` is
    1 where the config has no such factor, so the result is bit-exact to the config's formula."""

    def __init__(
        self, model: torch.nn.Module, shift: list[float], mul: list[float], div: list[float]
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.latent_channels = c = len(shift)
        for name, value in (("shift", shift), ("mul", mul), ("div", div)):
            if len(value) != c:
                raise ValueError(
                    f"{type(model).__name__} config: {name} has {len(value)} "
                    f"entries, expected {c} (latent channels)"
                )
            buf = torch.tensor(value, dtype=torch.float32).reshape(1, c, 1, 1, 1)
            self.register_buffer(name, buf, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents ``[B, C, T', H', W']`` -> diffusion-model latents (float32)."""
        return (raw.float() - self.shift) * self.mul / self.div

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`, in the VAE's dtype."""
        return (latents.float() * self.div / self.mul + self.shift).to(self.dtype)

    def _posterior(
        self, pixels: torch.Tensor, sample: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        dist = self.model.encode(pixels).latent_dist
        return dist.sample(generator=generator) if sample else dist.mode()


class DiffusersImageVAE(_DiffusersVAE):
    """diffusers ``AutoencoderKL``, applied to every frame (``T' = T``), ``frame_batch``
    frames per call. Normalization from its config (see the module docstring)."""

    def __init__(self, model: AutoencoderKL, frame_batch: int = 16) -> None:
        cfg = model.config
        c = cfg.latent_channels
        mul = [float(cfg.scaling_factor)] * c
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            super().__init__(model, list(cfg.latents_mean), mul, list(cfg.latents_std))
        else:
            super().__init__(model, [float(cfg.shift_factor or 0.0)] * c, mul, [1.0] * c)
        self.spatial_compression = 2 ** (len(cfg.block_out_channels) - 1)
        self.frame_batch = frame_batch

    def _encode(
        self, pixels: torch.Tensor, sample: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        raw = _per_frame(pixels, lambda x: self._posterior(x, sample, generator), self.frame_batch)
        return self.normalize(raw)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        raw = self.denormalize(latents)
        return _per_frame(raw, lambda z: self.model.decode(z).sample, self.frame_batch)


class WanVideoVAE(_DiffusersVAE):
    """diffusers ``AutoencoderKLWan`` (causal 3-D VAE): ``T = 1 + 4k`` frames ->
    ``T' = 1 + k`` (any other frame count is refused, naming it), ``H' = H / 8`` for Wan2.1's
    ``dim_mult`` of 4 entries; ``latents = (mode - latents_mean) * (1 / latents_std)`` per
    channel, exactly as diffusers' Wan pipelines normalize (see :meth:`normalize`)."""

    causal = True

    def __init__(self, model: AutoencoderKLWan) -> None:
        cfg = model.config
        if len(cfg.latents_mean) != cfg.z_dim:
            raise ValueError(
                f"AutoencoderKLWan config: latents_mean has {len(cfg.latents_mean)} entries, "
                f"expected z_dim={cfg.z_dim}"
            )
        super().__init__(model, list(cfg.latents_mean), [1.0] * cfg.z_dim, list(cfg.latents_std))
        self.temporal_compression = 2 ** sum(bool(d) for d in cfg.temperal_downsample)
        self.spatial_compression = 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)
        if self.temporal_compression != 4:
            # Wan's encoder walks the frames as 1, 4, 4, ...: other ratios drop frames.
            raise ValueError(
                "AutoencoderKLWan: only temporal compression 4 is supported, got "
                f"{self.temporal_compression} (temperal_downsample={cfg.temperal_downsample})"
            )

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents -> ``(raw - latents_mean) * (1 / latents_std)`` in float32: the
        pipelines' order (``pipeline_wan_video2video.py:428-435``, ``pipeline_wan_i2v.py:443-462``:
        the reciprocal is taken first, then multiplied), bitwise theirs for an fp32 VAE."""
        return (raw.float() - self.shift) * (1.0 / self.div)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` as ``WanPipeline.__call__`` does it before
        ``vae.decode`` (``pipeline_wan.py:663-672``): in the VAE's dtype,
        ``latents / (1 / latents_std) + latents_mean``, the reciprocal taken in that dtype."""
        dtype = self.dtype
        recip = 1.0 / self.div.to(dtype)
        return latents.to(dtype) / recip + self.shift.to(dtype)

    def _encode(
        self, pixels: torch.Tensor, sample: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        return self.normalize(self._posterior(pixels, sample, generator))

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(self.denormalize(latents)).sample


_CLASSES = {
    "AutoencoderKL": (AutoencoderKL, DiffusersImageVAE),
    "AutoencoderKLWan": (AutoencoderKLWan, WanVideoVAE),
}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _identity_from_spec(spec: str) -> IdentityVAE:
    """``identity[:<patch>[:<shift>:<scale>]]`` -> :class:`IdentityVAE`."""
    parts = spec.split(":")[1:]
    if len(parts) not in (0, 1, 3) or (parts and not parts[0].isdigit()):
        raise ValueError(
            f"VAE spec {spec!r}: expected 'identity', 'identity:<patch>' or "
            "'identity:<patch>:<shift>:<scale>' (patch a positive integer)"
        )
    try:
        norm = [float(v) for v in parts[1:]]
    except ValueError:
        raise ValueError(f"VAE spec {spec!r}: shift and scale must be numbers") from None
    return IdentityVAE(int(parts[0]) if parts else 1, *norm)


def load_vae(
    spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> VAE:
    """``"identity"``, ``"identity:<patch>"``, ``"tiny:<dir>"`` or a local diffusers directory
    (or one with a ``vae/`` subfolder) -> a :class:`VAE` on ``device``; see the module
    docstring. Never downloads; safetensors only."""
    spec = str(spec)
    if spec == "identity" or spec.startswith("identity:"):
        return _identity_from_spec(spec).to(device)
    path = Path(spec.removeprefix("tiny:"))
    if not path.is_dir():
        raise FileNotFoundError(
            f"VAE directory not found: {path} (spec {spec!r}; expected 'identity', "
            "'identity:<patch>', 'tiny:<dir>' or a local diffusers VAE directory)"
        )
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    model_cls, wrapper = _CLASSES[_check_vae_dir(path)]
    model = model_cls.from_pretrained(
        path,
        local_files_only=True,
        use_safetensors=True,
        torch_dtype=dtype,
        low_cpu_mem_usage=False,
    )
    return wrapper(model).to(device)


def _check_vae_dir(path: Path) -> str:
    """Check ``path`` holds a supported diffusers VAE; return its ``_class_name``."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"VAE directory {path} has no config.json")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    if class_name not in _CLASSES:
        raise ValueError(
            f"{config_file}: VAE class {class_name!r} is not supported "
            f"(expected one of {sorted(_CLASSES)})"
        )
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"VAE directory {path} has no {' or '.join(_WEIGHT_FILES)} (pickled .bin weights "
            "are not loaded)"
        )
    return class_name


# ---------------------------------------------------------------------------------------------
# Tiny random VAEs for tests and the CPU demo
# ---------------------------------------------------------------------------------------------

TINY_IMAGE_CONFIG = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=1.5305,  # SD3's normalization constants, so that it is exercised
    shift_factor=0.0609,
)
"""Tiny ``AutoencoderKL``: 4 latent channels, spatial compression 2, ~44k parameters."""

TINY_VIDEO_CONFIG = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[True, True],
    latents_mean=[0.1, -0.2, 0.05, 0.3],
    latents_std=[1.5, 0.8, 2.0, 1.2],
    scale_factor_temporal=4,
    scale_factor_spatial=4,
)
"""Tiny ``AutoencoderKLWan``: 4 latent channels, temporal x4 (causal), spatial x4, ~51k
parameters."""


def init_tiny_vae(kind: str = "image", seed: int = 0) -> AutoencoderKL | AutoencoderKLWan:
    """A tiny random diffusers VAE (``kind`` ``"image"``: ``AutoencoderKL``; ``"video"``:
    ``AutoencoderKLWan``), seeded; leaves the global RNG untouched."""
    if kind not in ("image", "video"):
        raise ValueError(f"tiny VAE kind must be 'image' or 'video', got {kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "image":
            model = AutoencoderKL(**TINY_IMAGE_CONFIG)
        else:
            model = AutoencoderKLWan(**TINY_VIDEO_CONFIG)
    return model.eval()


def build_tiny_vae(path: str | Path, kind: str = "image", seed: int = 0) -> Path:
    """Save :func:`init_tiny_vae` ``(kind, seed)`` into ``path`` (diffusers layout:
    ``config.json`` + ``diffusion_pytorch_model.safetensors``), loadable by
    ``load_vae(str(path))``. Returns ``path``."""
    path = Path(path)
    init_tiny_vae(kind, seed).save_pretrained(path, safe_serialization=True)
    return path
