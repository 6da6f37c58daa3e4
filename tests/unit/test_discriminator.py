"""Discriminator (heads at layer fractions 16/26/36), generator (eq. 5, two-step), and their
initialization from model files."""

import pytest
import torch

from megatron_apt.checkpoint.io import save_model_file
from megatron_apt.checkpoint.model_init import build_discriminator, build_generator
from megatron_apt.models import (
    Discriminator,
    DiscriminatorConfig,
    Generator,
    MMDiT,
    default_head_layers,
)
from megatron_apt.models.mmdit import get_preset
from megatron_apt.stages.diffusion import euler_sample
from megatron_apt.testing import dummy_inputs, randomize_parameters


def test_head_layers_follow_the_paper():
    assert default_head_layers(36) == (16, 26, 36)
    assert default_head_layers(18) == (8, 13, 18)
    assert default_head_layers(2) == (1, 1, 2)
    with pytest.raises(ValueError, match="head layer 3 outside"):
        Discriminator(MMDiT(get_preset("tiny")), DiscriminatorConfig(head_layers=(3,)))


def test_logits_and_every_trainable_parameter_gets_a_gradient():
    cfg = get_preset("tiny", num_layers=3)
    d = Discriminator(MMDiT(cfg))
    randomize_parameters(d, 0)
    inputs = dummy_inputs(cfg, batch=3, frames=2)
    logits = d(**inputs)
    assert logits.shape == (3,) and logits.dtype == torch.float32
    assert len(d.heads) == 3 and d.norm.normalized_shape == (3 * cfg.hidden_size,)
    logits.sum().backward()
    trainable = {n: p for n, p in d.named_parameters() if p.requires_grad}
    frozen = {n for n, p in d.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in d.named_parameters() if n.startswith("backbone.final_")}
    assert all(p.grad is not None for p in trainable.values())
    zero = [n for n, p in trainable.items() if p.grad.abs().sum() == 0]
    assert zero == ["backbone.blocks.2.text.q_norm.weight"]  # discarded pre-only queries


def test_truncated_backbone_freezes_only_what_cannot_matter():
    cfg = get_preset("tiny", num_layers=3)
    d = Discriminator(MMDiT(cfg), DiscriminatorConfig(head_layers=(1, 2)))
    randomize_parameters(d, 0)
    d(**dummy_inputs(cfg)).sum().backward()
    for name, p in d.named_parameters():
        assert p.requires_grad == (p.grad is not None), name
    assert not any(p.requires_grad for p in d.backbone.blocks[2].parameters())
    assert not d.backbone.blocks[1].text.fc1.weight.requires_grad


def test_wan_backbone_discriminator_trains_everything_that_can_matter():
    """The same discriminator on a Wan backbone (the family-neutral interface): heads read the
    tokens after blocks 1 and 2 of 3; the output layer, its table and block 3 are frozen, every
    other parameter (cross-attention, its LayerNorm, the time and text embedders) gets a
    non-zero gradient, with and without a text mask."""
    from megatron_apt.models.families import get_preset as any_preset
    from megatron_apt.models.wan.model import WanDiT

    cfg = any_preset("wan-debug", num_layers=3)
    d = Discriminator(WanDiT(cfg), DiscriminatorConfig(head_layers=(1, 2)))
    randomize_parameters(d, 0)
    for masked in (True, False):
        d.zero_grad()
        inputs = dummy_inputs(cfg, batch=2, frames=3, height=4, width=6, text_len=5)
        if not masked:
            inputs["text_mask"] = None
        logits = d(**inputs)
        assert logits.shape == (2,) and logits.dtype == torch.float32
        logits.sum().backward()
        frozen = {n for n, p in d.named_parameters() if not p.requires_grad}
        want = {
            n
            for n, _ in d.named_parameters()
            if n.startswith(("backbone.final_", "backbone.blocks.2."))
        }
        assert frozen == want
        zero = [
            n
            for n, p in d.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
        ]
        assert zero == [], zero


def test_generator_is_z_minus_velocity_at_final_timestep():
    cfg = get_preset("tiny")
    g = Generator(MMDiT(cfg))
    randomize_parameters(g, 0)
    inputs = dummy_inputs(cfg, batch=2, frames=2)
    z, text, mask = inputs["latents"], inputs["text"], inputs["text_mask"]
    v = g.model(z, torch.ones(2), text, mask)
    torch.testing.assert_close(g(z, text, mask), z - v)
    # zero-shot two steps = the Euler ODE through [1, t_mid, 0] ...
    two = g.sample(z, text, mask, steps=2, t_mid=0.4)
    ode = euler_sample(
        g.model, z, timesteps=[1.0, 0.4, 0.0], cond={"text": text, "text_mask": mask}
    )
    torch.testing.assert_close(two, ode, rtol=1e-5, atol=1e-5)
    # ... or re-noised with fresh noise
    fresh = g.sample(z, text, mask, steps=2, t_mid=0.4, renoise=torch.randn_like(z))
    assert not torch.allclose(fresh, two)
    with pytest.raises(ValueError, match="1 or 2 steps"):
        g.sample(z, text, mask, steps=3)


def _saved(tmp_path, name, role, seed, cfg):
    m = MMDiT(cfg)
    randomize_parameters(m, seed)
    return save_model_file(tmp_path / f"{name}.safetensors", m.state_dict(), cfg, role=role), m


def test_backbones_hold_exactly_the_checkpoint_weights(tmp_path):
    cfg = get_preset("tiny")
    diff_path, diffusion = _saved(tmp_path, "diffusion", "diffusion", 1, cfg)
    cons_path, distilled = _saved(tmp_path, "consistency", "consistency", 2, cfg)
    d = build_discriminator(cfg, init_from=diff_path)
    g = build_generator(cfg, init_from=cons_path)
    for built, ref in ((d.backbone, diffusion), (g.model, distilled)):
        got, want = built.state_dict(), ref.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want if not k.endswith("_extra_state"))
    # the heads are new, the backbone is not the generator's
    assert not torch.equal(d.backbone.patch_embed.weight, g.model.patch_embed.weight)


def test_wrong_checkpoints_are_refused_with_names(tmp_path):
    cfg = get_preset("tiny")
    other, _ = _saved(tmp_path, "deep", "diffusion", 1, get_preset("tiny", num_layers=3))
    with pytest.raises(ValueError, match=r"another architecture \(num_layers: file 3 vs model 2"):
        build_discriminator(cfg, init_from=other)
    path, model = _saved(tmp_path, "ok", "diffusion", 1, cfg)
    sd = {k: v for k, v in model.state_dict().items() if "blocks.1.visual.fc2" not in k}
    broken = save_model_file(tmp_path / "broken.safetensors", sd, cfg, role="diffusion")
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.visual.fc2.bias'"):
        build_discriminator(cfg, init_from=broken)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors is not a readable"):
        build_generator(cfg, init_from=garbage)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        build_generator(cfg, init_from=tmp_path / "missing.safetensors")
