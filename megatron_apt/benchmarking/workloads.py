"""What ``tools/benchmark.py`` times: our MMDiT and diffusers' SD3 transformer of the same size
(forward; forward + backward) and one APT update in plain torch."""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_apt.config.model import MMDiTConfig

__all__ = ["apt_update_call", "diffusers_calls", "make_inputs", "ours_calls"]


def make_inputs(
    cfg: MMDiTConfig, batch: int, latent, text_len: int, dtype, device, seed: int
) -> dict:
    g = torch.Generator().manual_seed(seed)
    t, h, w = latent
    pooled_dim = cfg.pooled_text_dim or cfg.text_dim
    x = {
        "latents": torch.randn(batch, cfg.in_channels, t, h, w, generator=g),
        "timesteps": torch.rand(batch, generator=g),
        "text": torch.randn(batch, text_len, cfg.text_dim, generator=g),
        "pooled": torch.randn(batch, pooled_dim, generator=g),
    }
    out = {k: v.to(device, torch.float32 if k == "timesteps" else dtype) for k, v in x.items()}
    out["pooled_text"] = out["pooled"] if cfg.pooled_text_dim else None
    return out


def _backward_loss(out: torch.Tensor) -> None:
    out.float().square().mean().backward()


def ours_calls(model, inputs) -> dict[str, Callable[[], object]]:
    args = (inputs["latents"], inputs["timesteps"], inputs["text"], None, inputs["pooled_text"])

    def forward():
        with torch.no_grad():
            return model(*args)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        _backward_loss(model(*args))

    return {"forward": forward, "forward_backward": fwd_bwd}


def diffusers_calls(model, inputs) -> dict[str, Callable[[], object]]:
    kw = dict(
        hidden_states=inputs["latents"][:, :, 0],  # images: [B, C, H, W]
        encoder_hidden_states=inputs["text"],
        pooled_projections=inputs["pooled"],
        timestep=inputs["timesteps"] * 1000.0,
        return_dict=False,
    )

    def forward():
        with torch.no_grad():
            return model(**kw)[0]

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        _backward_loss(model(**kw)[0])

    return {"forward": forward, "forward_backward": fwd_bwd}


def apt_update_call(
    cfg, spec, dtype, device, inputs, latent, compile: bool = False
) -> Callable[[], object]:
    """One APT update (D phase then G phase) of freshly built G and D, plain torch + RMSprop
    (``compile``: their MMDiT blocks compiled, as ``pretrain_apt.py --compile``)."""
    from megatron_apt.models.builders import build_discriminator, build_generator
    from megatron_apt.stages.apt import APTConfig, discriminator_step, frozen, generator_step

    gen = build_generator(cfg, spec=spec, params_dtype=dtype).to(device)
    disc = build_discriminator(cfg, spec=spec, params_dtype=dtype).to(device)
    gen.train()
    disc.train()
    if compile:
        from megatron_apt.models.compile import compile_mmdits

        compile_mmdits([gen, disc])

    def rmsprop(module):
        params = [p for p in module.parameters() if p.requires_grad]
        return torch.optim.RMSprop(params, lr=1e-6, alpha=0.9, eps=1e-8)

    opt_g, opt_d = rmsprop(gen), rmsprop(disc)
    apt_cfg = APTConfig.image() if latent[0] == 1 else APTConfig.video()
    batch = {
        "latents": inputs["latents"],
        "text": inputs["text"],
        "text_mask": None,
        "pooled_text": inputs["pooled_text"],
    }
    rng = torch.Generator().manual_seed(1)

    def update():
        opt_d.zero_grad(set_to_none=True)
        loss_d, _ = discriminator_step(disc, gen, batch, apt_cfg, rng)
        loss_d.backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        with frozen(disc):
            loss_g, _ = generator_step(disc, gen, batch, apt_cfg, rng)
            loss_g.backward()
        opt_g.step()

    return update
