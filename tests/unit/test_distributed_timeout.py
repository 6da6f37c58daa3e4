"""``--distributed-timeout-minutes`` reaches the process group (issue 16, item 12): a stalled rank
fails the job after that long instead of a fixed 30 minutes."""

from __future__ import annotations

import datetime
import sys

import pytest

from megatron_apt.config.training import validate
from megatron_apt.parallel import state
from megatron_apt.testing.launch import REPO_ROOT


def test_timeout_reaches_init_process_group(monkeypatch):
    seen = {}
    monkeypatch.setattr(state.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(state.dist, "init_process_group", lambda *a, **k: seen.update(k))
    monkeypatch.setattr(state, "_rank_env", lambda: None)  # no launcher: a world of one
    state.init_distributed("gloo", timeout_minutes=2.5)
    assert seen["timeout"] == datetime.timedelta(minutes=2.5)


def test_flag_sets_the_config_and_zero_is_refused():
    sys.path.insert(0, str(REPO_ROOT))
    import pretrain_apt

    args = pretrain_apt.build_parser().parse_args(
        ["--recipe", "tiny-apt", "--distributed-timeout-minutes", "2"]
    )
    cfg = pretrain_apt.config_from_args(args)
    assert cfg.distributed_timeout_minutes == 2.0
    with pytest.raises(ValueError, match="distributed_timeout_minutes=0 must be > 0"):
        validate(cfg.replace(distributed_timeout_minutes=0))
