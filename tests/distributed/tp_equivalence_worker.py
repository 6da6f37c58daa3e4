"""Worker for test_tp_equivalence: TP=2 (+ sequence parallel) against TP=1, same weights.

Launched with ``torchrun --nproc-per-node 2``. Every rank builds the TP=1 reference on a
process group of its own, and the TP=2 model from the reference's weights cut into shards;
rank 0 writes the largest differences (outputs, returned layers, gathered gradients) as JSON.
Every registered model family runs here (the MMDiT presets and the Wan debug model), built
through the family registry, in the same two processes.
"""

import argparse
import json

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear

from megatron_apt.models import MMDiT
from megatron_apt.models.builders import build_model
from megatron_apt.models.families import family_of
from megatron_apt.models.families import get_preset as family_preset
from megatron_apt.models.mmdit import get_preset
from megatron_apt.parallel import initialize_parallel, single_process_state
from megatron_apt.parallel.tensor_parallel import gather_state_dict, shard_state_dict
from megatron_apt.testing import dummy_inputs, randomize_parameters


def run_case(preset, sp, frames, ps_ref, ps_tp, text_len, height=8, width=8, masked=True):
    cfg = family_preset(preset)
    ref = build_model(cfg, ps_ref)
    randomize_parameters(ref, seed=1)
    model = build_model(cfg, ps_tp)
    model.load_state_dict(shard_state_dict(ref.state_dict(), model, ps_tp))
    inputs = dummy_inputs(cfg, batch=2, frames=frames, height=height, width=width,
                          text_len=text_len, masked=masked, seed=2)  # fmt: skip
    layers = (1, cfg.num_layers)
    outs = []
    for m in (ref, model):
        v, feats = m(**inputs, return_layers=layers)
        w = torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
        loss = (v * w).sum() + sum((f**2).mean() for f in feats)
        loss.backward()
        outs.append((v.detach(), [f.detach() for f in feats]))
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    grads_tp = gather_state_dict(model, ps_tp, grads=True)
    grad_diff = {n: (grads_tp[n] - g).abs().max().item() for n, g in grads_ref.items()}
    grad_rel = {
        n: grad_diff[n] / max(g.abs().max().item(), 1e-30) for n, g in grads_ref.items()
    }  # relative to each tensor's own largest gradient
    zero_grads = [n for n, g in grads_ref.items() if g.abs().max().item() == 0.0]
    linears = [m for m in model.modules() if isinstance(m, ColumnParallelLinear)]
    return {
        "family": family_of(cfg).name,
        "sequence_parallel": any(m.sequence_parallel for m in linears),
        "out_max": outs[0][0].abs().max().item(),
        "out_diff": (outs[0][0] - outs[1][0]).abs().max().item(),
        "feat_diff": max((a - b).abs().max().item() for a, b in zip(outs[0][1], outs[1][1])),
        "grad_diff": max(grad_diff.values()),
        "worst_grad": max(grad_diff, key=grad_diff.get),
        "grad_max": max(g.abs().max().item() for g in grads_ref.values()),
        "worst_grad_rel": max(grad_rel.values()),
        "worst_grad_rel_name": max(grad_rel, key=grad_rel.get),
        "num_grads": len(grad_diff),
        "zero_grads": zero_grads,
    }


def main(out_path, quick=False):
    torch.manual_seed(0)
    results = {}
    ps_ref = None
    if quick:  # launcher check: one video case with sequence parallel
        ps_tp = initialize_parallel(tensor_parallel_size=2, sequence_parallel=True)
        results["tiny/T=3/L=6/sp=True"] = run_case(
            "tiny", True, 3, single_process_state(), ps_tp, 6
        )
        results["world"] = [dist.get_world_size(), ps_tp.tp_size, ps_tp.dp_size]
        return finish(results, out_path)
    for sp in (False, True):
        ps_tp = initialize_parallel(tensor_parallel_size=2, sequence_parallel=sp)
        ps_ref = ps_ref or single_process_state()
        for preset, frames, text_len in (("tiny", 1, 5), ("tiny", 3, 6), ("tiny-sd3", 1, 7)):
            key = f"{preset}/T={frames}/L={text_len}/sp={sp}"
            results[key] = run_case(preset, sp, frames, ps_ref, ps_tp, text_len)
        # Wan: a 2 x 5 x 3 token grid (odd rows) and 7 text tokens (padded to 8 for SP);
        # padded text masked out (mask) or attended to like diffusers' Wan (no mask)
        for masked in (True, False):
            key = f"wan-debug/T=2/L=7/mask={masked}/sp={sp}"
            results[key] = run_case("wan-debug", sp, 2, ps_ref, ps_tp, 7, 10, 6, masked)
    # Same seed, CPU initialization: the TP=2 shards are slices of the TP=1 weights.
    cfg = get_preset("tiny")
    torch.manual_seed(5)
    ref = MMDiT(cfg, ps_ref)
    torch.manual_seed(5)
    full = gather_state_dict(MMDiT(cfg, ps_tp), ps_tp)
    results["seeded-init"] = {
        "max_diff": max(
            (full[k] - v).abs().max().item()
            for k, v in ref.state_dict().items()
            if not k.endswith("_extra_state")
        ),
        "keys_equal": sorted(full)
        == sorted(k for k in ref.state_dict() if not k.endswith("_extra_state")),
    }
    # Negative control: without the TP gradient reduction of the tensors that see only this
    # rank's tokens/heads, sequence-parallel gradients must come out wrong.
    import megatron_apt.models.mmdit.model as mmdit
    import megatron_apt.models.wan.model as wan

    for module, key, args in (
        (mmdit, "control/no-grad-reduce", ("tiny", True, 1, ps_ref, ps_tp, 6)),
        (wan, "control/wan-no-grad-reduce", ("wan-debug", True, 2, ps_ref, ps_tp, 7, 10, 6)),
    ):
        saved = module.reduce_grad_over_tp
        module.reduce_grad_over_tp = lambda x, ps: x
        try:
            results[key] = run_case(*args)
        finally:
            module.reduce_grad_over_tp = saved
    finish(results, out_path)


def finish(results, out_path):
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    print("TP-EQUIVALENCE-DONE", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = ap.parse_args()
    main(args.out, quick=args.quick)
