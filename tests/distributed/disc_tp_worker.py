"""Worker for test_discriminator_tp: the discriminator (and a whole D phase of APT) at TP=2
with sequence parallel against TP=1 with the same weights; 2 processes under torchrun."""

import argparse
import json

import torch
import torch.distributed as dist

from megatron_apt.models import Discriminator, Generator, MMDiT
from megatron_apt.models.mmdit import get_preset
from megatron_apt.parallel import initialize_parallel, single_process_state
from megatron_apt.parallel.tensor_parallel import gather_state_dict, shard_state_dict
from megatron_apt.stages.apt import APTConfig, discriminator_step, frozen, generator_step
from megatron_apt.testing import dummy_inputs, randomize_parameters


def pair(build, ps_ref, ps_tp, seed):
    ref = build(ps_ref)
    randomize_parameters(ref, seed=seed)
    tp = build(ps_tp)
    tp.load_state_dict(shard_state_dict(ref.state_dict(), tp, ps_tp))
    return ref, tp


def grad_report(ref, tp, ps_tp):
    got = gather_state_dict(tp, ps_tp, grads=True)
    diffs = {
        n: (got[n] - (p.grad if p.grad is not None else torch.zeros_like(p))).abs().max().item()
        for n, p in ref.named_parameters()
    }
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    return {
        "grad_diff": max(diffs.values()),
        "worst": max(diffs, key=diffs.get),
        "grad_max": scale,
        "n": len(diffs),
    }


def main(out):
    ps_tp = initialize_parallel(tensor_parallel_size=2, sequence_parallel=True)
    ps_ref = single_process_state()
    cfg = get_preset("tiny", num_layers=3)
    results = {"sequence_parallel": ps_tp.sequence_parallel}

    # 1) logits and gradients of D alone (video batch, masked text of odd length)
    d_ref, d_tp = pair(lambda ps: Discriminator(MMDiT(cfg, ps)), ps_ref, ps_tp, 1)
    inputs = dummy_inputs(cfg, batch=3, frames=2, text_len=5, seed=4)
    logits = [d(**inputs) for d in (d_ref, d_tp)]
    w = torch.tensor([1.0, -2.0, 0.5])
    for lg in logits:
        (lg * w).sum().backward()
    results["logits"] = {
        "diff": (logits[0] - logits[1]).abs().max().item(),
        "max": logits[0].abs().max().item(),
        **grad_report(d_ref, d_tp, ps_tp),
    }

    # 2) a whole D phase and G phase (same RNG on both sides)
    for m in (d_ref, d_tp):
        m.zero_grad(set_to_none=True)
    g_ref, g_tp = pair(lambda ps: Generator(MMDiT(cfg, ps)), ps_ref, ps_tp, 2)
    batch = {
        k: v for k, v in dummy_inputs(cfg, batch=2, frames=2, seed=5).items() if k != "timesteps"
    }
    apt = APTConfig.video()
    losses = []
    for d, g in ((d_ref, g_ref), (d_tp, g_tp)):
        loss, _ = discriminator_step(d, g, batch, apt, torch.Generator().manual_seed(7))
        loss.backward()
        with frozen(d):
            loss_g, _ = generator_step(d, g, batch, apt, torch.Generator().manual_seed(8))
            loss_g.backward()
        losses.append((loss.item(), loss_g.item()))
    results["phases"] = {
        "loss_d": losses,
        "d": grad_report(d_ref, d_tp, ps_tp),
        "g": grad_report(g_ref, g_tp, ps_tp),
    }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    print("DISC-TP-DONE", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    main(ap.parse_args().out)
