"""Single-process plain-torch reference of APT training (no DeepSpeed), for
``test_training_equivalence.py``.

It re-implements, from the documented contracts and not from the trainer's code, what one
APT update is: ``d_updates_per_iter`` discriminator updates then one generator update, each on
the NEXT ``global_batch`` samples of the synthetic stream (global positions are consecutive:
the first D phase sees positions ``0 .. B-1``, the G phase ``B .. 2B-1``, ...), each sample's
noise / timesteps / perturbation drawn from its own generator seeded by (seed, position,
salt), the full-batch MEAN loss, ``torch.optim.RMSprop`` per network, D frozen in the G phase,
and the generator EMA after every G update. Models: ``initialize_parallel(seed=cfg.seed)``
then ``build_generator`` / ``build_discriminator``, as the trainer builds them.

Writes ``OUT/VARIANT/step_K/{generator,generator_ema,discriminator}.safetensors`` after every
update K (keys as ``pretrain_apt.py`` exports them) and the losses, discriminator health
metrics and gradient norms (``torch.linalg.vector_norm`` of every trainable parameter's full
gradient, ``grad_norm_d`` / ``grad_norm_g``) of every update to ``OUT/VARIANT/metrics.json``;
``OUT/VARIANT/grad_norm_controls.json`` holds, per update, the norm a TP=2 run would log if it
counted the replicated parameters on both TP ranks (a negative control for the norm test).
``--variants`` adds deliberately wrong references (negative controls that the tests must be
able to tell apart):

* ``swapped-phases``: the D phase reads the G phase's samples and vice versa;
* ``sum-over-dp``: gradients summed instead of averaged over 2 data-parallel ranks on the
  first update only (a constant loss scale is invisible to RMSprop except through eps; a scale
  that changes between updates shows through its running average);
* ``shared-salt``: the G phase draws its noise with the D phase's salt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_apt.config.recipes import get_recipe  # noqa: E402
from megatron_apt.engine.data import SyntheticLatents  # noqa: E402
from megatron_apt.models.builders import build_discriminator, build_generator  # noqa: E402
from megatron_apt.models.families import family_of, get_preset  # noqa: E402
from megatron_apt.parallel.state import initialize_parallel  # noqa: E402
from megatron_apt.stages.apt import (  # noqa: E402
    APTConfig,
    discriminator_step,
    frozen,
    generator_step,
)
from megatron_apt.stages.noise import sample_generators  # noqa: E402

# Salts of the per-sample generators, part of the trainer's documented contract (a change
# there changes every run's random numbers, and this test then fails on purpose).
SALT_D, SALT_G = 1, 2
MARKER = "REFERENCE-DONE"


def sample_index(pos: int, n: int, seed: int) -> int:
    """Epoch-shuffled data order: position ``pos`` reads ``randperm(n, seed + epoch)[k]``."""
    epoch, k = divmod(pos, n)
    return int(torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))[k])


def full_batch(data: SyntheticLatents, positions: list[int], seed: int, text_mask: bool) -> dict:
    """``text_mask``: the family's convention (``ModelFamily.uses_text_mask``); without it the
    model sees the zero-padded text unmasked (Wan, as its pipeline runs it)."""
    items = [data.item(sample_index(p, len(data), seed)) for p in positions]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    if not text_mask:
        mask = batch.pop("text_mask")
        assert not batch["text"][~mask].any()  # the synthetic data's padding is zero
    return batch


def phase_positions(phase: int, batch: int, variant: str) -> list[int]:
    """Global positions of a phase's batch; ``swapped-phases`` swaps each D phase's block with
    the following G phase's (the order a scheduler bug would give)."""
    if variant == "swapped-phases":
        phase = phase + 1 if phase % 2 == 0 else phase - 1
    return list(range(phase * batch, (phase + 1) * batch))


def export(out: Path, g, ema: dict, d) -> None:
    out.mkdir(parents=True, exist_ok=True)

    def strip(named):
        return {k.removeprefix("model."): v.detach().clone() for k, v in named}

    save_file(strip(g.named_parameters()), str(out / "generator.safetensors"))
    save_file(strip(ema.items()), str(out / "generator_ema.safetensors"))
    save_file(
        {k: v.detach().clone() for k, v in d.named_parameters()},
        str(out / "discriminator.safetensors"),
    )


def optimizer(module: torch.nn.Module, lr: float, cfg) -> torch.optim.RMSprop:
    params = [p for p in module.parameters() if p.requires_grad]
    o = cfg.optim
    return torch.optim.RMSprop(
        params, lr=lr, alpha=o.rmsprop_alpha, eps=o.eps, weight_decay=o.weight_decay
    )


def step(opt: torch.optim.Optimizer, loss: torch.Tensor, grad_scale: float) -> tuple[float, float]:
    """One optimizer step; returns the gradient norm and the replicated-twice control."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    for p in params:
        p.grad.mul_(grad_scale)
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])).item()
    replicated = [p.grad.flatten() for p in params if not getattr(p, "tensor_model_parallel", 0)]
    twice = (norm**2 + torch.linalg.vector_norm(torch.cat(replicated)).item() ** 2) ** 0.5
    opt.step()
    return norm, twice


VARIANTS = ("exact", "swapped-phases", "sum-over-dp", "shared-salt")


def train(cfg, variant: str, out: Path) -> None:
    """``cfg.train_iters`` APT updates; weights after each update under ``out/step_K``."""
    ps = initialize_parallel(1, 1, False, seed=cfg.seed)  # a world of one, seeded as the trainer
    g = build_generator(cfg.model, ps, spec=cfg.layer_spec)
    d = build_discriminator(cfg.model, ps, spec=cfg.layer_spec)
    ema = {n: p.detach().clone() for n, p in g.named_parameters()}  # fp32 shadow
    export(out / "step_0", g, ema, d)
    g_opt = optimizer(g, cfg.optim.lr, cfg)
    d_opt = optimizer(d, cfg.optim.lr_d or cfg.optim.lr, cfg)
    apt = APTConfig(shift=cfg.shift, r1_lambda=cfg.r1_lambda, r1_sigma=cfg.r1_sigma)
    data = SyntheticLatents(cfg, cfg.seed)
    batch_size, phase = cfg.global_batch_size, 0

    def next_batch(salt: int):
        nonlocal phase
        pos = phase_positions(phase, batch_size, variant)
        phase += 1
        salt = SALT_D if variant == "shared-salt" else salt
        batch = full_batch(data, pos, cfg.seed, family_of(cfg.model).uses_text_mask)
        return batch, sample_generators(cfg.seed, pos, salt)

    log, controls = [], []
    for it in range(cfg.train_iters):
        scale = 2.0 if variant == "sum-over-dp" and it == 0 else 1.0
        for _ in range(cfg.d_updates_per_iter):
            batch, rngs = next_batch(SALT_D)
            loss, m_d = discriminator_step(d, g, batch, apt, rngs)  # full-batch mean loss
            norm_d, twice_d = step(d_opt, loss, scale)
        with frozen(d):  # gradients reach G only, through D's input
            batch, rngs = next_batch(SALT_G)
            loss, m_g = generator_step(d, g, batch, apt, rngs)
            norm_g, twice_g = step(g_opt, loss, scale)
        with torch.no_grad():  # shadow <- decay * shadow + (1 - decay) * weights
            for n, p in g.named_parameters():
                ema[n].mul_(cfg.ema_decay).add_(p, alpha=1 - cfg.ema_decay)
        export(out / f"step_{it + 1}", g, ema, d)
        log.append({"step": it + 1, **{k: v.item() for k, v in {**m_d, **m_g}.items()}})
        log[-1].update(grad_norm_d=norm_d, grad_norm_g=norm_g)
        controls.append({"grad_norm_d": twice_d, "grad_norm_g": twice_g})
    (out / "metrics.json").write_text(json.dumps(log, indent=1))
    (out / "grad_norm_controls.json").write_text(json.dumps(controls, indent=1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--recipe", default="tiny-apt")
    p.add_argument("--model", help="a model preset of any family (default: the recipe's)")
    p.add_argument("--global-batch-size", type=int, required=True)
    p.add_argument("--train-iters", type=int, required=True)
    p.add_argument("--optim-eps", type=float, help="RMSprop eps (train_equivalence_worker.py)")
    p.add_argument("--variants", default="exact", help=f"comma-separated, of {VARIANTS}")
    args = p.parse_args()
    cfg = get_recipe(args.recipe).replace(
        global_batch_size=args.global_batch_size, train_iters=args.train_iters, bf16=False
    )
    if args.model:
        cfg = cfg.replace(model=get_preset(args.model))
    if args.optim_eps is not None:
        cfg = cfg.replace(optim=dataclasses.replace(cfg.optim, eps=args.optim_eps))
    if cfg.stage != "apt" or cfg.d_updates_per_iter != 1:
        raise ValueError("the reference covers the apt stage with one D update per G update")
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
        train(cfg, variant, args.out / variant)
    print(MARKER, flush=True)


if __name__ == "__main__":
    main()
