"""Low-dimensional toy problems with exact answers: a Gaussian-mixture data set whose
flow-matching velocity is known in closed form, and a small MLP velocity model."""

from __future__ import annotations

import math

import torch
from torch import nn


class GaussianMixtureFlow:
    """Data x ~ sum_k w_k N(mu_k, s^2 I) in R^d; class label k (condition) selects a mode.

    For x_t = (1 - t) x + t z, given the mode k: x_t ~ N((1 - t) mu_k, ((1 - t)^2 s^2 + t^2) I),
    E[z | x_t, k] = t (x_t - (1 - t) mu_k) / var_t and E[x | x_t, k] = mu_k + (1 - t) s^2
    (x_t - (1 - t) mu_k) / var_t, so the exact velocity E[z - x | x_t] mixes these with the
    posterior mode responsibilities (uniform over modes for the null label -1).
    """

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None):
        self.means = means.double()  # [K, d]
        self.std = std
        k = means.shape[0]
        self.weights = (weights if weights is not None else torch.ones(k) / k).double()

    def sample(self, n: int, generator: torch.Generator | None = None):
        """``(x [n, d], labels [n])``."""
        labels = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means[labels] + self.std * noise).float(), labels

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None):
        """Exact ``E[z - x | x_t, label]``; ``label = -1`` (or None) is unconditional."""
        x, t = x_t.double(), t.double().reshape(-1, 1, 1).clamp(1e-6, 1.0)
        mu = (1 - t) * self.means[None]  # [n, K, d]
        var = (1 - t) ** 2 * self.std**2 + t**2  # [n, 1, 1]
        diff = x[:, None, :] - mu  # [n, K, d]
        logp = -0.5 * diff.square().sum(-1) / var[..., 0] + torch.log(self.weights)[None]
        if label is not None:
            onehot = torch.nn.functional.one_hot(label.clamp(min=0), self.means.shape[0]).bool()
            keep = onehot | (label < 0)[:, None]
            logp = logp.masked_fill(~keep, -math.inf)
        r = torch.softmax(logp, dim=1)[..., None]  # [n, K, 1]
        e_z = t * diff / var
        e_x = self.means[None] + (1 - t) * self.std**2 * diff / var
        return (r * (e_z - e_x)).sum(1).to(x_t.dtype)


class MLPVelocity(nn.Module):
    """``v(x_t, t, label)``: an MLP on [x_t, Fourier(t), embed(label)]; label -1 = null."""

    def __init__(self, dim: int = 2, hidden: int = 128, num_classes: int = 0, freqs: int = 8):
        super().__init__()
        self.freqs = freqs
        self.label_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(dim + 2 * freqs, hidden)
        self.net = nn.Sequential(
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None):
        f = torch.arange(1, self.freqs + 1, dtype=x_t.dtype, device=x_t.device) * math.pi
        tf = t.to(x_t.dtype)[:, None] * f[None]
        h = self.inp(torch.cat([x_t, torch.sin(tf), torch.cos(tf)], dim=1))
        if self.label_embed is not None and label is not None:
            h = h + self.label_embed(label + 1)  # -1 (null) -> row 0
        return self.net(h)
