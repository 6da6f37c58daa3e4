"""The ablation study's verdicts and report (megatron_apt.evaluation.study_report) on hand-made
evaluation rows: decided by disjoint FD intervals, collapse by events or FD, per seed."""

from __future__ import annotations

from megatron_apt.evaluation.study_report import (
    START,
    ReportArm,
    StudyReport,
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
        "yes",
        "partly (2/3)",
        "partly (2/3)",
    )
    s = r.summary()
    assert s["no-r1"]["fd"] == [500, 160, 98] and s["no-r1"]["verdicts"][0] == "collapsed"


def test_markdown_has_every_arm_seed_and_claim():
    md = _report().markdown()
    for text in ("| APT |", "| no R1 |", "| Adam |", "500.0 [490.0, 510.0]", "partly (2/3)"):
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
    assert r.reproduced(raw_key("no-r1-long")) == "partly (2/3)"
    md = r.markdown()
    main, raw = md.split("### Raw generators")
    assert "| no R1 long | 130.0" in main and "| no R1 long | 300.0" not in main
    assert "| no R1 long | 300.0 [290.0, 310.0]" in raw.split("## The paper's")[0]
    assert "vs APT long: overlap 2/3, higher 1/3" in main
    assert "vs APT long: overlap 1/3, higher 1/3, collapsed 1/3" in raw
    assert "| no R1 long (raw generator) | collapse |" in md  # the claims table tells them apart
    # the start is in both tables, the floors (real data) only in the first
    assert f"| {START} |" in raw and "real data (floor)" not in raw.split("## The paper's")[0]
