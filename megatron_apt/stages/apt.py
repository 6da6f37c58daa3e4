"""Adversarial post-training (paper sections 3.1, 3.3, 3.4): losses, the discriminator's
timestep ensemble, the approximated R1, and the two per-micro-batch phases.

Sign convention. Eqs. (1)-(2) define, with f_D = g_G = log σ and f_G = log(1 - σ),
``E[log σ(D(x))] + E[log(1 - σ(D(G(z))))]`` (the log-likelihood the discriminator raises) and
``E[log σ(D(G(z)))]`` (the non-saturating objective the generator raises). Eq. (10) adds
``λ E[(D(x) - D(x + σε))²]``, which only makes sense as a penalty, so the losses minimized
here are the negated log-likelihoods plus the penalty:

    loss_D = -E[log σ(D(x, c))] - E[log(1 - σ(D(G(z, c), c)))] + λ E[(D(x, c) - D(x̃, c))²]
    loss_G = -E[log σ(D(G(z, c), c))]

with -log σ(a) = softplus(-a) and -log(1 - σ(a)) = softplus(a) (numerically stable).

D(x, c) = D̂(x, t, c) with one t per sample, t = shift(u, s), u ~ U(0, 1), on the [0, 1]
scale; D always sees the clean sample (never x_t). The perturbed copy x̃ = x + σε of a real
sample shares its t and text, so the difference measures the gradient in x only. Real, fake
and perturbed real go through ONE discriminator forward; the noise is added and the penalty
computed in fp32. Pure torch: the DeepSpeed engines call these functions.

Ablations (:class:`APTConfig`): ``d_timesteps="zero"`` gives D t = 0 for every sample in both
phases (section 3.3 compares it with the ensemble); ``r1_noise_std`` picks how N(x, σI) of
section 3.4 is read (below).

The R1 perturbation's scale. The paper writes the perturbed sample as N(x, σI) with a "small
variance σ", i.e. a standard deviation √σ; this code historically draws x + σε (standard
deviation σ). For a perturbation of standard deviation s, E[(D(x) - D(x + sε))²] ≈ s² ||∇_x D||²,
so λ s² is the weight of the exact R1 it approximates: λσ² with ``r1_noise_std="sigma"`` (0.01
for images, 1 for videos at λ = 100) and λσ with ``"sqrt-sigma"`` (1 and 10): two readings
that differ by 100x (images) and 10x (videos) in regularization strength, and in how far
from x the finite difference probes D.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron_apt.config.training import D_TIMESTEPS, R1_NOISE_STDS
from megatron_apt.stages.diffusion import timestep_shift
from megatron_apt.stages.noise import Rng, rand_batch, randn_like_batch
from megatron_apt.utils.transfer import to_device

__all__ = [
    "APTConfig",
    "approx_r1_penalty",
    "discriminator_health",
    "discriminator_loss",
    "discriminator_step",
    "discriminator_timesteps",
    "frozen",
    "generator_loss",
    "generator_step",
    "perturb",
    "sample_discriminator_timesteps",
    "timestep_shift",
]

COND_KEYS = ("text", "text_mask", "pooled_text")


@dataclass(kw_only=True)
class APTConfig:
    """Hyper-parameters of the adversarial objective (paper values in the comments)."""

    shift: float = 1.0  # s of the timestep ensemble: 1 for images, 12 for videos
    r1_lambda: float = 100.0  # λ
    r1_sigma: float = 0.01  # σ: 0.01 for images, 0.1 for videos
    r1_noise_std: str = "sigma"  # perturbation std: "sigma" (σ) | "sqrt-sigma" (√σ)
    d_timesteps: str = "ensemble"  # D's t: "ensemble" (shift(u, s)) | "zero" (t = 0)

    def __post_init__(self) -> None:
        if self.shift <= 0 or self.r1_lambda < 0 or self.r1_sigma <= 0:
            raise ValueError(
                f"APTConfig needs shift > 0, r1_lambda >= 0, r1_sigma > 0; got shift="
                f"{self.shift}, r1_lambda={self.r1_lambda}, r1_sigma={self.r1_sigma}"
            )
        if self.r1_noise_std not in R1_NOISE_STDS:
            raise ValueError(f"r1_noise_std={self.r1_noise_std!r}: choose one of {R1_NOISE_STDS}")
        if self.d_timesteps not in D_TIMESTEPS:
            raise ValueError(f"d_timesteps={self.d_timesteps!r}: choose one of {D_TIMESTEPS}")

    @property
    def r1_std(self) -> float:
        """Standard deviation of the R1 perturbation: σ, or √σ (module docstring)."""
        return self.r1_sigma if self.r1_noise_std == "sigma" else math.sqrt(self.r1_sigma)

    @property
    def exact_r1_weight(self) -> float:
        """λ std²: the weight of the exact R1 ``||∇_x D||²`` that the penalty approximates."""
        return self.r1_lambda * self.r1_std**2

    @classmethod
    def image(cls) -> APTConfig:
        return cls(shift=1.0, r1_lambda=100.0, r1_sigma=0.01)

    @classmethod
    def video(cls) -> APTConfig:
        return cls(shift=12.0, r1_lambda=100.0, r1_sigma=0.1)


# ------------------------------------------------------------------------------------------
# Formulas
# ------------------------------------------------------------------------------------------


def sample_discriminator_timesteps(
    batch: int,
    shift: float,
    generator: Rng = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One t per sample: ``shift(u, s)``, u ~ U(0, 1), on the [0, 1] scale (eq. 6-7). ``[B]``.
    ``generator``: one ``torch.Generator``, or a list of one per sample."""
    u = rand_batch(batch, generator)
    t = timestep_shift(u, shift)
    return to_device(t, device) if device is not None else t


def discriminator_timesteps(
    batch: int, cfg: APTConfig, generator: Rng = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """D's t per sample ``[B]``: the shifted-uniform ensemble, or zeros with
    ``d_timesteps="zero"`` (the ensemble is drawn anyway, so that both settings consume the same
    random numbers and see the same perturbation noise)."""
    t = sample_discriminator_timesteps(batch, cfg.shift, generator, device)
    return torch.zeros_like(t) if cfg.d_timesteps == "zero" else t


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``-E[log σ(real)] - E[log(1 - σ(fake))]`` (negated eq. 1), fp32 scalar."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating ``-E[log σ(D(G(z)))]`` (negated eq. 2), fp32 scalar."""
    return F.softplus(-logits_fake.float()).mean()


@torch.no_grad()
def discriminator_health(
    logits_real: torch.Tensor, logits_fake: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How well D separates real from fake on one micro-batch (fp32 scalars, no graph).

    ``d_acc_real``: share of real logits > 0 (D calls them real); ``d_acc_fake``: share of fake
    logits < 0; ``logit_gap``: mean real logit - mean fake logit. A balanced accuracy
    ``(d_acc_real + d_acc_fake) / 2`` near 1 with a small ``loss_d`` is a saturated D (the
    paper's collapse mode), near 0.5 a blind one (``megatron_apt.engine.health``).
    """
    real, fake = logits_real.detach().float(), logits_fake.detach().float()
    return {
        "d_acc_real": (real > 0).float().mean(),
        "d_acc_fake": (fake < 0).float().mean(),
        "logit_gap": real.mean() - fake.mean(),
    }


def approx_r1_penalty(
    logits_real: torch.Tensor, logits_perturbed: torch.Tensor, r1_lambda: float = 100.0
) -> torch.Tensor:
    """``λ E[(D(x) - D(x + σε))²]`` (eq. 9 with eq. 10's λ), differences in fp32.

    For a perturbation of small standard deviation s its expectation over ε is
    ``λ s² ||∇_x D||²`` (first-order Taylor), i.e. exact R1 with weight ``λs²``
    (:attr:`APTConfig.exact_r1_weight`: λσ² for s = σ, λσ for s = √σ).
    """
    if logits_real.shape != logits_perturbed.shape:
        raise ValueError(
            f"logit shapes differ: real {tuple(logits_real.shape)} vs perturbed "
            f"{tuple(logits_perturbed.shape)}"
        )
    diff = logits_real.float() - logits_perturbed.float()
    return r1_lambda * diff.square().mean()


def perturb(x: torch.Tensor, std: float, generator=None) -> torch.Tensor:
    """``x + std ε`` in fp32, ε ~ N(0, I) drawn on the CPU generator(s) (device-independent).
    ``std`` is the perturbation's standard deviation: :attr:`APTConfig.r1_std` (σ or √σ)."""
    return x.float() + std * randn_like_batch(x, generator, torch.float32)


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of every parameter of ``module`` for the block, restoring the
    previous flags after (the inactive network of a GAN phase; see CPU-FACTS on DeepSpeed)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ------------------------------------------------------------------------------------------
# The two phases on one micro-batch
# ------------------------------------------------------------------------------------------

GeneratorFn = Callable[..., torch.Tensor]  # G(noise, text, text_mask, pooled_text) -> x
DiscriminatorFn = Callable[..., torch.Tensor]  # D(x, t, text, text_mask, pooled_text) -> [B]


def _cond(batch: Mapping[str, Any], repeat: int = 1) -> dict[str, Any]:
    out = {}
    for key in COND_KEYS:
        value = batch.get(key)
        if value is not None and repeat > 1:
            value = torch.cat([value] * repeat, dim=0)
        out[key] = value
    return out


def discriminator_step(
    discriminator: DiscriminatorFn,
    generator: GeneratorFn,
    batch: Mapping[str, Any],
    cfg: APTConfig,
    rng: Rng = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """D phase on one micro-batch: returns ``(loss_D, metrics)``; the caller backpropagates.

    ``batch``: ``latents [B, C, T, H, W]`` (real, clean), ``text``, ``text_mask``,
    ``pooled_text``. G runs without gradients; D runs ONCE on ``[real; fake; real + std ε]``
    (std = :attr:`APTConfig.r1_std`).
    """
    x_real = batch["latents"]
    b = x_real.shape[0]
    cond = _cond(batch)
    with torch.no_grad():
        x_fake = generator(randn_like_batch(x_real, rng), **cond)
    t_real = discriminator_timesteps(b, cfg, rng, x_real.device)
    t_fake = discriminator_timesteps(b, cfg, rng, x_real.device)
    x_pert = perturb(x_real, cfg.r1_std, rng)
    inputs = torch.cat([x_real.float(), x_fake.float(), x_pert])  # [3B, ...] fp32
    t = torch.cat([t_real, t_fake, t_real])  # the perturbed copy keeps its sample's t
    logits = discriminator(inputs, t, **_cond(batch, repeat=3)).float()  # [3B]
    l_real, l_fake, l_pert = logits.split(b)
    loss_adv = discriminator_loss(l_real, l_fake)
    loss_r1 = approx_r1_penalty(l_real, l_pert, cfg.r1_lambda)
    metrics = {
        "loss_d": loss_adv.detach(),
        "loss_r1": loss_r1.detach(),
        "d_real": l_real.detach().mean(),
        "d_fake": l_fake.detach().mean(),
        **discriminator_health(l_real, l_fake),
    }
    return loss_adv + loss_r1, metrics


def generator_step(
    discriminator: DiscriminatorFn,
    generator: GeneratorFn,
    batch: Mapping[str, Any],
    cfg: APTConfig,
    rng: Rng = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """G phase on one micro-batch: ``(loss_G, metrics)``. The caller freezes D (see
    :func:`frozen`) so that gradients reach only G through D's input."""
    x_real = batch["latents"]
    cond = _cond(batch)
    x_fake = generator(randn_like_batch(x_real, rng), **cond)
    t_fake = discriminator_timesteps(x_real.shape[0], cfg, rng, x_real.device)
    logits = discriminator(x_fake, t_fake, **cond).float()
    loss = generator_loss(logits)
    return loss, {"loss_g": loss.detach(), "d_fake_g": logits.detach().mean()}
