"""The metrics entry point: JSONL + TensorBoard + fixed console line + event records."""

import io
import json

from megatron_apt.utils.metrics import MetricsLogger


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
            "d_acc_real": 0.75,
            "d_acc_fake": 0.5,
            "logit_gap": 0.2,
            "grad_norm_g": 1.5,
            "grad_norm_d": 2.5,
            "lr": 5e-6,
            "step_time_s": 2.5,
        },
    )
    log.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 1 and rec["loss_g"] == 0.69 and rec["samples"] == 9216
    assert out.getvalue().splitlines()[0] == (
        "step 1/350 | samples 9216 | loss_g 0.6900 | loss_d 1.3800 | loss_r1 0.0100 | "
        "d_real 0.1000 | d_fake -0.1000 | d_acc 0.75/0.50 | lr 5.0e-06 | 2.500 s"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    health = {f"Health/{k}" for k in ("d_acc_real", "d_acc_fake", "logit_gap")}
    health |= {"Health/grad_norm_g", "Health/grad_norm_d"}
    assert health | {"Loss/loss_g", "D/d_real", "Train/lr"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("Health/grad_norm_d")[0].value == 2.5


def test_events_are_records_with_an_event_key(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(tmp_path, stream=out, tensorboard=False)
    log.log(1, {"loss_d": 0.01})
    log.event(1, "rollback", {"to_step": 0, "lr_scale": 0.5})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"step": 1, "event": "rollback", "to_step": 0, "lr_scale": 0.5}
    assert len(out.getvalue().splitlines()) == 1  # the policy prints its own line
    MetricsLogger(tmp_path / "x", enabled=False).event(1, "stop", {})
    assert not (tmp_path / "x").exists()


def test_disabled_on_other_ranks(tmp_path):
    out = io.StringIO()
    MetricsLogger(tmp_path / "x", enabled=False, stream=out).log(1, {"loss": 1.0})
    assert not (tmp_path / "x").exists() and out.getvalue() == ""
