"""Worker for test_recompute_tp: activation recompute under TP=2 + sequence parallel.

Launched with ``torchrun --nproc-per-node 2``. On a TP=2 + SP model (and an APT generator and
discriminator built the same way) every rank compares, with and without recompute of every
block, the output, all of its local parameter gradients, and the D-phase and G-phase
(D frozen) losses and gradients; the largest differences (max over both ranks) and the number
of block forwards are written by rank 0 as JSON.
"""

import argparse
import json

import torch
import torch.distributed as dist

from megatron_apt.models import Discriminator, Generator, MMDiT
from megatron_apt.models.mmdit import get_preset
from megatron_apt.parallel import initialize_parallel
from megatron_apt.stages.apt import APTConfig, discriminator_step, frozen, generator_step
from megatron_apt.testing import dummy_inputs, randomize_parameters


def max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def diff(a: dict, b: dict) -> float:
    out = 0.0
    for k in a:
        if (a[k] is None) != (b[k] is None):
            return float("inf")
        if a[k] is not None:
            out = max(out, (a[k] - b[k]).abs().max().item())
    return max_over_ranks(out)


def grads(module):
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def count_calls(model: MMDiT) -> list:
    counts = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def main(out_path):
    ps = initialize_parallel(tensor_parallel_size=2, sequence_parallel=True)
    cfg = get_preset("tiny", num_layers=3)
    results = {}
    # ---- plain model -----------------------------------------------------------------
    model = MMDiT(cfg, ps)
    randomize_parameters(model, seed=1)  # same seed: replicated parameters equal on both ranks
    calls = count_calls(model)
    inputs = dummy_inputs(cfg, batch=2, frames=2, text_len=5, seed=2)  # 5 text: padded for SP
    w = torch.randn(inputs["latents"].shape, generator=torch.Generator().manual_seed(3))

    def run():
        model.zero_grad(set_to_none=True)
        v, feats = model(**inputs, return_layers=(2,))
        ((v * w).sum() + feats[0].square().mean()).backward()
        return {"v": v.detach(), "f": feats[0].detach()}, grads(model)

    out_ref, g_ref = run()
    model.set_recompute("all")
    calls[:] = [0, 0, 0]
    out, g = run()
    results["plain"] = {
        "out_diff": diff(out_ref, out),
        "grad_diff": diff(g_ref, g),
        "grad_max": max_over_ranks(max(x.abs().max().item() for x in g.values() if x is not None)),
        "calls": list(calls),
        "sequence_parallel": bool(model.blocks[0].visual.qkv.sequence_parallel),
    }
    # ---- APT phases --------------------------------------------------------------------
    gen, disc = Generator(MMDiT(cfg, ps)), Discriminator(MMDiT(cfg, ps))
    randomize_parameters(gen, seed=4)
    randomize_parameters(disc, seed=5)
    batch = {k: v for k, v in inputs.items() if k != "timesteps"}
    apt = APTConfig(shift=3.0, r1_lambda=10.0, r1_sigma=0.1)

    def phases():
        for m in (gen, disc):
            m.zero_grad(set_to_none=True)
        loss_d, _ = discriminator_step(disc, gen, batch, apt, torch.Generator().manual_seed(6))
        loss_d.backward()
        d_grads = grads(disc)
        with frozen(disc):
            loss_g, _ = generator_step(disc, gen, batch, apt, torch.Generator().manual_seed(7))
            loss_g.backward()
        losses = {"d": loss_d.detach(), "g": loss_g.detach()}
        return losses, d_grads, grads(gen), grads(disc)

    ref = phases()
    gen.model.set_recompute("all")
    disc.backbone.set_recompute("all")
    d_calls = count_calls(disc.backbone)
    new = phases()
    results["apt"] = {
        "loss_diff": diff(ref[0], new[0]),
        "d_grad_diff": diff(ref[1], new[1]),
        "g_grad_diff": diff(ref[2], new[2]),
        "d_frozen_diff": diff(ref[3], new[3]),
        "g_grad_max": max_over_ranks(
            max(x.abs().max().item() for x in new[2].values() if x is not None)
        ),
        "d_calls": list(d_calls),
    }
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    print("RECOMPUTE-TP-DONE", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--local_rank", type=int, default=0)
    main(ap.parse_args().out)
