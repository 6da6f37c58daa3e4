"""Sample-quality metrics of generated clips (uint8 ``[T, H, W, 3]``) against real ones.

Every number is measured against one *reference* set (half of the held-out real data, see
:func:`evaluate_against_real`), and the other half of the real data is scored the same way as a
row of its own: the floor each metric reaches on real data.

* :func:`frechet_distance_bootstrap`: Fréchet distance in a feature space with a percentile
  bootstrap 95 % interval, so that differences within the noise of the measurement show.
* :func:`sharpness`: variance of the Laplacian (reported as a ratio to the reference's); it
  rewards speckle as much as detail, hence
* :func:`background_noise`: high-frequency residual on the plain background, where real data
  has none, so that noise cannot pass for detail;
* :func:`saturation_distance`: distance of the objects' colour-saturation histogram to the
  reference's (the over-saturation of CFG, section 5.3 of the paper);
* :func:`caption_accuracy`: colour / shape / motion read back by the synthetic-data scorer.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from megatron_apt.data.synthetic import score_sample
from megatron_apt.evaluation.features import FeatureNet, to_pair

# ---------------------------------------------------------------------------------------------
# Fréchet distance and its bootstrap interval
# ---------------------------------------------------------------------------------------------


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    """Square root of (a stack of) symmetric PSD matrices ``[..., D, D]``."""
    w, v = np.linalg.eigh((m + np.swapaxes(m, -1, -2)) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))[..., None, :]) @ np.swapaxes(v, -1, -2)


def _fd_from_moments(mu_a, s_a, mu_b, s_b) -> np.ndarray:
    """FD of (stacks of) Gaussians: ``|mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr (S_a^1/2 S_b
    S_a^1/2)^1/2``; the last trace is the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix ``R^T S_b R`` for any ``R R^T = S_a`` (same eigenvalues as
    ``S_a S_b``; exact for PSD S, no complex sqrtm). ``R`` is the Cholesky factor of ``S_a``
    (cheap), or its symmetric square root when ``S_a`` is singular."""
    try:
        root_a = np.linalg.cholesky(s_a)
    except np.linalg.LinAlgError:  # singular (dead features, fewer samples than dimensions)
        root_a = _sqrtm_psd(s_a)
    m = np.swapaxes(root_a, -1, -2) @ s_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + np.swapaxes(m, -1, -2)) / 2), 0, None))
    trace = lambda s: np.trace(s, axis1=-2, axis2=-1)
    return ((mu_a - mu_b) ** 2).sum(-1) + trace(s_a) + trace(s_b) - 2 * cross.sum(-1)


def _check_features(a: np.ndarray, b: np.ndarray) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with equal D, got {a.shape}, {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set, got {len(a)} and {len(b)}")


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to feature sets ``a [N, D]`` and ``b [M, D]``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` (exact for PSD S).
    Covariances are unbiased (``ddof=1``)."""
    _check_features(a, b)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    s_a, s_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    return float(_fd_from_moments(a.mean(0), np.atleast_2d(s_a), b.mean(0), np.atleast_2d(s_b)))


def _resampled_moments(x: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means ``[B, D]`` and unbiased covariances ``[B, D, D]`` of the resamples ``x[idx[b]]``,
    ``idx [B, N]``, without gathering them: with ``w [B, N]`` the number of times each row is
    drawn, the sums are ``w @ x`` and ``w @ (x_i x_j)_{i <= j}`` (one GEMM over the upper
    triangle of the outer products). ``x`` is centred first, which leaves the covariances
    unchanged and keeps the raw second moments free of cancellation."""
    b, n = idx.shape
    d = x.shape[1]
    center = x.mean(0)
    x = x - center
    w = np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n)
    w = w.reshape(b, n).astype(np.float64)
    iu, ju = np.triu_indices(d)
    mu = w @ x / n
    upper = w @ (x[:, iu] * x[:, ju])  # [B, D (D + 1) / 2]: sum_k w_k x_ki x_kj
    cov = np.empty((b, d, d))
    cov[:, iu, ju] = upper
    cov[:, ju, iu] = upper
    cov -= n * mu[:, :, None] * mu[:, None, :]
    return mu + center, cov / (n - 1)


class FrechetBootstrap(NamedTuple):
    """``fd``: point estimate on the full sets; ``ci``: ``(low, high)`` percentile interval;
    ``resamples``: the bootstrap FDs ``[num_resamples]``."""

    fd: float
    ci: tuple[float, float]
    resamples: np.ndarray


def frechet_distance_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    chunk: int = 128,
) -> FrechetBootstrap:
    """FD of feature sets ``a [N, D]`` and ``b [M, D]`` with a percentile bootstrap interval.

    Each of ``num_resamples`` resamples draws ``N`` rows of ``a`` and ``M`` rows of ``b`` with
    replacement (independently; all indices drawn up front from ``np.random.default_rng(seed)``,
    so the same seed and sizes give the same indices for every row of a table, whatever
    ``chunk``) and recomputes FD; the interval is the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` percentiles of those FDs, shifted by the bootstrap's estimate of
    its own bias (``mean(resampled FDs) - fd``) so that it is centred on the point estimate
    (clipped at 0). The point
    estimate ``fd`` is :func:`frechet_distance` on the full sets. Moments and matrix roots are
    computed for ``chunk`` resamples at a time (one GEMM, batched Cholesky and ``eigvalsh``).

    Caveats: FD is biased upward at finite N (the covariance estimates' noise adds to the trace
    terms, roughly in proportion to D / N), and the percentile bootstrap of FD is biased upward
    again, because a resample holds duplicates (about 63 % distinct rows) and so behaves like a
    smaller set: unshifted, the percentile interval of a real-vs-real FD of 9 was [11, 30],
    above its own estimate (1024 x 64 features). The shift removes that second bias, not the
    first: the interval does not promise to cover the true (infinite-N) FD. Use the intervals
    to compare rows measured the same way (same reference set, same N, same number of
    resamples), not as absolute error bars; ``num_resamples=0`` returns the point estimate
    with an empty ``(nan, nan)`` interval.
    """
    _check_features(a, b)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fd = frechet_distance(a, b)
    if num_resamples <= 0:
        return FrechetBootstrap(fd, (math.nan, math.nan), np.empty(0))
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    idx_a = rng.integers(0, len(a), (num_resamples, len(a)))
    idx_b = rng.integers(0, len(b), (num_resamples, len(b)))
    out = np.empty(num_resamples)
    for i in range(0, num_resamples, chunk):
        mu_a, s_a = _resampled_moments(a, idx_a[i : i + chunk])
        mu_b, s_b = _resampled_moments(b, idx_b[i : i + chunk])
        out[i : i + chunk] = _fd_from_moments(mu_a, s_a, mu_b, s_b)
    q = 100 * (1 - confidence) / 2
    low, high = np.percentile(out, [q, 100 - q]) - (out.mean() - fd)  # centred on fd
    return FrechetBootstrap(fd, (max(0.0, float(low)), float(high)), out)


# ---------------------------------------------------------------------------------------------
# Pixel statistics: sharpness, background noise, saturation
# ---------------------------------------------------------------------------------------------

#: L1 distance (sum over RGB, 0-255 units) from the background colour above which a pixel of
#: the 3x3-median-filtered clip is object (the caption scorer's threshold) ...
FOREGROUND_THRESHOLD = 90
#: ... and above which it is "not plain background" for :func:`background_noise` (catches the
#: faint halo of anti-aliased or blurred edges, which the margin then widens).
HALO_THRESHOLD = 40


def _laplacian(g: np.ndarray) -> np.ndarray:
    """4-neighbour Laplacian of ``[..., H, W]`` over the interior ``[..., H-2, W-2]``."""
    c = g[..., 1:-1, 1:-1]
    return g[..., :-2, 1:-1] + g[..., 2:, 1:-1] + g[..., 1:-1, :-2] + g[..., 1:-1, 2:] - 4 * c


def sharpness(samples: Sequence[np.ndarray]) -> float:
    """Mean variance of the Laplacian of the grey frames (higher = sharper), pixel units.
    Speckle raises it as much as real detail does: read it with :func:`background_noise`."""
    vals = [_laplacian(f.astype(np.float64).mean(-1)).var(axis=(1, 2)).mean() for f in samples]
    return float(np.mean(vals))


def _median3x3(x: np.ndarray) -> np.ndarray:
    """3x3 spatial median of ``[T, H, W, C]`` (edges replicated), per frame and channel."""
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    win = sliding_window_view(p, (3, 3), axis=(1, 2))  # [T, H, W, C, 3, 3]
    return np.median(win.reshape(*x.shape, 9), axis=-1)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of ``[T, H, W]`` by a ``(2r+1) x (2r+1)`` square, per frame."""
    if r <= 0:
        return mask
    p = np.pad(mask, ((0, 0), (r, r), (r, r)))
    return sliding_window_view(p, (2 * r + 1, 2 * r + 1), axis=(1, 2)).any((-1, -2))


def background_color(x: np.ndarray) -> np.ndarray:
    """Background RGB of a clip ``[T, H, W, 3]``: the median of its border pixels (as the
    caption scorer estimates it; robust to speckle and to an object touching the border)."""
    edges = (x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1])
    return np.median(np.concatenate([e.reshape(-1, 3) for e in edges]), axis=0)


@dataclass
class _ClipMasks:
    x: np.ndarray  # float64 [T, H, W, 3]
    median: np.ndarray  # 3x3 median of x
    distance: np.ndarray  # [T, H, W] L1 distance of `median` to the background colour


def _clip_masks(clip: np.ndarray) -> _ClipMasks:
    x = np.asarray(clip, dtype=np.float64)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected a clip [T, H, W, 3], got {x.shape}")
    med = _median3x3(x)
    return _ClipMasks(x, med, np.abs(med - background_color(x)).sum(-1))


def background_noise(
    samples: Sequence[np.ndarray], margin: int = 2, halo_threshold: float = HALO_THRESHOLD
) -> float | None:
    """Mean high-frequency residual on the background, 0-255 pixel units (lower = cleaner;
    clean synthetic data scores 0).

    Per clip ``x [T, H, W, 3]`` (float), with ``med(x)`` its per-frame, per-channel 3x3 median:

    * residual ``r = mean_c |x - med(x)|`` (the part of each pixel that its neighbourhood does
      not explain: speckle, grain, ringing; flat regions give exactly 0);
    * background colour ``bg`` = median of the clip's border pixels;
    * non-background = pixels with ``sum_c |med(x) - bg| > halo_threshold`` (measured on the
      median so that isolated speckle does not count as object), dilated by ``margin`` pixels
      (a ``(2 margin + 1)^2`` square) so that anti-aliased, blurred or codec-smeared edges of
      the object are not mistaken for noise;
    * the clip's score is the mean of ``r`` over the remaining (background) pixels of all its
      frames.

    The row's value is the mean over clips that have any background pixels, None if none has
    (the per-clip scores: :func:`background_noise_values`; their bootstrap interval:
    :func:`mean_bootstrap_ci`). A codec (MP4, GIF dithering) adds its own residual to real
    data too: compare with the real data row, which is read the same way.
    """
    vals = background_noise_values(samples, margin, halo_threshold)
    return float(vals.mean()) if len(vals) else None


def background_noise_values(
    samples: Sequence[np.ndarray], margin: int = 2, halo_threshold: float = HALO_THRESHOLD
) -> np.ndarray:
    """Per-clip scores of :func:`background_noise` (float64 ``[num_clips_with_background]``)."""
    vals = []
    for clip in samples:
        m = _clip_masks(clip)
        background = ~_dilate(m.distance > halo_threshold, margin)
        if background.any():
            residual = np.abs(m.x - m.median).mean(-1)
            vals.append(residual[background].mean())
    return np.asarray(vals, dtype=np.float64)


def mean_bootstrap_ci(
    values: np.ndarray, resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> list[float] | None:
    """Percentile bootstrap interval ``[low, high]`` of the mean of ``values`` (None when
    there are none or ``resamples`` is 0)."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values) or resamples < 1:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[idx].mean(axis=1)
    q = (1.0 - confidence) / 2.0
    return [float(np.quantile(means, q)), float(np.quantile(means, 1.0 - q))]


def saturation_values(samples: Sequence[np.ndarray]) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` (0 where max = 0) of every object pixel of every
    clip, pooled: ``[num_object_pixels]`` in [0, 1].

    Object pixels: those whose 3x3-median-filtered value is farther than
    :data:`FOREGROUND_THRESHOLD` (L1, 0-255) from the clip's border-median background colour,
    the scorer's foreground criterion. Only object pixels count because the background is grey
    (saturation ~0) and covers most of the frame: a histogram over all pixels would be a spike
    at 0 whose height is set by the object's *area*, so the distance would measure shape size,
    not tone; CFG's over-saturation shows on the coloured object. Median-filtering the mask
    keeps isolated background speckle out (that is :func:`background_noise`'s business), while
    the saturation itself is read from the unfiltered pixels.
    """
    vals = []
    for clip in samples:
        m = _clip_masks(clip)
        px = m.x[m.distance > FOREGROUND_THRESHOLD]  # [K, 3]
        hi, lo = px.max(-1), px.min(-1)
        vals.append(np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-12), 0.0))
    return np.concatenate(vals) if vals else np.empty(0)


def saturation_histogram(values: np.ndarray, bins: int = 100) -> np.ndarray:
    """Normalised histogram of saturations over ``bins`` equal bins of [0, 1]."""
    h, _ = np.histogram(np.clip(values, 0, 1), bins=bins, range=(0.0, 1.0))
    return h / max(h.sum(), 1)


def wasserstein1_hist(p: np.ndarray, q: np.ndarray) -> float:
    """1-D Wasserstein-1 distance between normalised histograms on the same equal bins of
    [0, 1]: ``sum_k |P_k - Q_k| / bins`` with P, Q the cumulative sums (0 = identical, at most
    1 = all mass at opposite ends)."""
    return float(np.abs(np.cumsum(p) - np.cumsum(q)).sum() / len(p))


def saturation_distance(
    samples: Sequence[np.ndarray] | np.ndarray,
    reference: Sequence[np.ndarray] | np.ndarray,
    bins: int = 100,
) -> float | None:
    """Wasserstein-1 distance between the object-pixel saturation histograms
    (:func:`saturation_values`, ``bins`` fixed bins over [0, 1]) of ``samples`` and
    ``reference``; either may also be given as precomputed saturation values (1-D array).
    In saturation units: 0.05 = as if every object pixel were 0.05 more (or less) saturated.
    It has no sign: read :func:`saturation_values`' mean for the direction. None when either
    set has no object pixels."""
    vals = [
        s if isinstance(s, np.ndarray) and s.ndim == 1 else saturation_values(s)
        for s in (samples, reference)
    ]
    if any(len(v) == 0 for v in vals):
        return None
    return wasserstein1_hist(*(saturation_histogram(v, bins) for v in vals))


# ---------------------------------------------------------------------------------------------
# Captions, features, rows of the table
# ---------------------------------------------------------------------------------------------


def caption_accuracy(samples: Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """Share of samples whose colour / shape / motion match the caption (and all three)."""
    scores = [score_sample(s, c) for s, c in zip(samples, captions, strict=True)]
    out = {k: float(np.mean([s[k] for s in scores])) for k in ("color", "shape", "motion")}
    out["all"] = float(np.mean([all(s.values()) for s in scores]))
    return out


@torch.no_grad()
def features_of(net: FeatureNet, samples: Sequence[np.ndarray], batch: int = 256) -> np.ndarray:
    """Feature vectors ``[N, D]`` (float64) of clips."""
    out = []
    for i in range(0, len(samples), batch):
        x = torch.stack([to_pair(s, net.size) for s in samples[i : i + batch]])
        out.append(net.features(x).numpy().astype(np.float64))
    return np.concatenate(out)


@dataclass
class Reference:
    """What every row is compared with: the reference clips' features, sharpness and object
    saturations (computed once)."""

    features: np.ndarray
    sharpness: float
    saturations: np.ndarray
    num_samples: int

    @classmethod
    def of(cls, net: FeatureNet, samples: Sequence[np.ndarray]) -> Reference:
        return cls(features_of(net, samples), sharpness(samples), saturation_values(samples),
                   len(samples))  # fmt: skip


def evaluate_samples(
    net: FeatureNet,
    samples: Sequence[np.ndarray],
    captions: Sequence[str],
    reference: Reference,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """One row of the results table (keys: ``fd``, ``fd_ci``, ``sharpness``,
    ``sharpness_ratio``, ``background_noise``, ``background_noise_ci``, ``saturation_distance``,
    ``saturation_mean``,
    ``caption_{color,shape,motion,all}``, ``num_samples``). Undefined values are None."""
    boot = frechet_distance_bootstrap(
        features_of(net, samples), reference.features, bootstrap, seed
    )
    sharp = sharpness(samples)
    sat = saturation_values(samples)
    noise = background_noise_values(samples)
    row = {
        "fd": boot.fd,
        "fd_ci": [boot.ci[0], boot.ci[1]] if bootstrap > 0 else None,
        "sharpness": sharp,
        "sharpness_ratio": sharp / reference.sharpness if reference.sharpness > 0 else None,
        "background_noise": float(noise.mean()) if len(noise) else None,
        "background_noise_ci": mean_bootstrap_ci(noise, bootstrap, seed),
        "saturation_distance": saturation_distance(sat, reference.saturations),
        "saturation_mean": float(sat.mean()) if len(sat) else None,
    }
    row.update({f"caption_{k}": v for k, v in caption_accuracy(samples, captions).items()})
    row["num_samples"] = len(samples)
    return row


def evaluate_against_real(
    net: FeatureNet,
    real: Sequence[np.ndarray],
    real_captions: Sequence[str],
    rows: Mapping[str, tuple[Sequence[np.ndarray], Sequence[str]]],
    bootstrap: int = 1000,
    seed: int = 0,
    max_samples: int | None = None,
    log=None,
) -> dict:
    """The whole table: ``{"real": row, "rows": {name: row}, "reference": {...},
    "bootstrap": n, "warnings": [...]}``.

    The real clips are split in two halves of ``h = min(len(real) // 2, max_samples)`` clips:
    ``real[h:2h]`` is the *reference* of every row (FD, sharpness ratio, saturation distance),
    ``real[:h]`` is scored against it as the "real data" row (the floor of each metric at that
    N). Each generated row uses its first ``max_samples`` clips (all if None). When the rows
    were generated from the real captions in order (as the demo does), a row's first ``h``
    clips share their prompts with the real-data row, not with the reference, so every row is
    measured exactly like the floor. FD depends on N: a row whose N differs from the
    reference's gets a warning (printed through ``log``, default stderr, and returned).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    h = len(real) // 2 if max_samples is None else min(len(real) // 2, max_samples)
    if h < 2:
        raise ValueError(f"need at least 4 real clips (two halves of 2), got {len(real)}")
    ref = Reference.of(net, real[h : 2 * h])
    kw = {"bootstrap": bootstrap, "seed": seed}
    out = {
        "real": evaluate_samples(net, real[:h], real_captions[:h], ref, **kw),
        "rows": {},
        "reference": {
            "num_samples": ref.num_samples,
            "sharpness": ref.sharpness,
            "saturation_mean": float(ref.saturations.mean()) if len(ref.saturations) else None,
        },
        "bootstrap": bootstrap,
        "warnings": [],
    }
    for name, (samples, captions) in rows.items():
        n = len(samples) if max_samples is None else min(len(samples), max_samples)
        if n != h:
            msg = (
                f"warning: row {name!r} has N={n} samples but the reference has N={h}: FD is "
                f"biased by N, compare rows of equal N (e.g. --max-samples {min(n, h)})"
            )
            out["warnings"].append(msg)
            log(msg)
        out["rows"][name] = evaluate_samples(net, samples[:n], captions[:n], ref, **kw)
    return out


def _fmt(v, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_table(results: Mapping) -> str:
    """The Markdown table (and notes) of an :func:`evaluate_against_real` result."""
    lines = [
        "| method | FD ↓ [95 % CI] | sharpness ratio (real = 1) | background noise ↓ [95 % CI] | "
        "saturation distance ↓ (mean saturation) | colour | shape | motion | all | N |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in {"real data": results["real"], **results["rows"]}.items():
        ci = r.get("fd_ci")
        fd = _fmt(r["fd"]) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")
        sat = f"{_fmt(r['saturation_distance'], 3)} ({_fmt(r['saturation_mean'], 2)})"
        nci = r.get("background_noise_ci")
        noise = _fmt(r["background_noise"]) + (f" [{_fmt(nci[0])}, {_fmt(nci[1])}]" if nci else "")
        caps = " | ".join(_fmt(r[f"caption_{k}"]) for k in ("color", "shape", "motion", "all"))
        lines.append(
            f"| {name} | {fd} | {_fmt(r['sharpness_ratio'])} | {noise} | "
            f"{sat} | {caps} | {r['num_samples']} |"
        )
    ref = results["reference"]
    lines += [
        "",
        f"Every row is compared with the same reference: {ref['num_samples']} held-out real "
        f"clips; 'real data' is the other half of the held-out set (the floor of each metric). "
        f"FD interval: 95 % percentile bootstrap, {results['bootstrap']} resamples, centred on "
        "the estimate (FD itself is biased upward at finite N: compare rows of equal N only). "
        "Sharpness ratio: Laplacian variance over the "
        "reference's. Background noise: mean |pixel - 3x3 median| on the background, 0-255, "
        "with a 95 % percentile bootstrap interval of its mean over clips. "
        "Saturation distance: Wasserstein-1 between object-pixel HSV-saturation histograms.",
    ]
    lines += [f"\n**{w}**" for w in results.get("warnings", [])]
    return "\n".join(lines)
