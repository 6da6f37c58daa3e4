"""Fault-injection hooks for the training-system tests, switched on by environment variables.

``pretrain_apt.py`` calls :func:`install_test_hooks` on its trainer; with none of the variables
set it does nothing. They wrap the trainer's methods on the instance (no trainer code changes):

* ``MEGATRON_APT_TEST_NAN_AT_STEP=k[:first|last]``: on rank ``MEGATRON_APT_TEST_NAN_RANK``
  (default 1) the loss of the first (default) or last micro-batch of update ``k`` (1-based) is
  made NaN, as an overflowing forward would. ``first`` is the discriminator's micro-batch in
  the apt stage (both engines must skip), ``last`` the generator's.
* ``MEGATRON_APT_TEST_WEIGHTS_DIR=DIR``: every rank saves its local view of the trained
  weights (ZeRO-3: its partitions) and EMA shadows after every update to
  ``DIR/rank{r}.pt`` as ``{step: {"engine/param": tensor, "ema/name/param": tensor}}``.

The kill-during-checkpoint hook lives in :mod:`megatron_apt.engine.checkpointing`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

NAN_AT_STEP_ENV = "MEGATRON_APT_TEST_NAN_AT_STEP"
NAN_RANK_ENV = "MEGATRON_APT_TEST_NAN_RANK"
WEIGHTS_DIR_ENV = "MEGATRON_APT_TEST_WEIGHTS_DIR"


TESTING_ENV = "MEGATRON_APT_TESTING"  # set by the test suite (tests/conftest.py, launch.py)


def hooks_enabled() -> bool:
    """Fault-injection hooks act only in the test suite's processes: a stray
    ``MEGATRON_APT_TEST_*`` variable in a production job's environment does nothing."""
    return os.environ.get(TESTING_ENV) == "1"


def install_test_hooks(trainer) -> None:
    if not hooks_enabled():
        stray = sorted(k for k in os.environ if k.startswith("MEGATRON_APT_TEST_"))
        if stray and getattr(trainer, "rank", 0) == 0:
            print(f"warning: {stray} ignored: test-only hooks ({TESTING_ENV}=1 is unset)")
        return
    if os.environ.get(NAN_AT_STEP_ENV):
        _install_nan(trainer, os.environ[NAN_AT_STEP_ENV])
    if os.environ.get(WEIGHTS_DIR_ENV):
        _install_weights_dump(trainer, Path(os.environ[WEIGHTS_DIR_ENV]))


def _install_nan(trainer, spec: str) -> None:
    step_s, _, which = spec.partition(":")
    at, which = int(step_s), which or "first"
    if which not in ("first", "last"):
        raise ValueError(f"{NAN_AT_STEP_ENV}={spec!r}: use k, k:first or k:last")
    if trainer.rank != int(os.environ.get(NAN_RANK_ENV, "1")):
        return
    backward_step = trainer._backward_step
    update_name = f"_update_{trainer.cfg.stage}"
    update = getattr(trainer, update_name)
    calls: list = []

    def poisoned_backward_step(engine, loss):
        calls.append(None)
        n = len(calls)
        total = _calls_per_update(trainer)
        hit = trainer.step + 1 == at and n == (1 if which == "first" else total)
        if hit:
            print(f"{NAN_AT_STEP_ENV}: NaN loss on rank {trainer.rank} in update {at}", flush=True)
            loss = loss * float("nan")
        return backward_step(engine, loss)

    def counting_update():
        calls.clear()
        return update()

    trainer._backward_step = poisoned_backward_step
    setattr(trainer, update_name, counting_update)


def _calls_per_update(trainer) -> int:
    acc, c = trainer.plan.accumulation, trainer.cfg
    if c.stage != "apt":
        return acc
    return acc * (1 + (0 if c.freeze_discriminator else c.d_updates_per_iter))


def local_weights(trainer) -> dict[str, torch.Tensor]:
    """This rank's copy of every trained parameter (ZeRO-3: its partition) and EMA shadow."""
    out = {}
    for name, engine in trainer.engines.items():
        z3 = engine.zero_optimization_stage() == 3
        for n, p in engine.module.named_parameters():
            if p.requires_grad:
                out[f"{name}/{n}"] = (p.ds_tensor if z3 else p.data).detach().float().clone()
    for name, ema in trainer.emas.items():
        for n, t in ema.state_dict().items():
            out[f"ema/{name}/{n}"] = t.float().clone()
    return out


def _install_weights_dump(trainer, out_dir: Path) -> None:
    update_name = f"_update_{trainer.cfg.stage}"
    update = getattr(trainer, update_name)  # possibly already wrapped by the NaN hook
    path = out_dir / f"rank{trainer.rank}.pt"
    history: dict[int, dict] = {}

    def dump() -> None:
        history[trainer.step] = local_weights(trainer)
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(history, path)

    def recording_update():  # the state after the previous update, its EMA update included
        dump()
        return update()

    setattr(trainer, update_name, recording_update)
    trainer.test_hook_finish = dump


def read_weights_dump(out_dir: str | Path, rank: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """The history written by ``MEGATRON_APT_TEST_WEIGHTS_DIR=out_dir`` for ``rank``:
    ``{step: {"engine/param": tensor, ...}}`` (entry k: the state before update k + 1)."""
    return torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=True)


def engine_weights(dump: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One engine's parameters of a dump entry, named as in its model file (``prefix``:
    ``"generator/model."``, ``"discriminator/"``)."""
    return {k.removeprefix(prefix): v for k, v in dump.items() if k.startswith(prefix)}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys) -> float:
    """Largest ``|a[k] - b[k]|`` over ``keys`` (in fp32)."""
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


def video_stage_start_diffs(
    start: dict, image_start: dict, image_dir: str | Path, consistency: dict, diffusion: dict
) -> dict[str, float]:
    """How far the video APT stage's first state (weights-dump entry 0, ``start``) lies from each
    file it could have started from (section 3.5: G from the image stage's EMA, D's backbone
    from the diffusion weights, D's heads freshly initialised as the image stage's were at its
    own entry 0, ``image_start``). ``image_dir``: the image stage's save folder; the two dicts:
    the consistency EMA and the diffusion model file's tensors."""
    from safetensors.torch import load_file

    image_dir = Path(image_dir)
    g = engine_weights(start, "generator/model.")
    d, d0 = engine_weights(start, "discriminator/"), engine_weights(image_start, "discriminator/")
    image_ema = load_file(str(image_dir / "generator_ema.safetensors"))
    image_raw = load_file(str(image_dir / "generator.safetensors"))
    image_d = load_file(str(image_dir / "discriminator.safetensors"))
    diffusion_d = {f"backbone.{k}": v for k, v in diffusion.items()}
    backbone = sorted(k for k in d if k.startswith("backbone."))
    heads = sorted(k for k in d if not k.startswith("backbone."))
    assert sorted(g) == sorted(image_ema) and backbone and heads, (sorted(g)[:3], heads)
    return {
        "G(0) - image EMA": max_abs_diff(g, image_ema, g),
        "G(0) - image raw G": max_abs_diff(g, image_raw, g),
        "G(0) - consistency EMA": max_abs_diff(g, consistency, g),
        "D backbone(0) - diffusion weights": max_abs_diff(d, diffusion_d, backbone),
        "D backbone(0) - image stage's trained D": max_abs_diff(d, image_d, backbone),
        "D heads(0) - image stage's heads(0)": max_abs_diff(d, d0, heads),
        "D heads(0) - image stage's trained heads": max_abs_diff(d, image_d, heads),
    }


VIDEO_START_SAME = (
    "G(0) - image EMA",
    "D backbone(0) - diffusion weights",
    "D heads(0) - image stage's heads(0)",
)  # bitwise equal; every other entry of video_stage_start_diffs must differ (> 1e-6)
