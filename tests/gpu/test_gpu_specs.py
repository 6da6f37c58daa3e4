"""GPU layer specs against the local spec: Transformer Engine BF16 and FP8 linears and
attention, flash-attn. Skipped without CUDA (and without TE / flash-attn installed)."""

import pytest
import torch

from megatron_apt.models import MMDiT, get_spec
from megatron_apt.models.mmdit import get_preset
from megatron_apt.models.specs import FlashAttention, SDPAttention
from megatron_apt.testing import dummy_inputs, randomize_parameters
from megatron_apt.testing.gpu import require_gpu_package

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _cuda_inputs(cfg, dtype, **kw):
    return {
        k: (
            v.cuda().to(dtype)
            if v is not None and v.is_floating_point()
            else (v.cuda() if v is not None else None)
        )
        for k, v in dummy_inputs(cfg, **kw).items()
    }


def _models(spec_name, preset="tiny"):
    require_gpu_package("transformer_engine")
    cfg = get_preset(preset, hidden_size=128, num_heads=4, text_dim=64)
    ref = MMDiT(cfg)
    randomize_parameters(ref, seed=0)
    ref = ref.to("cuda", torch.bfloat16)
    model = MMDiT(cfg, spec=get_spec(spec_name), params_dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    return cfg, ref, model.cuda()


@pytest.mark.parametrize("spec", ["te", "te-flash"])
@pytest.mark.parametrize("masked", [False, True])
def test_te_spec_matches_local_bf16(spec, masked):
    if spec.endswith("flash"):
        require_gpu_package("flash_attn")
    cfg, ref, model = _models(spec)
    inputs = _cuda_inputs(
        cfg, torch.bfloat16, frames=2, height=16, width=16, text_len=16, masked=masked
    )
    out_ref, out = ref(**inputs), model(**inputs)
    scale = out_ref.float().abs().max()
    assert (out.float() - out_ref.float()).abs().max() < 0.03 * scale
    out.float().square().mean().backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all()
        for p in model.parameters()
        if p.requires_grad
    )


def test_te_fp8_spec_runs_close_to_bf16():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs Ada/Hopper or newer")
    cfg, ref, model = _models("te-fp8")
    inputs = _cuda_inputs(
        cfg, torch.bfloat16, frames=1, height=16, width=16, text_len=16, masked=False
    )
    out_ref = ref(**inputs).float()
    out = model(**inputs).float()
    assert torch.isfinite(out).all()
    assert (out - out_ref).norm() / out_ref.norm() < 0.15  # FP8 e4m3 forward


@pytest.mark.parametrize("masked", [False, True])
def test_flash_attention_core_matches_sdpa(masked):
    require_gpu_package("flash_attn")
    g = torch.Generator(device="cuda").manual_seed(0)
    s, b, h, d = 40, 3, 4, 64
    q, k, v = (
        torch.randn(s, b, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)
    )
    mask = None
    if masked:
        mask = torch.ones(b, s, dtype=torch.bool, device="cuda")
        mask[1, 30:] = False
        mask[2, 35:] = False
    ref = SDPAttention(h, d)(q, k, v, mask).float()
    out = FlashAttention(h, d)(q, k, v, mask).float()
    assert (out - ref).abs().max() < 2e-2


def test_te_fp8_output_follows_the_weights_after_an_optimizer_step():
    """FP8 weight caching (issue 14, item 2): after a step the FP8 model must compute with the
    new weights, not the FP8 copy of the first forward."""
    cfg, _, model = _models("te-fp8")
    inputs = _cuda_inputs(cfg, torch.bfloat16, batch=16, frames=1, height=16, width=16,
                          text_len=16, masked=False)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with model.spec.autocast():
        before = model(**inputs)
    before.float().square().mean().backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad(), model.spec.autocast():
        after = model(**inputs)
    fresh = MMDiT(cfg, spec=get_spec("te-fp8"), params_dtype=torch.bfloat16).cuda()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad(), fresh.spec.autocast():
        want = fresh(**inputs)
    assert not torch.equal(after, before.detach())
    err = (after.float() - want.float()).abs().max()
    assert err < 0.05 * want.float().abs().max(), err
