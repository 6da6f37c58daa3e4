"""Sample-quality metrics of generated clips (uint8 ``[T, H, W, 3]``) against real ones.

Every number is measured against one *reference* set (half of the held-out real data, see
:func:`evaluate_against_real`), and the other half of the real data is scored the same way as a
row of its own: the floor each metric reaches on real data (and again at the sample count of
every row that has fewer clips, so that a row is only compared with a floor of its own N).

* :func:`frechet_distance_bootstrap`: Fréchet distance in the feature space of the whole-clip
  video network (:mod:`megatron_apt.evaluation.features`: every frame and the motion between
  them; FVD-style) with a percentile bootstrap 95 % interval, so that differences within the
  noise of the measurement show. The headline number.
* :func:`conditional_frechet_bootstrap`: the same distance per caption class (each colour, each
  shape, each motion: the clips whose prompt names it, against the real clips whose caption
  does), averaged over the classes: a sample of the wrong colour or shape for its prompt costs
  here even when the colour histogram over all samples matches.
* :func:`caption_accuracy`: colour / shape / motion / all read back by the synthetic data's
  pixel scorer (independent of the feature network), with bootstrap intervals.
* :func:`sharpness`: variance of the Laplacian (reported as a ratio to the reference's); it
  rewards speckle as much as detail, hence
* :func:`background_noise`: high-frequency residual on the plain background, where real data
  has none, so that noise cannot pass for detail;
* :func:`saturation_distance`: distance of the objects' colour-saturation histogram to the
  reference's (the over-saturation of CFG, section 5.3 of the paper).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from megatron_apt.data.synthetic import score_sample
from megatron_apt.evaluation.features import VideoFeatureNet, to_clip
from megatron_apt.evaluation.frechet import (  # noqa: F401  (re-exported: the metrics' API)
    CAPTION_ATTRIBUTES,
    ConditionalFrechet,
    FrechetBootstrap,
    ReferenceMoments,
    bootstrap_indices,
    caption_classes,
    conditional_frechet_bootstrap,
    frechet_distance,
    frechet_distance_bootstrap,
)

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


def caption_scores(samples: Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, np.ndarray]:
    """Per clip, whether its colour / shape / motion (and all three) match its caption:
    ``{"color": bool [N], ..., "all": bool [N]}``."""
    scores = [score_sample(s, c) for s, c in zip(samples, captions, strict=True)]
    out = {k: np.array([s[k] for s in scores], dtype=bool) for k in CAPTION_ATTRIBUTES}
    out["all"] = out["color"] & out["shape"] & out["motion"]
    return out


def caption_accuracy(samples: Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """Share of samples whose colour / shape / motion match the caption (and all three)."""
    return {k: float(v.mean()) for k, v in caption_scores(samples, captions).items()}


@torch.no_grad()
def features_of(
    net: VideoFeatureNet, samples: Sequence[np.ndarray], batch: int = 256, name: str = "clips"
) -> np.ndarray:
    """Feature vectors ``[N, D]`` (float64) of whole clips; every clip must have the frame
    count the net was trained for (``name`` says whose clips in the error)."""
    bad = sorted({len(s) for s in samples} - {net.frames})
    if bad:
        raise ValueError(
            f"{name}: clips of {bad} frames, but the feature net was trained on clips of "
            f"{net.frames} frames (its FD would not mean anything): train one for these clips "
            "(tools/evaluate.py --frames, another --feature-net path)"
        )
    out = []
    for i in range(0, len(samples), batch):
        x = torch.stack([to_clip(s, net.size) for s in samples[i : i + batch]])
        out.append(net.features(x).numpy().astype(np.float64))
    return np.concatenate(out)


@dataclass
class Reference:
    """What every row is compared with: the reference clips' features, captions, sharpness and
    object saturations (computed once)."""

    features: np.ndarray
    captions: list[str]
    sharpness: float
    saturations: np.ndarray
    num_samples: int

    def __post_init__(self):
        self.moments = ReferenceMoments(self.features)  # its bootstrap, shared by every row

    @classmethod
    def of(cls, net: VideoFeatureNet, samples: Sequence[np.ndarray], captions: Sequence[str]):
        return cls(features_of(net, samples, name="reference"), list(captions),
                   sharpness(samples), saturation_values(samples), len(samples))  # fmt: skip


def evaluate_samples(
    net: VideoFeatureNet,
    samples: Sequence[np.ndarray],
    captions: Sequence[str],
    reference: Reference,
    bootstrap: int = 1000,
    seed: int = 0,
    name: str = "clips",
) -> dict:
    """One row of the results table. Keys: ``fd``, ``fd_ci`` (whole-clip video FD, the
    headline), ``cfd``, ``cfd_ci``, ``cfd_classes`` (caption-conditional FD, its classes),
    ``sharpness``, ``sharpness_ratio``, ``background_noise``, ``background_noise_ci``,
    ``saturation_distance``, ``saturation_mean``, ``caption_{color,shape,motion,all}`` and
    their ``_ci``, ``num_samples``. Undefined values are None (``cfd`` when no caption class
    has 16 clips on both sides: a handful of samples)."""
    feats = features_of(net, samples, name=name)
    boot = frechet_distance_bootstrap(feats, reference.moments, bootstrap, seed)
    try:
        cond = conditional_frechet_bootstrap(
            feats, captions, reference.features, reference.captions, bootstrap, seed
        )
    except ValueError:  # no caption class with enough clips (a handful of samples): undefined
        cond = None
    sharp = sharpness(samples)
    sat = saturation_values(samples)
    noise = background_noise_values(samples)
    row = {
        "fd": boot.fd,
        "fd_ci": [boot.ci[0], boot.ci[1]] if bootstrap > 0 else None,
        "cfd": cond.fd if cond else None,
        "cfd_ci": [cond.ci[0], cond.ci[1]] if cond and bootstrap > 0 else None,
        "cfd_classes": {k: v[0] for k, v in cond.per_class.items()} if cond else {},
        "sharpness": sharp,
        "sharpness_ratio": sharp / reference.sharpness if reference.sharpness > 0 else None,
        "background_noise": float(noise.mean()) if len(noise) else None,
        "background_noise_ci": mean_bootstrap_ci(noise, bootstrap, seed),
        "saturation_distance": saturation_distance(sat, reference.saturations),
        "saturation_mean": float(sat.mean()) if len(sat) else None,
    }
    for k, v in caption_scores(samples, captions).items():
        row[f"caption_{k}"] = float(v.mean())
        row[f"caption_{k}_ci"] = mean_bootstrap_ci(v, bootstrap, seed)
    row["num_samples"] = len(samples)
    return row


def evaluate_against_real(
    net: VideoFeatureNet,
    real: Sequence[np.ndarray],
    real_captions: Sequence[str],
    rows: Mapping[str, tuple[Sequence[np.ndarray], Sequence[str]]],
    bootstrap: int = 1000,
    seed: int = 0,
    max_samples: int | None = None,
    log=None,
    limits: Mapping[str, int] | None = None,
) -> dict:
    """The whole table: ``{"real": row, "rows": {name: row}, "floors": {N: row},
    "reference": {...}, "bootstrap": n, "warnings": [...]}``.

    The real clips are split in two halves of ``h = min(len(real) // 2, max_samples)`` clips:
    ``real[h:2h]`` is the *reference* of every row (FD, conditional FD, sharpness ratio,
    saturation distance), ``real[:h]`` is scored against it as the "real data" row (the floor
    of each metric at that N). Each generated row uses its first ``max_samples`` clips (all if
    None; ``limits[name]`` caps a row further). When the rows were generated from the real
    captions in order (as the demo does), a row's first ``n`` clips share their prompts with
    the real-data row's first ``n``, so every row is measured exactly like the floor. FD
    depends on N: for every row with fewer clips than ``h`` the floor is measured again at its
    N (``floors[str(n)]``: ``real[:n]`` against the same reference), and the row gets a warning
    (printed through ``log``, default stderr, and returned): compare it only with rows and
    floors of its own N.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    limits = dict(limits or {})
    unknown = sorted(set(limits) - set(rows))
    if unknown:
        raise ValueError(f"sample limits for rows that are not in the table: {unknown}")
    h = len(real) // 2 if max_samples is None else min(len(real) // 2, max_samples)
    if h < 2:
        raise ValueError(f"need at least 4 real clips (two halves of 2), got {len(real)}")
    ref = Reference.of(net, real[h : 2 * h], real_captions[h : 2 * h])
    kw = {"bootstrap": bootstrap, "seed": seed}
    out = {
        "real": evaluate_samples(net, real[:h], real_captions[:h], ref, name="real", **kw),
        "rows": {},
        "floors": {},
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
        n = min(n, limits.get(name, n))
        if n != h:
            msg = (
                f"warning: row {name!r} has N={n} samples but the reference has N={h}: FD is "
                f"biased by N, compare it only with rows and the real-data floor of N={n}"
            )
            out["warnings"].append(msg)
            log(msg)
            if n < h and str(n) not in out["floors"] and n >= 2:
                out["floors"][str(n)] = evaluate_samples(
                    net, real[:n], real_captions[:n], ref, name=f"real (first {n})", **kw
                )
        out["rows"][name] = evaluate_samples(
            net, samples[:n], captions[:n], ref, name=f"row {name!r}", **kw
        )
    return out


def _fmt(v, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ci_text(row: Mapping, key: str, digits: int = 2) -> str:
    ci = row.get(f"{key}_ci")
    return _fmt(row.get(key), digits) + (
        f" [{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]" if ci else ""
    )


def markdown_table(results: Mapping) -> str:
    """The Markdown table (and notes) of an :func:`evaluate_against_real` result."""
    lines = [
        "| method | video FD ↓ [95 % CI] | conditional FD ↓ [95 % CI] | caption all [95 % CI] | "
        "colour | shape | motion | background noise ↓ [95 % CI] | sharpness ratio (real = 1) | "
        "saturation distance ↓ (mean saturation) | N |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    floors = {f"real data (first {n})": r for n, r in results.get("floors", {}).items()}
    for name, r in {"real data": results["real"], **floors, **results["rows"]}.items():
        sat = f"{_fmt(r['saturation_distance'], 3)} ({_fmt(r['saturation_mean'], 2)})"
        caps = " | ".join(_fmt(r[f"caption_{k}"]) for k in ("color", "shape", "motion"))
        lines.append(
            f"| {name} | {_ci_text(r, 'fd', 1)} | {_ci_text(r, 'cfd', 1)} | "
            f"{_ci_text(r, 'caption_all')} | {caps} | {_ci_text(r, 'background_noise', 3)} | "
            f"{_fmt(r['sharpness_ratio'])} | {sat} | {r['num_samples']} |"
        )
    ref = results["reference"]
    lines += [
        "",
        f"Every row is compared with the same reference: {ref['num_samples']} held-out real "
        f"clips; 'real data' is the other half of the held-out set (the floor of each metric), "
        "measured again at the N of every row that has fewer clips ('real data (first N)'). "
        "Video FD: Fréchet distance in the feature space of a (2+1)D network over every frame "
        "and the motion between frames, trained on freshly rendered clips without "
        "augmentation. Conditional FD: the same per caption class (each colour, shape and "
        "motion: the clips prompted with it against the real clips captioned with it), "
        f"averaged over the classes. Intervals: 95 % percentile bootstrap, "
        f"{results['bootstrap']} resamples, the FDs' centred on the estimate (FD is biased "
        "upward at finite N: compare rows of equal N only). Caption accuracy: colour, shape "
        "and motion read back from the pixels by the synthetic data's scorer. Sharpness "
        "ratio: Laplacian variance over the reference's. Background noise: mean |pixel - 3x3 "
        "median| on the background, 0-255. Saturation distance: Wasserstein-1 between "
        "object-pixel HSV-saturation histograms.",
    ]
    lines += [f"\n**{w}**" for w in results.get("warnings", [])]
    return "\n".join(lines)
