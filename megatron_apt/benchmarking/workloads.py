"""What ``tools/benchmark.py`` times: our model of any family (forward; forward + backward; the
diffusers twins are in :mod:`.twins`) and one APT update in plain torch."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["apt_update_call", "make_inputs", "model_calls", "ours_calls"]


def make_inputs(cfg, batch: int, latent, text_len: int, dtype, device, seed: int) -> dict:
    """Random latents ``[B, C, T, H, W]``, t in [0, 1], text ``[B, L, text_dim]`` and a pooled
    vector (SD3's twin always takes one; ``pooled_text`` is None for a config without it, e.g.
    Wan)."""
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


def model_calls(run: Callable[[], torch.Tensor], model) -> dict[str, Callable[[], object]]:
    """``{"forward": ..., "forward_backward": ...}`` of ``run`` (one forward of ``model``):
    under ``torch.no_grad``; and with ``backward()`` of ``mean(out**2)`` after
    ``zero_grad(set_to_none=True)``."""

    def forward():
        with torch.no_grad():
            return run()

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        _backward_loss(run())

    return {"forward": forward, "forward_backward": fwd_bwd}


def ours_calls(model, inputs) -> dict[str, Callable[[], object]]:
    """:func:`model_calls` of our model of any family: no text mask (the benchmark's text has
    no padding; Wan's diffusers twin takes none), no pooled text for a family without it."""
    args = (inputs["latents"], inputs["timesteps"], inputs["text"], None, inputs["pooled_text"])
    return model_calls(lambda: model(*args), model)


def apt_update_call(
    cfg,
    spec,
    dtype,
    device,
    batch,
    latent=None,
    compile: bool = False,
    *,
    apt_cfg=None,
    disc_cfg=None,
    accumulation: int = 1,
    lr: float = 1e-6,
    eps: float = 1e-8,
) -> Callable[[], object]:
    """One APT update (D phase then G phase, each accumulated over ``accumulation``
    micro-batches, here the same ``batch``) of freshly built G and D, plain torch + RMSprop
    (alpha 0.9, as the paper). ``batch``: latents, text, text_mask, pooled_text (or the
    benchmark's inputs). ``apt_cfg``: default the paper's image (``latent`` T = 1) or video
    settings. ``compile``: their MMDiT blocks compiled, as ``pretrain_apt.py --compile``."""
    from megatron_apt.models.builders import build_discriminator, build_generator
    from megatron_apt.stages.apt import APTConfig, discriminator_step, frozen, generator_step

    gen = build_generator(cfg, spec=spec, params_dtype=dtype).to(device)
    disc = build_discriminator(cfg, spec=spec, params_dtype=dtype, disc_cfg=disc_cfg).to(device)
    gen.train()
    disc.train()
    if compile:
        from megatron_apt.models.compile import compile_mmdits

        compile_mmdits([gen, disc])

    def rmsprop(module):
        params = [p for p in module.parameters() if p.requires_grad]
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=eps)

    opt_g, opt_d = rmsprop(gen), rmsprop(disc)
    if apt_cfg is None:
        apt_cfg = APTConfig.image() if latent[0] == 1 else APTConfig.video()
    batch = {
        "latents": batch["latents"],
        "text": batch["text"],
        "text_mask": batch.get("text_mask"),
        "pooled_text": batch.get("pooled_text"),
    }
    rng = torch.Generator().manual_seed(1)

    def update():
        opt_d.zero_grad(set_to_none=True)
        for _ in range(accumulation):
            loss_d, _ = discriminator_step(disc, gen, batch, apt_cfg, rng)
            (loss_d / accumulation).backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        with frozen(disc):
            for _ in range(accumulation):
                loss_g, _ = generator_step(disc, gen, batch, apt_cfg, rng)
                (loss_g / accumulation).backward()
        opt_g.step()

    return update
