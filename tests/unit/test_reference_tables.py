"""Our embeddings and parameter counts against diffusers' SD3 implementation (offline, tiny)."""

import pytest
import torch

from megatron_apt.models.embeddings import crop_sincos_2d, sincos_2d_table, timestep_features
from megatron_apt.models.mmdit import count_parameters, get_preset
from megatron_apt.testing.diffusers_ref import tiny_sd3_transformer

diffusers = pytest.importorskip("diffusers")


def tiny_sd3_diffusers(qk_norm=None):
    return tiny_sd3_transformer(qk_norm)


@pytest.mark.parametrize("grid, base", [(16, 4), (192, 64), (24, None)])
def test_sincos_table_matches_diffusers(grid, base):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = get_2d_sincos_pos_embed(64, grid, base_size=base or grid, output_type="pt")
    ours = sincos_2d_table(64, grid, base).reshape(grid * grid, 64)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=5e-6)  # fp32 args in diffusers


def test_cropped_positions_match_sd3_patch_embed():
    model = tiny_sd3_diffusers()
    ref = model.pos_embed.cropped_pos_embed(6, 10)  # pixel-space latent H, W (patch 2)
    ours = crop_sincos_2d(sincos_2d_table(64, 16, 4), 3, 5)
    torch.testing.assert_close(ours[None], ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size=16"):
        crop_sincos_2d(sincos_2d_table(64, 16, 4), 17, 2)


def test_timestep_features_match_diffusers():
    from diffusers.models.embeddings import Timesteps

    t = torch.tensor([0.0, 0.3, 250.0, 999.0])
    torch.testing.assert_close(timestep_features(t, 256), Timesteps(256, True, 0)(t))


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_parameter_count_equals_diffusers_sd3(qk_norm):
    cfg = get_preset("tiny-sd3", qk_norm="rms" if qk_norm else "none")
    ref = sum(p.numel() for p in tiny_sd3_diffusers(qk_norm).parameters())
    assert count_parameters(cfg).total == ref
