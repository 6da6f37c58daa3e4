"""The bootstrap interval of FD, background noise and saturation distance on known cases."""

import numpy as np
import pytest

from megatron_apt.data.synthetic import random_spec, render
from megatron_apt.evaluation.metrics import (
    background_noise,
    background_noise_values,
    frechet_distance,
    frechet_distance_bootstrap,
    mean_bootstrap_ci,
    saturation_distance,
    saturation_values,
    sharpness,
    wasserstein1_hist,
)

D = 4
MU = np.array([1.0, 0.5, 0.0, 0.0])
SCALE = np.array([1.0, 1.0, 1.5, 0.7])  # b ~ N(MU, diag(SCALE^2)), a ~ N(0, I)
ANALYTIC_FD = float((MU**2).sum() + ((1 - SCALE) ** 2).sum())  # 1.25 + 0.25 + 0.09 = 1.59


def _gaussians(n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, D)), MU + SCALE * rng.normal(size=(n, D))


def test_bootstrap_resamples_are_fd_of_explicit_resamples_whatever_the_chunk():
    a, b = _gaussians(300, 0)
    b = b @ np.random.default_rng(1).normal(size=(D, D))  # full covariance
    r = frechet_distance_bootstrap(a, b, 50, seed=3, chunk=7)
    assert r.fd == pytest.approx(frechet_distance(a, b), rel=1e-12)
    # the documented draw: each side from its own stream, default_rng([seed, side])
    ia = np.random.default_rng([3, 0]).integers(0, 300, (50, 300))
    ib = np.random.default_rng([3, 1]).integers(0, 300, (50, 300))
    for k in (0, 17, 49):
        # rel 1e-6: the resampled second moments are summed in float32 (measured ~1e-7)
        assert r.resamples[k] == pytest.approx(frechet_distance(a[ia[k]], b[ib[k]]), rel=1e-6)
    np.testing.assert_allclose(  # another chunk: another float32 GEMM shape, same draws
        r.resamples, frechet_distance_bootstrap(a, b, 50, seed=3).resamples, rtol=1e-6
    )
    # a reference's resamples are the same whatever the scored set's size, and computed once
    from megatron_apt.evaluation.metrics import ReferenceMoments

    ref = ReferenceMoments(b)
    small = frechet_distance_bootstrap(a[:100], ref, 50, seed=3, chunk=7)
    assert small.resamples[17] == pytest.approx(
        frechet_distance(a[:100][np.random.default_rng([3, 0]).integers(0, 100, (50, 100))[17]],
                         b[ib[17]]), rel=1e-6)  # fmt: skip
    again = frechet_distance_bootstrap(a, ref, 50, seed=3, chunk=7)
    np.testing.assert_allclose(again.resamples, r.resamples, rtol=1e-10)
    lo, hi = r.ci  # the percentile interval shifted by the bootstrap's bias estimate
    shift = r.resamples.mean() - r.fd
    assert lo == pytest.approx(max(0.0, np.percentile(r.resamples, 2.5) - shift))
    assert hi == pytest.approx(np.percentile(r.resamples, 97.5) - shift) and lo < r.fd < hi


def test_bootstrap_interval_contains_its_estimate_near_zero():
    """Real vs real: the unshifted percentile interval sits wholly above the estimate (the
    resampling bias); the shifted one contains it and starts at 0."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, D)), rng.normal(size=(400, D))
    r = frechet_distance_bootstrap(a, b, 300, seed=0)
    assert np.percentile(r.resamples, 2.5) > r.fd  # what an unshifted interval would show
    assert r.ci[0] <= r.fd <= r.ci[1]


def test_bootstrap_interval_covers_analytic_fd_and_narrows_with_n():
    widths = {}
    for n in (500, 4000):
        a, b = _gaussians(n, n)
        r = frechet_distance_bootstrap(a, b, 400, seed=0)
        lo, hi = r.ci
        assert lo <= ANALYTIC_FD <= hi, (n, r.ci)
        assert abs(r.fd - ANALYTIC_FD) < hi - lo
        widths[n] = hi - lo
    # 8x the samples: about sqrt(8) = 2.8x narrower
    assert widths[4000] < 0.5 * widths[500], widths


def test_identical_sets_interval_near_zero_relative_to_a_shifted_set():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1000, 16))
    same = frechet_distance_bootstrap(a, a, 200, seed=0)
    shifted = frechet_distance_bootstrap(a, a + 0.5, 200, seed=0)  # FD = 16 * 0.25 = 4
    assert same.fd == pytest.approx(0.0, abs=1e-8)
    assert shifted.fd == pytest.approx(4.0, rel=1e-6)
    # centred on 0 (clipped) and far below the shifted set's interval
    assert same.ci[0] == 0.0 and same.ci[1] < 0.1 * shifted.ci[0]


def test_bootstrap_singular_covariance_and_no_resamples():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.normal(size=(50, 3)), np.ones((50, 1))], 1)  # a dead feature
    r = frechet_distance_bootstrap(a, a + 1.0, 20, seed=0)
    assert np.isfinite(r.resamples).all() and r.fd == pytest.approx(4.0, rel=1e-6)
    r0 = frechet_distance_bootstrap(a, a, 0)
    assert np.isnan(r0.ci[0]) and len(r0.resamples) == 0
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance_bootstrap(a, a[:, :2])


def _clips(n=16, size=16, frames=5, seed=0):
    return [render(random_spec(seed, i, size, video=True), size, frames) for i in range(n)]


def _box_blur(f):
    x = f.astype(np.float64)
    x = (x[:, :-1] + x[:, 1:]) / 2
    x = (x[:, :, :-1] + x[:, :, 1:]) / 2
    return np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge").round().astype(np.uint8)


def test_background_noise_zero_on_clean_and_soft_edges_positive_on_speckle():
    clean = _clips()
    assert background_noise(clean) == pytest.approx(0.0, abs=1e-9)
    # blurred (anti-aliased) object edges are not background noise ...
    assert background_noise([_box_blur(f) for f in clean]) < 0.1
    # ... speckle is, even where it raises sharpness above the clean data's
    rng = np.random.default_rng(0)
    speckle = []
    for f in clean:
        hit = rng.random(f.shape[:3] + (1,)) < 0.1
        delta = rng.choice([-40, 40], f.shape[:3] + (1,))
        speckle.append(np.clip(f.astype(int) + hit * delta, 0, 255).astype(np.uint8))
    assert sharpness(speckle) > 1.2 * sharpness(clean)
    assert background_noise(speckle) > 2.0
    gauss = [np.clip(f + rng.normal(0, 8, f.shape), 0, 255).astype(np.uint8) for f in clean]
    assert background_noise(gauss) > 3.0
    assert background_noise([np.full((2, 8, 8, 3), 200, np.uint8)]) == 0.0  # all background


def test_mean_bootstrap_ci_known_answers():
    # constant values: the interval is the point
    assert mean_bootstrap_ci(np.full(50, 0.7)) == pytest.approx([0.7, 0.7])
    assert mean_bootstrap_ci(np.array([])) is None and mean_bootstrap_ci(np.ones(3), 0) is None
    # N(0, 1) samples: the 95 % interval of the mean is about mean +- 1.96 / sqrt(N)
    x = np.random.default_rng(1).normal(0.0, 1.0, 4000)
    lo, hi = mean_bootstrap_ci(x, resamples=2000, seed=3)
    assert lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / np.sqrt(len(x)), rel=0.1)
    # per-clip values: their mean is background_noise, and clips without background drop out
    clean, rng = _clips(), np.random.default_rng(0)
    noisy = [np.clip(f + rng.normal(0, 8, f.shape), 0, 255).astype(np.uint8) for f in clean]
    full = [np.full((2, 8, 8, 3), 200, np.uint8)]  # all background: scores 0, counts
    vals = background_noise_values(noisy + full)
    assert len(vals) == len(noisy) + 1 and vals[-1] == 0.0
    assert vals.mean() == pytest.approx(background_noise(noisy + full))


def _oversaturate(f, k=1.12):
    x = f.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return np.clip(top - (top - x) * k, 0, 255).round().astype(np.uint8)  # min channel -> 0


def test_saturation_distance_zero_to_itself_larger_when_oversaturated():
    clean = _clips(24)
    assert saturation_distance(clean, clean) == 0.0
    other = _clips(24, seed=1)
    over = [_oversaturate(f) for f in clean]
    floor = saturation_distance(other, clean)
    assert saturation_distance(over, clean) > max(0.05, 5 * floor)
    assert saturation_values(over).mean() > saturation_values(clean).mean() + 0.05
    # the grey background does not count: more background pixels change nothing
    padded = [np.pad(f, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="edge") for f in clean]
    assert saturation_distance(padded, clean) == 0.0
    # no object at all: undefined, not a number
    assert saturation_distance([np.full((2, 8, 8, 3), 24, np.uint8)], clean) is None


def test_wasserstein1_hist_hand_values():
    p, q = np.zeros(10), np.zeros(10)
    p[0], q[9] = 1.0, 1.0
    assert wasserstein1_hist(p, q) == pytest.approx(0.9)  # bin 0 to bin 9: 9 bins of 0.1
    q2 = np.zeros(10)
    q2[1] = 1.0
    assert wasserstein1_hist(p, q2) == pytest.approx(0.1)


def test_conditional_fd_is_the_mean_of_per_class_fds_and_sees_prompt_mismatch():
    """Hand construction: the feature's first coordinate says the colour (red 0, blue 5); the
    conditional FD is the mean over the caption classes present (colour, shape, motion) of the
    FD within the class, each by :func:`frechet_distance`; swapping the colours' captions
    leaves the unconditional FD unchanged and raises the conditional one."""
    from megatron_apt.evaluation.metrics import caption_classes, conditional_frechet_bootstrap

    rng = np.random.default_rng(0)

    def make(n):
        caps = [
            f"a {c} {s} moving left"
            for c, s in zip(
                rng.choice(["red", "blue"], n), rng.choice(["circle", "square"], n), strict=True
            )
        ]
        feats = rng.normal(size=(n, 3))
        feats[:, 0] += np.array([5.0 if "blue" in c else 0.0 for c in caps])
        return feats, caps

    a, a_caps = make(800)
    b, b_caps = make(800)
    got = conditional_frechet_bootstrap(a, a_caps, b, b_caps, num_resamples=0)
    want = {}
    for k in ("color=red", "color=blue", "shape=circle", "shape=square", "motion=left"):
        ia = [i for i, c in enumerate(a_caps) if k in caption_classes(c)]
        ib = [i for i, c in enumerate(b_caps) if k in caption_classes(c)]
        want[k] = frechet_distance(a[ia], b[ib])
    assert set(got.per_class) == set(want) and not got.skipped
    assert got.fd == pytest.approx(np.mean(list(want.values())), rel=1e-12)
    assert got.fd < 0.1
    swapped = [c.replace("red", "X").replace("blue", "red").replace("X", "blue") for c in a_caps]
    wrong = conditional_frechet_bootstrap(a, swapped, b, b_caps, num_resamples=200)
    assert wrong.fd > 10 and wrong.ci[0] > got.fd  # colour classes now hold the other colour
    assert frechet_distance(a, b) < 0.1  # the unconditional FD cannot tell
    # classes below the minimum are skipped (and said); none left: an error naming them
    few = conditional_frechet_bootstrap(a[:24], a_caps[:24], b, b_caps, num_resamples=0)
    assert few.skipped and all(n < 16 for n, _ in few.skipped.values())
    with pytest.raises(ValueError, match="no caption class"):
        conditional_frechet_bootstrap(a[:10], a_caps[:10], b, b_caps, num_resamples=0)
