"""ChunkedRMSprop against torch.optim.RMSprop: the same parameters and states, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_apt.engine.rmsprop import CHUNK, ChunkedRMSprop

# a flat ZeRO-like partition (not a multiple of the chunk), a matrix, a vector, a scalar-sized one
SHAPES = [(3 * CHUNK + 517,), (300, 257), (1000,), (1,)]


def _params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _run(opt_cls, params, steps: int, **kw):
    opt = opt_cls(params, **kw)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        for j, p in enumerate(params):
            # leave one parameter without a gradient on odd steps (torch skips it)
            grad = (torch.randn(p.shape, generator=g) * 10**-j).to(p.dtype)
            p.grad = None if (i % 2 and j == 2) else grad
        opt.step()
    return opt


def _assert_same(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    for pa, pb in zip(
        [p for g in a.param_groups for p in g["params"]],
        [p for g in b.param_groups for p in g["params"]],
        strict=True,
    ):
        assert torch.equal(pa, pb)
        sa, sb = a.state[pa], b.state[pb]
        assert set(sa) == set(sb)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=1e-3, alpha=0.9, eps=1e-8),  # the paper's RMSprop
        dict(lr=3e-4, alpha=0.99, eps=1e-6, weight_decay=0.1),
        dict(lr=torch.tensor(2e-3), alpha=0.9),  # a tensor learning rate
        dict(lr=1e-3, momentum=0.9),  # torch's own step (not chunked)
        dict(lr=1e-3, centered=True),
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_equals_torch_rmsprop(kw, threads):
    """Also with 2 intra-op threads: ATen splits each operation's range between them, at other
    offsets within a slice than within the whole tensor."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = _run(torch.optim.RMSprop, _params(), 5, **kw)
        ours = _run(ChunkedRMSprop, _params(), 5, **kw)
    finally:
        torch.set_num_threads(before)
    _assert_same(ref, ours)
    # the chunked path ran (it made its buffer) exactly where it applies
    chunked = "momentum" not in kw and "centered" not in kw
    assert ("_chunk_buffers" in ours.__dict__) == chunked
    # the control: a different alpha changes the parameters (the comparison can fail)
    other = _run(ChunkedRMSprop, _params(), 5, **{**kw, "alpha": 0.5})
    assert not torch.equal(other.param_groups[0]["params"][0], ours.param_groups[0]["params"][0])


def test_state_dicts_are_interchangeable_with_torch():
    ref = _run(torch.optim.RMSprop, _params(), 3, lr=1e-3, alpha=0.9)
    ours = _run(ChunkedRMSprop, _params(), 3, lr=1e-3, alpha=0.9)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert sd_ref["param_groups"] == sd_ours["param_groups"]
    # resume each from the other's state: both continue identically
    pa, pb = _params(), _params()
    for x, y, p in zip(pa, pb, ref.param_groups[0]["params"], strict=True):
        x.data.copy_(p.data)
        y.data.copy_(p.data)
    a = torch.optim.RMSprop(pa, lr=1e-3, alpha=0.9)
    a.load_state_dict(copy.deepcopy(sd_ours))
    b = ChunkedRMSprop(pb, lr=1e-3, alpha=0.9)
    b.load_state_dict(copy.deepcopy(sd_ref))
    for x, y in zip(pa, pb, strict=True):
        x.grad = torch.full_like(x, 0.5)
        y.grad = torch.full_like(y, 0.5)
    a.step()
    b.step()
    _assert_same(a, b)


def test_deepcopy_and_bf16():
    """A deep copy rebuilds its own slice buffer; bf16 parameters (no fp32 masters) are chunked
    in bf16 as torch computes them."""
    ref = _run(torch.optim.RMSprop, _params(dtype=torch.bfloat16), 3, lr=1e-2)
    ours = _run(ChunkedRMSprop, _params(dtype=torch.bfloat16), 3, lr=1e-2)
    _assert_same(ref, ours)
    assert torch.bfloat16 in ours.__dict__["_chunk_buffers"]
    clone = copy.deepcopy(ours)
    for p in clone.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    clone.step()
    assert clone.__dict__["_chunk_buffers"] is not ours.__dict__["_chunk_buffers"]
