"""The discriminator at TP=2 with sequence parallel equals TP=1 (logits and gradients), and so
do whole D and G phases of APT (2 gloo processes under torchrun)."""

import json
from pathlib import Path

import pytest

from megatron_apt.testing.launch import run_launcher

WORKER = Path(__file__).with_name("disc_tp_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("disc") / "results.json"
    run_launcher(WORKER, [out], nproc=2, launcher="torchrun", marker="DISC-TP-DONE")
    return json.loads(out.read_text())


def test_logits_and_gradients_match(results):
    r = results["logits"]
    assert results["sequence_parallel"]
    assert r["max"] > 0.05 and r["diff"] <= 1e-5 * max(1.0, r["max"]), r
    assert r["grad_diff"] <= 1e-5 * r["grad_max"], r


def test_apt_phases_match(results):
    r = results["phases"]
    (d_ref, g_ref), (d_tp, g_tp) = r["loss_d"]
    assert abs(d_ref - d_tp) < 1e-5 and abs(g_ref - g_tp) < 1e-5, r
    for net in ("d", "g"):
        assert r[net]["grad_diff"] <= 1e-5 * r[net]["grad_max"], r[net]
