"""Fréchet distance, sharpness and caption accuracy of generated samples (uint8 [T,H,W,3])."""

from __future__ import annotations

import numpy as np
import torch

from megatron_apt.data.synthetic import score_sample
from megatron_apt.evaluation.features import FeatureNet, to_pair


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to feature sets ``a [N, D]`` and ``b [M, D]``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` (exact for PSD S)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with equal D, got {a.shape}, {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross))


def sharpness(samples: list[np.ndarray]) -> float:
    """Mean variance of the Laplacian of the grey frames (higher = sharper), pixel units."""
    vals = []
    for frames in samples:
        g = frames.astype(np.float64).mean(-1)  # [T, H, W]
        lap = (
            -4 * g[:, 1:-1, 1:-1]
            + g[:, :-2, 1:-1]
            + g[:, 2:, 1:-1]
            + g[:, 1:-1, :-2]
            + g[:, 1:-1, 2:]
        )
        vals.append(lap.var(axis=(1, 2)).mean())
    return float(np.mean(vals))


def caption_accuracy(samples: list[np.ndarray], captions: list[str]) -> dict[str, float]:
    """Share of samples whose colour / shape / motion match the caption (and all three)."""
    scores = [score_sample(s, c) for s, c in zip(samples, captions, strict=True)]
    out = {k: float(np.mean([s[k] for s in scores])) for k in ("color", "shape", "motion")}
    out["all"] = float(np.mean([all(s.values()) for s in scores]))
    return out


@torch.no_grad()
def features_of(net: FeatureNet, samples: list[np.ndarray]) -> np.ndarray:
    x = torch.stack([to_pair(s, net.size) for s in samples])
    return net.features(x).numpy().astype(np.float64)


def evaluate_samples(
    net: FeatureNet, samples: list[np.ndarray], captions: list[str], real_features: np.ndarray
) -> dict[str, float]:
    """One row of the results table."""
    row = {
        "fd": frechet_distance(features_of(net, samples), real_features),
        "sharpness": sharpness(samples),
    }
    row.update({f"caption_{k}": v for k, v in caption_accuracy(samples, captions).items()})
    return row
