"""The flow-matching objective and the Euler/CFG sampler driving the real MMDiT."""

import torch

from megatron_apt.models import MMDiT
from megatron_apt.models.mmdit import get_preset
from megatron_apt.stages.diffusion import (
    add_noise,
    euler_sample,
    flow_matching_loss,
    sample_timesteps,
)
from megatron_apt.testing import dummy_inputs, randomize_parameters


def test_cfg_with_negative_prompt_through_mmdit():
    """One batched call per step equals the two-call CFG formula, with a batch-1 negative
    prompt of another length than the prompts."""
    torch.manual_seed(0)
    model = MMDiT(get_preset("tiny")).eval()
    randomize_parameters(model, seed=0)
    inputs = dummy_inputs(model.cfg, batch=2, frames=2, text_len=6)
    neg = {
        "text": torch.randn(1, 3, model.cfg.text_dim),
        "text_mask": torch.ones(1, 3, dtype=torch.bool),
    }
    cond = {"text": inputs["text"], "text_mask": inputs["text_mask"]}
    z = torch.randn_like(inputs["latents"])
    out = euler_sample(model, z, timesteps=[1.0, 0.0], cond=cond, uncond=neg, guidance_scale=4.0)
    with torch.no_grad():
        t = torch.ones(2)
        v_c = model(z, t, **cond)
        v_u = model(z, t, neg["text"].expand(2, -1, -1), neg["text_mask"].expand(2, -1))
    torch.testing.assert_close(out, z - (v_u + 4.0 * (v_c - v_u)), rtol=1e-4, atol=1e-5)


def test_flow_matching_steps_reduce_the_loss_of_mmdit():
    """A few dozen Adam steps on a fixed video batch lower the flow-matching loss (measured
    on held-out noise and timesteps)."""
    torch.manual_seed(0)
    model = MMDiT(get_preset("tiny"))
    inputs = dummy_inputs(model.cfg, batch=4, frames=2, text_len=4, masked=False)
    x = inputs["latents"]
    g = torch.Generator().manual_seed(1)
    eval_noise, eval_t = torch.randn(x.shape, generator=g), sample_timesteps(4, generator=g)

    def eval_loss():
        with torch.no_grad():
            v = model(add_noise(x, eval_noise, eval_t), eval_t, inputs["text"])
            return flow_matching_loss(v, x, eval_noise).item()

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(80):
        z, t = torch.randn(x.shape, generator=g), sample_timesteps(4, generator=g)
        loss = flow_matching_loss(model(add_noise(x, z, t), t, inputs["text"]), x, z)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)
