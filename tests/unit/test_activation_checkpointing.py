"""Activation recompute of chosen MMDiT blocks (``MMDiT.set_recompute``, ``--recompute-layers``).

* Equivalence: with recompute of all or some blocks, outputs, returned layer features, losses
  and every parameter gradient equal those without (exactly on the CPU: the same kernels run
  again on the same inputs), for the plain model and for an APT discriminator step and a
  generator step with D frozen (``frozen``): there the gradient reaches G through the
  recomputed blocks of a D whose parameters take no gradient.
* Recompute really happens: the chosen blocks' forward runs a second time in the backward.
* Memory (tests/unit/memory_probe.py in a fresh subprocess, every tensor above 64 KiB its own
  mmap so that resident memory follows live tensor bytes): the resident memory the forward
  adds and keeps for the backward (RSS after the forward minus before it) and the peak RSS of
  a training step both drop with recompute.
* Config: ``recompute_layers`` parsing, validation and the ``pretrain_apt.py`` flags.
"""

import sys
from pathlib import Path

import pytest
import torch

from megatron_apt.config.training import TrainConfig, parse_recompute_layers, validate
from megatron_apt.models import (
    Discriminator,
    Generator,
    MMDiT,
    build_discriminator,
    build_generator,
)
from megatron_apt.models.mmdit import get_preset
from megatron_apt.stages.apt import APTConfig, discriminator_step, frozen, generator_step
from megatron_apt.testing import dummy_inputs, randomize_parameters
from megatron_apt.testing.memory_probe import run_memory_probe as run_probe

ROOT = Path(__file__).resolve().parents[2]


# ---- config -----------------------------------------------------------------------------


def test_parse_recompute_layers():
    assert parse_recompute_layers(None, 4) == ()
    assert parse_recompute_layers("none", 4) == ()
    assert parse_recompute_layers("all", 4) == (1, 2, 3, 4)
    assert parse_recompute_layers("1,3-4", 4) == (1, 3, 4)
    assert parse_recompute_layers(" 2 , 2 ", 4) == (2,)
    assert parse_recompute_layers([4, 1], 4) == (1, 4)
    with pytest.raises(ValueError, match=r"'0,1'.*\[0\] outside 1\.\.4"):
        parse_recompute_layers("0,1", 4)
    with pytest.raises(ValueError, match="'first'"):
        parse_recompute_layers("first", 4)
    with pytest.raises(ValueError, match="'3-1' is empty"):
        parse_recompute_layers("3-1", 4)


def test_config_validation_and_flags():
    validate(TrainConfig(recompute_layers="1-2"))
    with pytest.raises(ValueError, match="recompute_layers='5'"):
        validate(TrainConfig(recompute_layers="5"))  # the tiny preset has 2 blocks
    sys.path.insert(0, str(ROOT))
    from pretrain_apt import build_parser, check_config, config_from_args

    parse = lambda *a: config_from_args(build_parser().parse_args(list(a)))  # noqa: E731
    assert parse().recompute_layers == "none"
    assert parse("--recompute-activations").recompute_layers == "all"
    assert parse("--recompute-layers", "2").recompute_layers == "2"
    with pytest.raises(ValueError, match="recompute_layers='0'"):
        check_config(parse("--recompute-layers", "0"))


def test_builders_apply_recompute():
    cfg = get_preset("tiny", num_layers=3)
    assert build_generator(cfg, recompute="all").model.recompute_layers == (1, 2, 3)
    assert build_discriminator(cfg, recompute="2").backbone.recompute_layers == (2,)
    assert build_generator(cfg).model.recompute_layers == ()


# ---- equivalence --------------------------------------------------------------------------


class BlockCalls:
    """Counts the forward calls of every block (a recomputed block runs twice per step; a
    pre-hook, since the recompute stops early once the saved tensors are rebuilt)."""

    def __init__(self, model: MMDiT):
        self.counts = [0] * len(model.blocks)
        for i, block in enumerate(model.blocks):
            block.register_forward_pre_hook(lambda *_, i=i: self._hit(i))

    def _hit(self, i):
        self.counts[i] += 1

    def take(self) -> list[int]:
        out, self.counts = self.counts, [0] * len(self.counts)
        return out


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, k
        else:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("layers", ["all", "1", [2, 3]])
def test_plain_model_same_outputs_and_gradients(layers):
    cfg = get_preset("tiny", num_layers=3)
    model = MMDiT(cfg)
    randomize_parameters(model, seed=0)
    calls = BlockCalls(model)
    inputs = dummy_inputs(cfg, batch=2, frames=2, text_len=6, seed=1)  # masked text
    w = torch.randn(inputs["latents"].shape, generator=torch.Generator().manual_seed(2))

    def run():
        model.zero_grad(set_to_none=True)
        v, feats = model(**inputs, return_layers=(1, 3))
        ((v * w).sum() + sum(f.square().mean() for f in feats)).backward()
        return {"v": v.detach(), "f1": feats[0].detach(), "f3": feats[1].detach()}, grads(model)

    out_ref, g_ref = run()
    assert calls.take() == [1, 1, 1]
    chosen = model.set_recompute(layers)
    out, g = run()
    assert calls.take() == [2 if i in chosen else 1 for i in (1, 2, 3)]
    assert_same(out_ref, out)
    assert_same(g_ref, g)
    assert sum(x.abs().sum() for x in g.values() if x is not None) > 0


def test_no_recompute_without_grad():
    cfg = get_preset("tiny")
    model = MMDiT(cfg)
    model.set_recompute("all")
    calls = BlockCalls(model)
    with torch.no_grad():
        model(**dummy_inputs(cfg))
    assert calls.take() == [1, 1]


def test_discriminator_and_generator_phases_same_with_recompute():
    cfg = get_preset("tiny", num_layers=3)
    g = Generator(MMDiT(cfg))
    d = Discriminator(MMDiT(cfg))
    randomize_parameters(g, seed=0)
    randomize_parameters(d, seed=1)
    g_calls, d_calls = BlockCalls(g.model), BlockCalls(d.backbone)
    inputs = dummy_inputs(cfg, batch=2, frames=2, text_len=6, seed=3)
    batch = {k: v for k, v in inputs.items() if k != "timesteps"}
    apt = APTConfig(shift=3.0, r1_lambda=10.0, r1_sigma=0.1)

    def phases():
        for m in (g, d):
            m.zero_grad(set_to_none=True)
        loss_d, md = discriminator_step(d, g, batch, apt, torch.Generator().manual_seed(4))
        loss_d.backward()
        d_grads, g_after_d = grads(d), grads(g)
        with frozen(d):
            loss_g, mg = generator_step(d, g, batch, apt, torch.Generator().manual_seed(5))
            loss_g.backward()
        d_after_g = grads(d)
        out = {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), **md, **mg}
        return out, d_grads, g_after_d, grads(g), d_after_g

    ref = phases()
    assert g_calls.take() == [2, 2, 2] and d_calls.take() == [2, 2, 2]  # D phase + G phase
    g.model.set_recompute("all")
    d.backbone.set_recompute("1,3")
    new = phases()
    # G: no-grad sample in the D phase (not recomputed) + G phase with recompute
    assert g_calls.take() == [3, 3, 3]
    # D: both phases recompute blocks 1 and 3 (in the G phase with D's parameters frozen)
    assert d_calls.take() == [4, 2, 4]
    assert_same(ref[0], new[0])
    assert_same(ref[1], new[1])  # D's gradients of the D phase
    assert all(v is None for v in new[2].values())  # G takes no gradient in the D phase
    assert_same(ref[3], new[3])  # G's gradients of the G phase
    assert_same(ref[4], new[4])  # D's gradients unchanged by the G phase (frozen)
    assert sum(x.abs().sum() for x in new[3].values() if x is not None) > 0


# ---- memory -------------------------------------------------------------------------------


def test_recompute_lowers_measured_memory():
    spec = dict(preset="demo", batch=2, height=48, width=48, text_len=32, ema=False)
    off = run_probe({**spec, "recompute": "none"})
    some = run_probe({**spec, "recompute": "1,2"})
    on = run_probe({**spec, "recompute": "all"})
    report = {"none": off, "1,2": some, "all": on}
    assert off["held_after_forward"] > 30 * 2**20, report  # tens of MB: above allocator noise
    assert on["held_after_forward"] < 0.25 * off["held_after_forward"], report
    assert on["held_after_forward"] < some["held_after_forward"] < off["held_after_forward"]
    assert on["peak"] < some["peak"] < off["peak"], report
    assert on["loss"] == off["loss"] == some["loss"]  # second step: same updates before
