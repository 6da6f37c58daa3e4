"""The metrics entry point: JSONL + TensorBoard + fixed console line + collapse warning."""

import io
import json

from megatron_apt.utils.metrics import COLLAPSE_PATIENCE, MetricsLogger


def test_jsonl_console_and_tensorboard(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(tmp_path, total_steps=350, stream=out)
    log.log(
        1,
        {
            "samples": 9216,
            "loss_g": 0.69,
            "loss_d": 1.38,
            "loss_r1": 0.01,
            "d_real": 0.1,
            "d_fake": -0.1,
            "lr": 5e-6,
            "step_time_s": 2.5,
        },
    )
    log.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 1 and rec["loss_g"] == 0.69 and rec["samples"] == 9216
    assert out.getvalue().splitlines()[0] == (
        "step 1/350 | samples 9216 | loss_g 0.6900 | loss_d 1.3800 | loss_r1 0.0100 | "
        "d_real 0.1000 | d_fake -0.1000 | lr 5.0e-06 | 2.500 s"
    )
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_collapse_warning_after_patience(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(tmp_path, stream=out, tensorboard=False)
    for step in range(1, COLLAPSE_PATIENCE):
        log.log(step, {"loss_d": 0.01})
    assert "WARNING" not in out.getvalue()
    log.log(COLLAPSE_PATIENCE, {"loss_d": 0.01})
    assert "WARNING: discriminator loss" in out.getvalue() and log.warnings == 1
    log.log(COLLAPSE_PATIENCE + 1, {"loss_d": 1.2})  # healthy again: streak resets
    assert log.low_d_streak == 0


def test_disabled_on_other_ranks(tmp_path):
    out = io.StringIO()
    MetricsLogger(tmp_path / "x", enabled=False, stream=out).log(1, {"loss": 1.0})
    assert not (tmp_path / "x").exists() and out.getvalue() == ""
