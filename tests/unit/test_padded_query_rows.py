"""Padded text rows cannot poison training, whatever the attention kernel leaves in them
(issue 29, item 7).

Transformer Engine's attention with a padding mask takes the key mask as the query mask and,
for ``sbhd`` in bf16, neither zeroes the outputs of padded query rows nor their dq/dk/dv (TE
2.9-2.11 ``pytorch/csrc/extensions/attention.cpp``: zero-fill for ``thd`` only; the citations
are in ``megatron_apt/models/masks.py``). Stale memory there is NaN sometimes, and ``0 x NaN``
is NaN in the next weight-gradient GEMM. Here a stand-in core around the real SDPA plants
NaN in exactly those places (installed through the layer spec's ``attention`` factory, as a
TE core would be); valid outputs and every parameter gradient must stay finite and equal to
the clean run's, bit for bit, with and without activation recompute. A block-level case uses a
mask with holes (the context-parallel key order ``[x_0; c_0; x_1; c_1]``, which no varlen
kernel takes). A last check: the guards change no valid number (the clean run equals a run
with the guards removed, which is the code before them)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_apt.models import MMDiT
from megatron_apt.models.embeddings import rope_3d, rope_rotation
from megatron_apt.models.mmdit import get_preset
from megatron_apt.models.mmdit import model as mmdit_module
from megatron_apt.models.specs import KeyMask, SDPAttention, as_key_mask, local_spec
from megatron_apt.parallel.context_parallel import cp_key_mask
from megatron_apt.testing import dummy_inputs, randomize_parameters

NAN = float("nan")


class _NaNGradRows(torch.autograd.Function):
    """Identity on q, k, v; the backward writes NaN into the padded rows of dq, dk, dv."""

    @staticmethod
    def forward(ctx, valid, q, k, v):
        ctx.save_for_backward(valid)
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, *grads):
        (valid,) = ctx.saved_tensors
        return (None, *(torch.where(valid, g, NAN) for g in grads))


class PoisonedSDPA(SDPAttention):
    """The real SDPA core with what TE's fused ``sbhd`` kernel may leave in padded query rows:
    NaN outputs (``forward``) and/or NaN dq/dk/dv (``backward``)."""

    poison = ("forward", "backward")

    def forward(self, q, k, v, key_mask=None):
        if key_mask is None:
            return super().forward(q, k, v, key_mask)
        key_mask = as_key_mask(key_mask)
        valid = key_mask.mask.t()[:, :, None, None]  # [S, b, 1, 1]: the query rows
        if "backward" in self.poison:
            q, k, v = _NaNGradRows.apply(valid, q, k, v)
        out = super().forward(q, k, v, key_mask)  # [S, b, h]
        if "forward" in self.poison:
            out = torch.where(valid[..., 0], out, NAN)
        return out


def poisoned_spec(poison: tuple[str, ...]):
    core = type("Poisoned", (PoisonedSDPA,), {"poison": poison})
    return dataclasses.replace(local_spec(), name="poisoned", attention=core)


def _run(model, inputs, recompute=None):
    """Output and every parameter gradient of ``mean(v^2)``."""
    model.zero_grad(set_to_none=True)
    model.set_recompute(recompute)
    v = model(**inputs)
    v.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return v.detach(), grads


def _assert_same_and_finite(got, want):
    (v, grads), (v_ref, grads_ref) = got, want
    assert torch.isfinite(v).all(), "non-finite valid outputs"
    assert torch.equal(v, v_ref)
    assert grads.keys() == grads_ref.keys() and len(grads) > 20
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"non-finite gradients: {bad}"
    diff = [n for n in grads if not torch.equal(grads[n], grads_ref[n])]
    assert not diff, f"gradients differ from the clean run: {diff}"


@pytest.mark.parametrize("recompute", [None, "all"])
@pytest.mark.parametrize("poison", [("forward",), ("backward",), ("forward", "backward")])
def test_poisoned_padded_rows_do_not_reach_outputs_or_gradients(poison, recompute):
    cfg = dataclasses.replace(get_preset("tiny"), num_layers=3)
    clean, dirty = MMDiT(cfg), MMDiT(cfg, spec=poisoned_spec(poison))
    randomize_parameters(clean, seed=0)
    dirty.load_state_dict(clean.state_dict())
    inputs = dummy_inputs(cfg, batch=2, frames=2, text_len=6)  # sample 1: 3 padded tokens
    assert not inputs["text_mask"].all()
    _assert_same_and_finite(_run(dirty, inputs, recompute), _run(clean, inputs, recompute))


def test_padded_rows_with_holes_in_the_key_order():
    """One block, the mask of the context-parallel gathered order (padding in the middle)."""
    cfg = get_preset("tiny")
    clean, dirty = MMDiT(cfg), MMDiT(cfg, spec=poisoned_spec(("forward", "backward")))
    randomize_parameters(clean, seed=1)
    dirty.load_state_dict(clean.state_dict())
    g = torch.Generator().manual_seed(0)
    n, length, b, h = 12, 6, 2, cfg.hidden_size
    text_mask = torch.ones(b, length, dtype=torch.bool)
    text_mask[1, 1:3] = False  # sample 1: c_0 padded at its end, c_1 full
    text_mask[1, 5:] = False
    ps2 = dataclasses.replace(clean.ps, cp_size=2)
    holes = cp_key_mask(n, text_mask, ps2)  # [x_0; c_0; x_1; c_1]
    assert KeyMask(holes).varlen() is None  # not a prefix: no varlen kernel takes it
    x, c = torch.randn(n, b, h, generator=g), torch.randn(length, b, h, generator=g)
    cond = torch.randn(b, h, generator=g)
    rope = rope_rotation(*rope_3d((1, 3, 4), cfg.rope_axes_dim))
    valid = holes.t()  # [N + L, b]: rows that reach a loss

    results = []
    for model in (dirty, clean):
        block = model.blocks[0]
        block.zero_grad(set_to_none=True)
        xi, ci = x.clone().requires_grad_(), c.clone().requires_grad_()
        xo, co = block(xi, ci, cond, rope, KeyMask(holes))
        out = torch.cat([xo, co])  # [N + L, b, h]
        out[valid].square().sum().backward()  # only valid rows reach the loss
        grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
        grads["x"], grads["c"] = xi.grad, ci.grad
        results.append((torch.where(valid[..., None], out, 0).detach(), grads))
    v, grads = results[0]
    assert torch.isfinite(v).all()
    assert torch.equal(v, results[1][0])
    for k in results[1][1]:
        assert torch.isfinite(grads[k]).all(), k
        assert torch.equal(grads[k], results[1][1][k]), k


def test_guards_change_no_valid_number(monkeypatch):
    """Valid outputs and parameter gradients equal those of the code without the guards."""
    cfg = dataclasses.replace(get_preset("tiny"), num_layers=3)
    model = MMDiT(cfg)
    randomize_parameters(model, seed=2)
    inputs = dummy_inputs(cfg, batch=2, text_len=6)
    guarded = _run(model, inputs)
    monkeypatch.setattr(mmdit_module, "guard_padded_rows", lambda q, k, v, valid: (q, k, v))
    monkeypatch.setattr(mmdit_module, "zero_padded_rows", lambda out, valid: out)
    _assert_same_and_finite(guarded, _run(model, inputs))
