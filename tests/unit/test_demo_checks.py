"""The demo's claims (megatron_apt.evaluation.checks) on hand-made results and metrics."""

from __future__ import annotations

import copy

from megatron_apt.evaluation.checks import d_accuracy_band, demo_checks, fd_separated


def _row(fd, lo, hi, noise=0.5, all_=0.6, n=2048):
    return {
        "fd": fd,
        "fd_ci": [lo, hi],
        "num_samples": n,
        "background_noise": noise,
        "background_noise_ci": [noise - 0.05, noise + 0.05],
        "caption_all": all_,
        "caption_color": 0.9,
        "caption_shape": 0.7,
        "caption_motion": 0.95,
    }


RESULTS = {
    "real": _row(9.0, 0.0, 20.0, noise=0.0, all_=1.0),
    "rows": {
        "diffusion 25 steps (CFG)": _row(120.0, 100.0, 140.0, noise=1.0, all_=0.55, n=256),
        "consistency 1 step": _row(240.0, 210.0, 280.0, noise=3.0),
        "APT 1 step": _row(150.0, 130.0, 175.0, noise=0.8),
        "APT 1 step (teacher's N)": _row(160.0, 120.0, 200.0, noise=0.8, n=256),
    },
}


def _records(real_acc, fake_acc, steps=10, events=()):
    recs = [
        {"step": s, "d_acc_real": real_acc(s), "d_acc_fake": fake_acc(s), "loss_d": 1.0}
        for s in range(1, steps + 1)
    ]
    return recs + [{"step": s, "event": e} for s, e in events]


def test_a_healthy_run_passes_every_check():
    checks = demo_checks(RESULTS, _records(lambda s: 0.7, lambda s: 0.8))
    assert [c.passed for c in checks] == [True] * 5, [c.line() for c in checks]
    assert all(c.line().startswith("[PASS]") for c in checks)


def test_each_claim_fails_on_its_own():
    base = _records(lambda s: 0.7, lambda s: 0.8)
    overlap = copy.deepcopy(RESULTS)
    overlap["rows"]["APT 1 step"]["fd_ci"] = [180.0, 215.0]  # touches consistency's [210, 280]
    noisy = copy.deepcopy(RESULTS)  # APT's interval [1.15, 1.25] wholly above [0.95, 1.05]
    noisy["rows"]["APT 1 step (teacher's N)"].update(
        background_noise=1.2, background_noise_ci=[1.15, 1.25]
    )
    weak = copy.deepcopy(RESULTS)
    weak["rows"]["diffusion 25 steps (CFG)"]["caption_all"] = 0.49
    cases = {
        0: demo_checks(overlap, base),
        1: demo_checks(noisy, base),
        2: demo_checks(weak, base),
        3: demo_checks(RESULTS, _records(lambda s: 0.7, lambda s: 0.8, events=[(5, "collapse")])),
        4: demo_checks(RESULTS, _records(lambda s: 0.7, lambda s: 0.99 if s == 9 else 0.8)),
    }
    for failing, checks in cases.items():
        assert [c.passed for c in checks] == [i != failing for i in range(5)], (
            failing,
            [c.line() for c in checks],
        )


def test_d_band_reads_only_the_second_half():
    # saturated early (step 1-5 of 10), healthy later: passes; blind late: fails
    res = d_accuracy_band(_records(lambda s: 1.0 if s <= 5 else 0.7, lambda s: 0.8))
    assert res.ok and "over 5 log steps" in res.detail and not res.saturated
    res = d_accuracy_band(_records(lambda s: 0.7, lambda s: 0.5 if s > 8 else 0.8))
    assert not res.ok and res.at_chance and not res.saturated
    res = d_accuracy_band([{"step": 1, "loss_d": 1.0}])
    assert not res.ok and res.detail == "no d_acc_real/d_acc_fake logged"


def test_d_at_chance_is_fine_when_apt_reaches_the_real_floor():
    at_floor = copy.deepcopy(RESULTS)
    at_floor["rows"]["APT 1 step"].update(fd=12.0, fd_ci=[5.0, 25.0])
    blind = _records(lambda s: 0.5, lambda s: 0.5)
    check = demo_checks(at_floor, blind)[4]
    assert check.passed and "equilibrium" in check.detail
    assert not demo_checks(RESULTS, blind)[4].passed


def test_a_saturated_d_is_never_excused_even_at_the_real_floor():
    """Before issue 30 the excuse covered any D outside the band whenever APT's FD touched
    the floor, a saturated one too (its docstring said: only a D at chance)."""
    at_floor = copy.deepcopy(RESULTS)
    at_floor["rows"]["APT 1 step"].update(fd=12.0, fd_ci=[5.0, 25.0])
    saturated = _records(lambda s: 0.97, lambda s: 0.99)
    check = demo_checks(at_floor, saturated)[4]
    assert not check.passed and "saturated" in check.detail, check.line()
    # one value at chance, another saturated: still saturated, not excused
    mixed = _records(lambda s: 0.5, lambda s: 0.99)
    assert not demo_checks(at_floor, mixed)[4].passed


def test_background_noise_is_compared_on_intervals_at_the_teachers_n():
    # the point estimate above the teacher's, the intervals overlapping: not above (passes);
    # the old check compared point estimates and failed here
    tie = copy.deepcopy(RESULTS)
    tie["rows"]["APT 1 step (teacher's N)"].update(
        background_noise=1.02, background_noise_ci=[0.97, 1.07]
    )
    assert demo_checks(tie, _records(lambda s: 0.7, lambda s: 0.8))[1].passed
    # APT's point estimate below, but only the full-N row exists and its N is not the
    # teacher's: not compared, fails and says why
    unequal = copy.deepcopy(RESULTS)
    del unequal["rows"]["APT 1 step (teacher's N)"]
    check = demo_checks(unequal, _records(lambda s: 0.7, lambda s: 0.8))[1]
    assert not check.passed and "sample counts differ" in check.detail
    # no interval: cannot pass
    bare = copy.deepcopy(RESULTS)
    bare["rows"]["APT 1 step (teacher's N)"]["background_noise_ci"] = None
    assert not demo_checks(bare, _records(lambda s: 0.7, lambda s: 0.8))[1].passed


def test_fd_separated_is_strict():
    assert fd_separated({"fd": 1, "fd_ci": [0, 2]}, {"fd": 3, "fd_ci": [2.5, 4]})
    assert not fd_separated({"fd": 1, "fd_ci": [0, 2.5]}, {"fd": 3, "fd_ci": [2.5, 4]})
    assert not fd_separated({"fd": 3, "fd_ci": [2.5, 4]}, {"fd": 1, "fd_ci": [0, 2]})
