"""The ablation study's verdicts and report (megatron_apt.evaluation.study_report) on hand-made
evaluation rows: decided by disjoint FD intervals, collapse by events or FD, per seed; the
outcome words of the generated narrative, D's saturation criterion, the figure seed and the
hand-written context section."""

from __future__ import annotations

import pytest

from megatron_apt.evaluation.study_report import (
    START,
    TUNED_ON_SEEDS,
    ReportArm,
    StudyReport,
    d_saturated,
    figure_seed,
    is_opposite,
    outcome,
    raw_key,
    row_name,
    seed_verdict,
)

WORSE = frozenset({"higher", "collapsed"})


def _row(fd, half_width=10.0, n=2048):
    return {
        "num_samples": n,
        "fd": fd,
        "fd_ci": [fd - half_width, fd + half_width],
        "background_noise": 1.0,
        "sharpness_ratio": 1.0,
        "saturation_distance": 0.1,
        "caption_all": 0.4,
    }


def test_seed_verdict_needs_disjoint_intervals():
    start, ref = _row(200.0), _row(100.0)
    assert seed_verdict(_row(150.0), ref, start, []) == "higher"
    assert seed_verdict(_row(115.0), ref, start, []) == "overlap"  # [105, 125] meets [90, 110]
    assert seed_verdict(_row(60.0), ref, start, []) == "lower"
    assert seed_verdict(_row(401.0), ref, start, []) == "collapsed"  # > 2x the start's FD
    assert seed_verdict(_row(100.0), ref, start, ["collapse@40"]) == "collapsed"
    assert seed_verdict(_row(150.0), ref, start, ["rollback@40"]) == "higher"


def _report():
    fds = {"apt": (100, 105, 95), "no-r1": (500, 160, 98), "adam": (104, 99, 150)}
    rows = {START: _row(200.0), "teacher": _row(30.0, n=256), "through the VAE": _row(5.0)}
    rows |= {row_name(a, s): _row(fd) for a, v in fds.items() for s, fd in zip((1, 2, 3), v)}
    health = {
        (a, s): {"events": [], "d_acc_real": 0.7, "d_acc_fake": 0.8, "loss_d": 1.1}
        for a in fds
        for s in (1, 2, 3)
    }
    return StudyReport(
        arms={
            "apt": ReportArm("APT", "better than its init", frozenset({"lower"}), None),
            "no-r1": ReportArm("no R1", "collapse", WORSE),
            "adam": ReportArm("Adam", "equivalent", frozenset({"overlap"})),
        },
        seeds=[1, 2, 3],
        results={"real": _row(9.0), "rows": rows},
        health=health,
        references=["through the VAE", "teacher"],
    )


def test_verdicts_and_reproduction_per_arm():
    r = _report()
    assert r.verdicts("apt") == ["lower", "lower", "lower"]  # against the start (200)
    assert r.verdicts("no-r1") == ["collapsed", "higher", "overlap"]
    assert r.verdicts("adam") == ["overlap", "overlap", "higher"]
    assert (r.reproduced("apt"), r.reproduced("no-r1"), r.reproduced("adam")) == (
        "reproduced",
        "partly (2 of 3 seeds)",
        "partly (2 of 3 seeds)",  # "overlap" alone has no direction: "higher" is not opposite
    )
    s = r.summary()
    assert s["no-r1"]["fd"] == [500, 160, 98] and s["no-r1"]["verdicts"][0] == "collapsed"


def test_markdown_has_every_arm_seed_and_claim():
    md = _report().markdown()
    for text in (
        "| APT (`apt`) |",
        "| no R1 (`no-r1`) |",
        "| Adam (`adam`) |",
        "seed 1: 500.0 [490.0, 510.0]",
        "| partly (2 of 3 seeds) |",
    ):
        assert text in md, text
    assert "vs start: lower 3/3" in md and "collapsed 1/3" in md
    # the reference rows, after real data and before the start, the teacher's N marked
    lines = [x.split(" |")[0] for x in md.splitlines() if x.startswith("| ")]
    i = lines.index("| real data (floor)")
    assert lines[i + 1 : i + 4] == [
        "| through the VAE",
        "| teacher (256 samples: FD not comparable)",
        f"| {START}",
    ], lines
    assert "2048 samples per row" in md  # the references' N does not enter the footnote


def test_reference_arms_and_the_raw_table():
    """A long arm is judged against the long APT run, raw rows against the raw rows of their
    reference, and the raw rows go to their own table."""
    fds = {
        "apt": (100, 100, 100),
        "apt-long": (100, 100, 100),
        "no-r1-long": (130, 90, 100),
        raw_key("apt-long"): (150, 150, 150),
        raw_key("no-r1-long"): (300, 150, 450),  # 450 > 2x the start's 200: collapsed
    }
    rows = {START: _row(200.0)} | {
        row_name(a, s): _row(fd) for a, v in fds.items() for s, fd in zip((1, 2, 3), v)
    }
    health = {(a, s): {"events": [], "d_acc_real": 0.9, "d_acc_fake": 0.9} for a in fds
              for s in (1, 2, 3)}  # fmt: skip
    r = StudyReport(
        arms={
            "apt": ReportArm("APT", "", frozenset({"lower"}), None),
            "apt-long": ReportArm("APT long", "", frozenset({"lower"}), None),
            "no-r1-long": ReportArm("no R1 long", "collapse", WORSE, "apt-long"),
            raw_key("apt-long"): ReportArm("APT long", "", frozenset({"lower"}), None, raw=True),
            raw_key("no-r1-long"): ReportArm(
                "no R1 long", "collapse", WORSE, raw_key("apt-long"), raw=True
            ),
        },
        seeds=[1, 2, 3],
        results={"real": _row(9.0), "rows": rows},
        health=health,
    )
    assert r.verdicts("apt-long") == ["lower"] * 3  # 100 vs the start's 200
    assert r.verdicts("no-r1-long") == ["higher", "overlap", "overlap"]  # vs apt-long (100)
    assert r.verdicts(raw_key("no-r1-long")) == ["higher", "overlap", "collapsed"]  # vs 150
    assert r.reproduced(raw_key("no-r1-long")) == "partly (2 of 3 seeds)"
    md = r.markdown()
    main, raw = md.split("## Results")[1].split("### Raw generators")  # the tables
    assert "| no R1 long (`no-r1-long`) | seed 1: 130.0" in main and "300.0 [" not in main
    assert (
        "| no R1 long (`no-r1-long-raw`) | seed 1: 300.0 [290.0, 310.0]"
        in raw.split("## The paper's")[0]
    )
    assert "vs APT long: overlap 2/3, higher 1/3" in main
    assert "vs APT long: overlap 1/3, higher 1/3, collapsed 1/3" in raw
    # the claims table tells them apart
    assert "| no R1 long (raw generator) (`no-r1-long-raw`) | collapse |" in md
    # the start is in both tables, the floors (real data) only in the first
    assert f"| {START} |" in raw and "real data (floor)" not in raw.split("## The paper's")[0]


# ---- outcome words, the generated narrative, D saturation, figures, context ---------------------
OF3 = "of 3 seeds"


@pytest.mark.parametrize(
    "verdicts, expect, label",
    [
        (["lower"] * 3, {"lower"}, "reproduced"),
        (["overlap", "higher", "collapsed"], WORSE, "partly (2 of 3 seeds)"),
        (["higher", "overlap", "overlap"], WORSE, "partly (1 of 3 seeds)"),
        (["overlap"] * 3, WORSE, "not reproduced"),
        # the contrary of the prediction in one seed: said, with the count, even beside seeds
        # that reproduce it
        (["overlap", "lower", "overlap"], WORSE, "opposite (1 of 3 seeds)"),
        (["higher", "lower", "higher"], WORSE, f"opposite (1 {OF3}; as predicted in 2 of 3)"),
        (["higher", "overlap", "lower"], {"lower"}, f"opposite (1 {OF3}; as predicted in 1 of 3)"),
        (["collapsed", "overlap", "higher"], {"lower", "overlap"}, f"opposite (2 {OF3}; as predicted in 1 of 3)"),  # noqa: E501
        # "equivalent" has no direction: a disjoint interval either way only fails to reproduce it
        (["lower", "higher", "overlap"], {"overlap"}, "partly (1 of 3 seeds)"),
        (["lower", "higher", "higher"], {"overlap"}, "not reproduced"),
        # collapsed and higher point the same way: not the contrary of each other
        (["collapsed"] * 3, {"higher"}, "not reproduced"),
        (["lower", "higher", "collapsed"], set(), "no prediction"),
    ],
)  # fmt: skip
def test_outcome_words(verdicts, expect, label):
    o = outcome(verdicts, frozenset(expect))
    assert o.label == label
    assert o.word == label.split(" (")[0]


def test_opposite_is_the_contrary_direction_only():
    assert is_opposite("lower", WORSE) and is_opposite("lower", frozenset({"higher"}))
    assert is_opposite("higher", frozenset({"lower"})) and is_opposite(
        "collapsed", frozenset({"lower"})
    )
    assert is_opposite("higher", frozenset({"lower", "overlap"}))
    assert not is_opposite("overlap", WORSE) and not is_opposite("overlap", frozenset({"lower"}))
    assert not is_opposite("higher", frozenset({"overlap"}))
    assert not is_opposite("lower", frozenset({"overlap"}))
    assert not is_opposite("collapsed", frozenset({"higher"}))
    assert not is_opposite("lower", frozenset())


def _health(acc=(0.7, 0.8), loss=1.1, events=()):
    return {"events": list(events), "d_acc_real": acc[0], "d_acc_fake": acc[1], "loss_d": loss}


def _arms_report(fds, arms, health=None, **kw):
    """A report of ``arms`` (key -> ReportArm) with per-seed FDs ``fds`` (key -> 3 values, or
    (fd, half width) pairs) against a start of FD 200."""
    rows = {START: _row(200.0)}
    for a, v in fds.items():
        for s, x in zip((1, 2, 3), v):
            rows[row_name(a, s)] = _row(*x) if isinstance(x, tuple) else _row(x)
    health = health or {}
    return StudyReport(
        arms=arms,
        seeds=[1, 2, 3],
        results={"real": _row(9.0), "rows": rows},
        health={(a, s): health.get((a, s), _health()) for a in fds for s in (1, 2, 3)},
        **kw,
    )


def _narrative(md):
    assert md.index("## What the runs show") < md.index("## Results")
    return md.split("## What the runs show")[1].split("## Results")[0]


def test_means_alone_do_not_reproduce():
    """An ablation worse than APT in every seed's point estimate (and by 20 in the mean), but
    with overlapping intervals in every seed, is not reproduced; the narrative says so with the
    counts and the intervals."""
    apt = ReportArm("APT", "better than its init", frozenset({"lower"}), None)
    abl = ReportArm("no R1", "collapse", WORSE)
    r = _arms_report(
        {"apt": (100, 100, 100), "no-r1": ((120, 15.0), (118, 15.0), (122, 15.0))},
        {"apt": apt, "no-r1": abl},
    )
    assert r.verdicts("no-r1") == ["overlap"] * 3
    assert r.reproduced("no-r1") == "not reproduced"
    text = _narrative(r.markdown())
    assert "- **not reproduced**: intervals overlap in 3 of 3 seeds. no R1 (`no-r1`" in text
    assert "120.0 [105.0, 135.0] / 118.0 [103.0, 133.0] / 122.0 [107.0, 137.0] vs " in text
    assert "100.0 [90.0, 110.0] / 100.0 [90.0, 110.0] / 100.0 [90.0, 110.0]." in text
    assert "reproduced**: lower in 3 of 3 seeds (intervals disjoint). APT (`apt`" in text
    arm_lines = [x for x in text.splitlines() if x.startswith("- **")]
    assert len(arm_lines) == 2 and not any("mean" in x for x in arm_lines)


def test_a_row_without_an_interval_decides_nothing():
    start, ref = _row(200.0), _row(100.0)
    point = {"fd": 150.0, "fd_ci": None}
    assert seed_verdict(point, ref, start, []) == "overlap"
    assert seed_verdict({"fd": 50.0}, ref, start, []) == "overlap"
    assert seed_verdict({"fd": 450.0}, ref, start, []) == "collapsed"  # > 2x the start's FD


def test_narrative_groups_arms_by_outcome_with_counts():
    arms = {
        "apt": ReportArm("APT", "better", frozenset({"lower"}), None),
        "d-t0": ReportArm("t = 0", "collapse", WORSE),  # lower in seed 2: opposite
        "adam": ReportArm("Adam", "equivalent", frozenset({"overlap"})),
        "small": ReportArm("small batch", "collapse", WORSE),  # higher in seed 1: partly
        "sqrt": ReportArm("sqrt sigma", "a reading"),  # no prediction
        "frozen": ReportArm("D frozen", "control", WORSE),  # collapsed by FD and by an event
    }
    fds = {
        "apt": (100, 100, 100),
        "d-t0": (130, 60, 100),
        "adam": (100, 100, 100),
        "small": (150, 100, 100),
        "sqrt": (110, 90, 100),
        "frozen": (900, 100, 120),
    }
    health = {("frozen", 2): _health(events=["collapse@40"])}
    r = _arms_report(fds, arms, health)
    text = _narrative(r.markdown())
    bullets = [x for x in text.splitlines() if x.startswith("- **")]
    words = [b.split("**")[1] for b in bullets]
    assert words == [
        "reproduced",  # apt
        "reproduced",  # adam
        "partly (1 of 3 seeds)",  # small
        "partly (2 of 3 seeds)",  # frozen
        "opposite (1 of 3 seeds; as predicted in 1 of 3)",  # d-t0
        "no prediction",  # sqrt
    ], words
    assert (
        "intervals overlap in 2 of 3 seeds, higher in 1 of 3 seeds (intervals disjoint)"
        in (bullets[2])
    )
    assert (
        "collapsed in 2 of 3 seeds (FD above 2x the start's in 1, a collapse event in 1)"
        in (bullets[3])
    )
    assert bullets[4].startswith(
        "- **opposite (1 of 3 seeds; as predicted in 1 of 3)**: lower in 1 of 3 seeds (intervals "
        "disjoint), intervals overlap in 1 of 3 seeds, higher in 1 of 3 seeds (intervals "
        "disjoint). t = 0 (`d-t0`, EMA generator)"
    ), bullets[4]
    assert "The paper: a reading; predicted: none." in bullets[5]
    # the collapse event is named with its run id; no "no event" claim then
    assert "`frozen / seed 2`: collapse@40" in text and "No event" not in text
    # the claims table carries the same words
    assert "| t = 0 (`d-t0`) | collapse | collapsed or higher | higher, lower, overlap | " in (
        r.markdown()
    )


def test_ema_against_raw_and_which_generator():
    arms = {
        "apt": ReportArm("APT", "", frozenset({"lower"}), None),
        raw_key("apt"): ReportArm("APT", "", frozenset({"lower"}), None, raw=True),
    }
    r = _arms_report({"apt": (100, 100, 40), raw_key("apt"): (150, 110, 10)}, arms)
    text = _narrative(r.markdown())
    assert "(`apt`, EMA generator) against the consistency start" in text
    assert "(`apt-raw`, raw generator) against the consistency start" in text
    assert (
        "- APT (`apt` vs `apt-raw`): EMA lower in 1 of 3 seeds (intervals disjoint), intervals "
        "overlap in 1 of 3 seeds, EMA higher in 1 of 3 seeds (intervals disjoint). FD of seeds "
        "1 / 2 / 3: 100.0 [90.0, 110.0] / 100.0 [90.0, 110.0] / 40.0 [30.0, 50.0] (EMA) vs "
        "150.0 [140.0, 160.0] / 110.0 [100.0, 120.0] / 10.0 [0.0, 20.0] (raw)."
    ) in text


def test_d_saturated_criterion_and_health_lines():
    assert d_saturated(_health((0.96, 0.95), 0.3)) is True  # both accuracies >= 0.95
    assert d_saturated(_health((0.99, 0.94), 0.3)) is False  # one below
    assert d_saturated(_health((0.90, 0.90), 0.04)) is True  # loss_D < 0.05
    assert d_saturated(_health((0.90, 0.90), 0.05)) is False
    assert d_saturated({"events": [], "d_acc_real": None, "d_acc_fake": None}) is None
    arms = {
        "apt": ReportArm("APT", "", frozenset({"lower"}), None),
        "no-r1": ReportArm("no R1", "collapse", WORSE),
        "cons": ReportArm("consistency more", "control", WORSE),
    }
    health = {
        ("no-r1", 1): _health((0.97, 0.99), 0.14),
        ("no-r1", 2): _health((0.92, 0.97), 0.34),
        ("no-r1", 3): _health((0.94, 0.98), 0.2),
    } | {("cons", s): {"events": [], "d_acc_real": None, "d_acc_fake": None} for s in (1, 2, 3)}
    r = _arms_report({"apt": (100,) * 3, "no-r1": (100,) * 3, "cons": (100,) * 3}, arms, health)
    text = _narrative(r.markdown())
    assert "No event of the collapse detector in any of the 9 runs." in text
    assert ">= 0.95 on both real and fake, or mean loss_D there < 0.05" in text
    assert (
        "- no R1 (`no-r1`): D accuracy real 0.92-0.97, fake 0.97-0.99; loss_D 0.14-0.34; D "
        "saturated in 1 of 3 seeds."
    ) in text
    assert "- APT (`apt`): D accuracy real 0.70, fake 0.80; loss_D 1.10; D saturated in 0 of 3" in (
        text
    )
    assert "- consistency more (`cons`): no D metrics logged." in text
    assert "saturates" not in text
    assert r.summary()["no-r1"]["d_saturated"] == [True, False, False]


def test_cfd_and_caption_intervals_when_present():
    arms = {"apt": ReportArm("APT", "", frozenset({"lower"}), None)}
    r = _arms_report({"apt": (100, 100, 100)}, arms)
    for s in (1, 2, 3):
        r.results["rows"][row_name("apt", s)] |= {
            "cfd": 12.0 + s,
            "cfd_ci": [10.0 + s, 14.0 + s],
            "caption_all_ci": [0.35, 0.45],
        }
    md = r.markdown()
    line = next(x for x in md.splitlines() if x.startswith("| APT (`apt`) |"))
    assert "seed 1: 13.0 [11.0, 15.0]<br>seed 2: 14.0 [12.0, 16.0]" in line
    assert "seed 1: 0.40 [0.35, 0.45]" in line
    start = next(x for x in md.splitlines() if x.startswith(f"| {START} |"))
    assert start.split(" | ")[3] == "–"  # no cFD in the start's row: a dash, not an error
    assert "cFD ↓ per seed [95 % CI]" in md and "caption all [95 % CI]" in md


def test_figure_seed_is_not_a_tuning_seed():
    assert TUNED_ON_SEEDS == (1,)
    assert figure_seed([1, 2, 3]) == 2 and figure_seed([3, 1]) == 3 and figure_seed([5]) == 5
    assert figure_seed([1]) == 1  # none other: the report says it is a tuning seed
    arms = {"apt": ReportArm("APT", "", frozenset({"lower"}), None)}
    figs = {"health": "study/health.png", "samples": "study/samples.png"}
    md = _arms_report({"apt": (100,) * 3}, arms, figures=figs, figure_seed=2, figure_prompts=6)
    md = md.markdown()
    assert "## Health of the seed-2 runs (not a tuning seed)" in md
    assert "## Samples of seed 2 (not a tuning seed)" in md
    assert "The first 6 held-out prompts, in order, in every row" in md
    assert "Seed 2 is not a tuning seed: no choice of the `demo-apt` recipe was made on it" in md
    md = _arms_report({"apt": (100,) * 3}, arms, figures=figs, figure_seed=1).markdown()
    assert "## Samples of seed 1 (a seed the recipe was tuned on)" in md


def test_context_section_is_verbatim_at_the_end_and_the_report_is_reproducible():
    arms = {"apt": ReportArm("APT", "", frozenset({"lower"}), None)}
    r = _arms_report({"apt": (100,) * 3}, arms)
    context = "Hand-written: `apt / seed 2` used *the* recipe.\n\n- a list | with a pipe\n"
    md = r.markdown(context=context, context_name="study_context.md")
    head, tail = md.split("## Context (hand-written, not generated)\n")
    assert "## Context" not in head and "## What the runs show" in head
    assert "Maintained by hand in `study_context.md`" in tail and "cite run ids" in tail
    assert md.endswith("\n" + context)
    assert "## Context" not in r.markdown()
    # nothing but the inputs: the same report twice
    assert r.markdown(context=context) == md
