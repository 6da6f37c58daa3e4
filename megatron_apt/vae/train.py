"""Train a small KL autoencoder (diffusers ``AutoencoderKL``) on the frames of a media folder.

Real latent-diffusion models never see pixels: a VAE's decoder, trained on *samples* of its
posterior, maps the latents' small errors (a one-step generator's per-element noise, a slightly
wrong velocity) to smooth pixels. The toy demo's pixel-unshuffle "VAE" does not: every error of
a latent element appears raw in one pixel, as speckle. This trains the demo's own VAE the way
latent-diffusion VAEs are trained (Rombach et al. 2022, section 3.1: reconstruction plus a
slight KL pull to N(0, I)), at toy size, and saves it in diffusers' layout so that
``load_vae(<dir>)`` and every tool read it as they read SD3's.

Objective per batch of frames ``x`` (pixels in [-1, 1]), with ``z ~ q(z | x)`` (the posterior's
*sample*, reparameterized):

    L = mean |D(z) - x| + mean (D(z) - x)^2
        + kl_weight * mean_b sum_{c,h,w} KL(q(z | x_b) || N(0, I))

(``kl_weight`` 1e-6 by default, the number of LDM's KL autoencoders, though here against a
per-element *mean* reconstruction loss where LDM sums over pixels: relatively ~770x stronger at
16x16x3. It only keeps the latents bounded and the posterior's spread a few % of theirs;
reconstruction dominates.) No perceptual or adversarial loss: the synthetic frames are flat
shapes, where L1 + L2 reconstruct to ~33 dB PSNR.

After training, the posterior means of all training frames give the per-channel normalization
written into the config as ``latents_mean`` / ``latents_std`` (``scaling_factor`` 1), so that
the diffusion model sees zero-mean, unit-variance latents per channel, as SD3's
``shift_factor`` / ``scaling_factor`` do for its VAE.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from megatron_apt.data.media import list_inputs, read_frames

__all__ = ["VAETrainConfig", "load_frames", "train_vae"]

REPORT_FILE = "train_vae.json"


@dataclass
class VAETrainConfig:
    """Architecture and optimisation of :func:`train_vae` (defaults: the demo's VAE, ~0.66M
    parameters, 16x16 RGB -> 4x8x8)."""

    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (32, 64)  # spatial compression 2^(len - 1)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    steps: int = 600
    batch_size: int = 64  # frames per step
    lr: float = 1e-3  # AdamW peak; linear warm-up over 5 % of the steps, then cosine to 0
    kl_weight: float = 1e-6
    holdout: float = 0.05  # share of the clips kept out of training for the report's PSNR
    seed: int = 0
    log_interval: int = 50

    def validate(self) -> None:
        if self.latent_channels < 1 or self.layers_per_block < 1:
            raise ValueError("latent_channels and layers_per_block must be >= 1")
        if not self.block_out_channels or any(
            c % self.norm_num_groups for c in self.block_out_channels
        ):
            raise ValueError(
                f"block_out_channels {self.block_out_channels} must be non-empty multiples of "
                f"norm_num_groups {self.norm_num_groups} (GroupNorm)"
            )
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.kl_weight < 0:
            raise ValueError(
                f"need steps >= 1, batch_size >= 1, lr > 0, kl_weight >= 0; got {self.steps}, "
                f"{self.batch_size}, {self.lr}, {self.kl_weight}"
            )
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def load_frames(source: str | Path, max_files: int | None = None) -> tuple[torch.Tensor, int]:
    """Every frame of the captioned media under ``source`` (a folder or manifest, as
    :func:`~megatron_apt.data.media.list_inputs`) -> ``(frames [N, 3, H, W] float32 in [-1, 1],
    number of files)``. All files must have the same frame size; the error names the first
    that does not."""
    items, _ = list_inputs(source)
    if max_files is not None:
        items = items[:max_files]
    if not items:
        raise ValueError(f"{source}: no captioned media files to train a VAE on")
    clips, size = [], None
    for item in items:
        x = read_frames(item.path)  # uint8 [T, H, W, 3]
        if size is None:
            size = x.shape[1:3]
        elif x.shape[1:3] != size:
            raise ValueError(
                f"{item.path}: frame size {x.shape[1]}x{x.shape[2]} differs from the first "
                f"file's {size[0]}x{size[1]} (train_vae needs one size; resize the data first)"
            )
        clips.append(x)
    frames = torch.from_numpy(np.concatenate(clips)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return frames.contiguous(), len(items)


def _lr_at(step: int, cfg: VAETrainConfig) -> float:
    warm = max(1, round(0.05 * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def _psnr(vae: AutoencoderKL, frames: torch.Tensor, batch: int) -> float:
    """PSNR (dB, signal range 2) of decode(posterior mode) over ``frames``."""
    se, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, frames.shape[0], batch):
            x = frames[i : i + batch]
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            se += float(((rec - x) ** 2).sum())
            n += x.numel()
    mse = se / max(n, 1)
    return float("inf") if mse == 0 else 10.0 * math.log10(4.0 / mse)


def train_vae(
    frames: torch.Tensor,
    output: str | Path,
    cfg: VAETrainConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train an ``AutoencoderKL`` on ``frames [N, 3, H, W]`` (in [-1, 1]) and save it to
    ``output`` (diffusers layout, safetensors, per-channel ``latents_mean`` / ``latents_std``)
    plus a ``train_vae.json`` report, which is also returned. The folder is written next to
    ``output`` and moved into place at the end: an interrupted run leaves no half VAE."""
    cfg = cfg or VAETrainConfig()
    cfg.validate()
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [N, 3, H, W], got {tuple(frames.shape)}")
    h, w = frames.shape[2:]
    s = cfg.spatial_compression
    if h % s or w % s:
        raise ValueError(f"frame size {h}x{w} is not divisible by the compression {s}")
    n_hold = int(round(cfg.holdout * frames.shape[0]))
    if frames.shape[0] - n_hold < 1:
        raise ValueError(f"{frames.shape[0]} frames leave none for training (holdout)")
    train, hold = frames[: frames.shape[0] - n_hold], frames[frames.shape[0] - n_hold :]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = AutoencoderKL(
            block_out_channels=tuple(cfg.block_out_channels),
            down_block_types=("DownEncoderBlock2D",) * len(cfg.block_out_channels),
            up_block_types=("UpDecoderBlock2D",) * len(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_num_groups,
            sample_size=max(h, w),
            scaling_factor=1.0,
        )
    n_params = sum(p.numel() for p in vae.parameters())
    log(
        f"train_vae: {n_params / 1e6:.2f}M parameters, {train.shape[0]} training frames "
        f"({n_hold} held out), {h}x{w} -> {cfg.latent_channels}x{h // s}x{w // s}, "
        f"{cfg.steps} steps of {cfg.batch_size}"
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    vae.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        x = train[torch.randint(0, train.shape[0], (cfg.batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=gen)).sample
        err = rec - x
        l_rec = err.abs().mean() + err.pow(2).mean()
        kl = posterior.kl().mean()  # summed over C, H, W per frame (diffusers), mean over batch
        loss = l_rec + cfg.kl_weight * kl
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_vae: non-finite loss at step {step} ({loss.item()})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.steps:
            el = time.perf_counter() - t0
            log(
                f"  step {step + 1}/{cfg.steps}  rec {l_rec.item():.4f}  kl {kl.item():.1f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {el / (step + 1):.3f} s/step"
            )
    vae.eval()

    # per-channel statistics of the posterior means of every training frame
    with torch.no_grad():
        means, stds = [], []
        for i in range(0, train.shape[0], 256):
            dist = vae.encode(train[i : i + 256]).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        mu = torch.cat(means).double()
        ch_mean = mu.mean(dim=(0, 2, 3))
        ch_std = mu.std(dim=(0, 2, 3)).clamp_min(1e-6)
        post_std = (torch.cat(stds).double() / ch_std.view(1, -1, 1, 1)).mean().item()
    vae.register_to_config(
        latents_mean=[float(v) for v in ch_mean], latents_std=[float(v) for v in ch_std]
    )
    report = {
        "parameters": n_params,
        "train_frames": int(train.shape[0]),
        "holdout_frames": int(n_hold),
        "frame_size": [int(h), int(w)],
        "latent_shape_per_frame": [cfg.latent_channels, h // s, w // s],
        "psnr_train_db": _psnr(vae, train[:1024], 256),
        "psnr_holdout_db": _psnr(vae, hold, 256) if n_hold else None,
        "latents_mean": [float(v) for v in ch_mean],
        "latents_std": [float(v) for v in ch_std],
        "posterior_std_normalized": post_std,
        "seconds": time.perf_counter() - t0,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    }
    output = Path(output)
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    hold_txt = f"{report['psnr_holdout_db']:.1f}" if n_hold else "n/a"
    log(
        f"train_vae: PSNR {report['psnr_train_db']:.1f} dB (train) / {hold_txt} dB "
        f"(held out); posterior std {post_std:.3f} of the latents' spread; saved {output}"
    )
    return report
