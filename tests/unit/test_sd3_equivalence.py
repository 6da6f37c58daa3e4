"""The SD3-style MMDiT computes exactly what diffusers' SD3Transformer2DModel computes (tiny,
random, offline): the architecture claim behind importing SD3/SD3.5 weights."""

import pytest
import torch

from megatron_apt.checkpoint.diffusers_sd3 import sd3_to_mmdit
from megatron_apt.models import MMDiT
from megatron_apt.models.mmdit import get_preset
from megatron_apt.testing.diffusers_ref import tiny_sd3_transformer

pytest.importorskip("diffusers")


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_velocity_matches_diffusers_sd3(qk_norm):
    ref = tiny_sd3_transformer(qk_norm, randomize=True)  # every weight matters
    cfg = get_preset("tiny-sd3", qk_norm="rms" if qk_norm else "none")
    ours = MMDiT(cfg)
    ours.load_state_dict(sd3_to_mmdit(ref.state_dict(), cfg))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 10, generator=g)  # image latents [B, C, H, W]
    text, pooled = torch.randn(2, 7, 32, generator=g), torch.randn(2, 24, generator=g)
    sigma = torch.tensor([0.25, 0.9])
    with torch.no_grad():
        v_ref = ref(
            hidden_states=x,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=sigma * 1000,
        ).sample
        v = ours(x[:, :, None], sigma, text, None, pooled)[:, :, 0]
    assert v_ref.abs().max() > 0.1
    torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-5)


def test_unmapped_keys_are_named():
    cfg = get_preset("tiny-sd3")
    with pytest.raises(KeyError, match="pos_embed.proj.weight"):
        sd3_to_mmdit({}, cfg)
