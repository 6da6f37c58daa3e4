"""Regional torch.compile of the MMDiT blocks (models/compile.py) against the eager model:
forward, every gradient, activation recompute, both GAN phases (D trained; D frozen with the
gradient reaching G through its input), and the loud fallback when compilation fails.

Tolerance: fp32, inductor reorders and fuses reductions: 1e-5 absolute on outputs and
gradients of magnitude ~1 (measured: ~1e-6)."""

from __future__ import annotations

import pytest
import torch

from megatron_apt.models.builders import build_discriminator, build_generator
from megatron_apt.models.compile import compile_blocks, compile_mmdits, compile_status
from megatron_apt.models.mmdit import MMDiT
from megatron_apt.models.mmdit.config import get_preset
from megatron_apt.stages.apt import APTConfig, discriminator_step, frozen, generator_step

ATOL = 1e-5


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight set from ``seed`` (the adaLN-Zero init would make the blocks the
    identity): two modules built alike and randomized with one seed are twins."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def _inputs(cfg, b: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, cfg.in_channels, 2, 8, 8, generator=g)
    text = torch.randn(b, 6, cfg.text_dim, generator=g)
    mask = torch.ones(b, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return x, torch.rand(b, generator=g), text, mask


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL, msg=k)


def test_compiled_blocks_match_eager():
    """Forward and every gradient, without and with activation recompute of block 1."""
    cfg = get_preset("tiny")
    eager, compiled = (_randomize(MMDiT(cfg)) for _ in range(2))  # the same weights
    assert compile_blocks(compiled) == cfg.num_layers and compile_status(compiled) == "pending"
    for recompute in (None, "1"):
        outs = {}
        for name, m in (("eager", eager), ("compiled", compiled)):
            m.set_recompute(recompute)
            m.zero_grad(set_to_none=True)
            out = m(*_inputs(cfg))
            out.square().mean().backward()
            outs[name] = (out.detach(), _grads(m))
        assert compile_status(compiled) == "on"
        torch.testing.assert_close(outs["compiled"][0], outs["eager"][0], rtol=0, atol=ATOL)
        _close(outs["compiled"][1], outs["eager"][1])
        assert outs["eager"][0].abs().max() > 0.1  # a non-trivial output


# slow (make test-all, not CI): ~2 min of compiles; test_compiled_blocks_match_eager compares the
# compiled blocks' forward and every gradient
@pytest.mark.slow
def test_compiled_gan_phases_match_eager():
    cfg = get_preset("tiny")
    g_eager, g_comp = (_randomize(build_generator(cfg)) for _ in range(2))
    d_eager, d_comp = (_randomize(build_discriminator(cfg), 1) for _ in range(2))
    compile_mmdits([g_comp, d_comp])
    x, _, text, mask = _inputs(cfg, 2)  # tiny-apt's micro-batch: the trainer test's graphs
    batch = {"latents": x, "text": text, "text_mask": mask, "pooled_text": None}
    apt = APTConfig.image()
    results = {}
    for name, (g, d) in {"eager": (g_eager, d_eager), "compiled": (g_comp, d_comp)}.items():
        loss_d, _ = discriminator_step(d, g, batch, apt, torch.Generator().manual_seed(2))
        loss_d.backward()
        d_grads = _grads(d)
        with frozen(d):
            loss_g, _ = generator_step(d, g, batch, apt, torch.Generator().manual_seed(3))
            loss_g.backward()
        assert not any(p.grad is not None for p in d.parameters() if not p.requires_grad)
        results[name] = (loss_d.detach(), loss_g.detach(), d_grads, _grads(g))
    e, c = results["eager"], results["compiled"]
    torch.testing.assert_close(c[0], e[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(c[1], e[1], rtol=0, atol=ATOL)
    _close(c[2], e[2])  # D phase: D's gradients
    _close(c[3], e[3])  # G phase: G's gradients through the frozen, compiled D


def test_failed_compilation_falls_back_to_eager_loudly(capsys):
    cfg = get_preset("tiny")
    eager, broken = (_randomize(MMDiT(cfg)) for _ in range(2))
    compile_blocks(broken)

    def fail(*args, **kwargs):
        raise RuntimeError("inductor: no working C++ compiler")

    for block in broken.blocks:
        block._compiled_call_impl = fail
    with torch.no_grad():
        out, ref = broken(*_inputs(cfg)), eager(*_inputs(cfg))
    assert torch.equal(out, ref)
    assert compile_status(broken).startswith("failed: RuntimeError: inductor")
    assert "torch.compile of the MMDiT blocks failed" in capsys.readouterr().err
    assert all(block._compiled_call_impl is None for block in broken.blocks)
