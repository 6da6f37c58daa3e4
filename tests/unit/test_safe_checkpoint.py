"""DeepSpeed's checkpoint files load weights-only: a pickled payload in one is refused and never
runs (deepspeed 0.19.8's own engine calls ``torch.load(weights_only=False)``)."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_apt.engine.engines import prepare_deepspeed


class Payload:
    """Unpickling this runs ``os.system``: what a hostile checkpoint file would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_payload_is_refused_and_does_not_run(tmp_path):
    prepare_deepspeed()
    from megatron_apt.engine.safe_checkpoint import SafeTorchCheckpointEngine

    engine = SafeTorchCheckpointEngine(config_params=None)
    marker = tmp_path / "ran"
    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload(marker)}, bad)
    with pytest.raises(RuntimeError, match=r"refusing to load .*mp_rank_00_model_states.pt"):
        engine.load(str(bad))
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "iteration": 3}, good)
    assert engine.load(str(good))["iteration"] == 3
    torch.load(bad, weights_only=False)  # control: the payload is real
    assert marker.exists()


def test_truncated_and_missing_files_are_not_called_tampering(tmp_path):
    """Issue 16, item 8: I/O, format and security failures are told apart."""
    prepare_deepspeed()
    from megatron_apt.engine.safe_checkpoint import SafeTorchCheckpointEngine

    engine = SafeTorchCheckpointEngine(config_params=None)
    f = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(64)}}, f)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(
        RuntimeError, match=r"mp_rank_00_model_states.pt is truncated or not a torch"
    ):
        engine.load(str(f))
    with pytest.raises(FileNotFoundError, match=r"absent.pt is missing"):
        engine.load(str(tmp_path / "absent.pt"))


def test_truncated_trainer_state_is_named(tmp_path):
    from megatron_apt.engine.checkpointing import load_checkpoint

    (tmp_path / "trainer_state.json").write_text('{"step": 2, "wor')
    with pytest.raises(ValueError, match=r"trainer_state.json is truncated or not JSON"):
        load_checkpoint(tmp_path, {}, {})


def test_latest_is_written_durably(tmp_path, monkeypatch):
    """Issue 16, item 13: ``latest`` reaches the disk before the rename, the rename before the
    call returns (fsync of the file, then of its directory)."""
    from megatron_apt.engine import checkpointing

    synced = []
    real = os.fsync
    monkeypatch.setattr(checkpointing.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    checkpointing._atomic_write(tmp_path / "latest_checkpointed_iteration.txt", "7")
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "7"
    assert len(synced) == 2  # the file, then the directory
    assert not list(tmp_path.glob("*.tmp*"))
