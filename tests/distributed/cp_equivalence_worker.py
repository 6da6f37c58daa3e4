"""Worker for test_context_parallel: context parallel size 2 (Ulysses) against CP=1, same weights.

Launched with ``torchrun --nproc-per-node 2`` (CP=2) or ``4`` with ``--tp 2`` (TP=2 with
sequence parallel x CP=2). Every rank builds the single-process reference on a process group
of its own and the parallel model from the reference's weights (TP shards; CP replicates).
Parallel gradients: gathered over TP, then summed over CP (what the ``dp x cp`` reduction of the
trainer does with the loss multiplied by ``cp``). Rank 0 writes the largest differences as JSON.
Both families: the MMDiT presets and the Wan debug model (``wan/...`` cases: the visual tokens
split over CP, the whole text on every CP rank), each alone and as a discriminator backbone.
"""

import argparse
import json

import torch
import torch.distributed as dist

import megatron_apt.models.discriminator as discriminator_module
import megatron_apt.models.mmdit.model as mmdit_module
import megatron_apt.models.wan.model as wan_module
from megatron_apt.models import Discriminator, MMDiT
from megatron_apt.models.families import get_preset as family_preset
from megatron_apt.models.mmdit import get_preset
from megatron_apt.models.wan import WanDiT
from megatron_apt.parallel import initialize_parallel, single_process_state
from megatron_apt.parallel.tensor_parallel import gather_state_dict, shard_state_dict
from megatron_apt.testing import dummy_inputs, randomize_parameters
from megatron_apt.testing.memory_probe import saved_storage_bytes


def pair(build, ps_ref, ps_par, seed):
    ref = build(ps_ref)
    randomize_parameters(ref, seed=seed)
    par = build(ps_par)
    par.load_state_dict(shard_state_dict(ref.state_dict(), par, ps_par))
    return ref, par


def summed_grads(model, ps):
    grads = gather_state_dict(model, ps, grads=True)
    for g in grads.values():
        dist.all_reduce(g, group=ps.cp_group)
    return grads


def grad_report(ref, par, ps):
    got = summed_grads(par, ps)
    diffs = {}
    for n, p in ref.named_parameters():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        diffs[n] = (got[n] - want).abs().max().item()
    return {
        "grad_diff": max(diffs.values()),
        "worst_grad": max(diffs, key=diffs.get),
        "grad_max": max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None),
        "num_grads": len(diffs),
    }


def model_case(cfg, model_cls, inputs, ps_ref, ps, recompute=False):
    ref, par = pair(lambda p: model_cls(cfg, p), ps_ref, ps, seed=1)
    if recompute:
        par.set_recompute("all")
    layers = (1, cfg.num_layers)
    outs = []
    for m in (ref, par):
        v, feats = m(**inputs, return_layers=layers)
        w = torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
        ((v * w).sum() + sum((f**2).mean() for f in feats)).backward()
        outs.append((v.detach(), [f.detach() for f in feats]))
    return {
        "out_max": outs[0][0].abs().max().item(),
        "out_diff": (outs[0][0] - outs[1][0]).abs().max().item(),
        "feat_diff": max((a - b).abs().max().item() for a, b in zip(outs[0][1], outs[1][1])),
        **grad_report(ref, par, ps),
    }


def mmdit_case(preset, frames, text_len, ps_ref, ps, recompute=False):
    cfg = get_preset(preset)
    inputs = dummy_inputs(cfg, batch=2, frames=frames, height=8, width=8, text_len=text_len)
    return model_case(cfg, MMDiT, inputs, ps_ref, ps, recompute)


def wan_case(frames, height, width, text_len, ps_ref, ps, masked=True, recompute=False):
    """The Wan debug model (patches (1, 2, 2)): a ``frames x height/2 x width/2`` token grid
    whose CP chunks end inside a row or a frame; sample 1's last text tokens padded
    (``masked``), or ``text_mask=None`` (diffusers' Wan: every token a key)."""
    cfg = family_preset("wan-debug")
    inputs = dummy_inputs(
        cfg, batch=2, frames=frames, height=height, width=width, text_len=text_len, masked=masked
    )
    return model_case(cfg, WanDiT, inputs, ps_ref, ps, recompute)


def disc_case(ps_ref, ps, family="mmdit"):
    """Logits, parameter gradients and the gradient w.r.t. the input latents (the G phase
    backpropagates through D into G's sample)."""
    if family == "wan":  # 3 blocks, heads after 1, 2, 3; a 2 x 3 x 2 token grid
        cfg = family_preset("wan-debug", num_layers=3)
        backbone, size = WanDiT, dict(height=6, width=4)
    else:
        cfg = get_preset("tiny", num_layers=3)
        backbone, size = MMDiT, {}
    ref, par = pair(lambda p: Discriminator(backbone(cfg, p)), ps_ref, ps, seed=2)
    inputs = dummy_inputs(cfg, batch=3, frames=2, text_len=5, seed=4, **size)
    w = torch.tensor([1.0, -2.0, 0.5])
    logits, input_grads = [], []
    for d in (ref, par):
        x = inputs["latents"].clone().requires_grad_(True)
        lg = d(**{**inputs, "latents": x})
        (lg * w).sum().backward()
        logits.append(lg.detach())
        input_grads.append(x.grad)
    g_in = input_grads[1].clone()
    dist.all_reduce(g_in, group=ps.cp_group)  # each CP rank holds its tokens' part
    heads = [n for n, _ in ref.named_parameters() if not n.startswith("backbone.")]
    return {
        "out_max": logits[0].abs().max().item(),
        "out_diff": (logits[0] - logits[1]).abs().max().item(),
        "input_grad_diff": (g_in - input_grads[0]).abs().max().item(),
        "input_grad_max": input_grads[0].abs().max().item(),
        "head_params": len(heads),
        **grad_report(ref, par, ps),
    }


def saved_bytes_case(ps):
    """Bytes of the distinct non-parameter storages autograd keeps for backward on this rank,
    against tools/plan_memory.py's inventory for the same layout (it divides the block
    activations by CP and counts the all-to-all's extra output copy)."""
    from megatron_apt.config.memory import _Layout
    from megatron_apt.models.mmdit.memory import pass_activation_bytes

    cfg = get_preset("tiny", num_layers=3)
    model = MMDiT(cfg, ps)
    randomize_parameters(model, seed=0)
    batch, text_len = 2, 16
    inputs = dummy_inputs(cfg, batch=batch, height=32, width=32, text_len=text_len, masked=False)
    measured = saved_storage_bytes(model, inputs)
    lay = _Layout(m=4, tp=ps.tp_size, cp=ps.cp_size, sp=ps.sequence_parallel)
    _, planned = pass_activation_bytes(cfg, 256, text_len, batch, lay, recompute=())
    _, planned_cp1 = pass_activation_bytes(
        cfg, 256, text_len, batch, _Layout(m=4, tp=ps.tp_size, cp=1, sp=ps.sequence_parallel), ()
    )
    return {"measured": measured, "planned": planned, "planned_cp1": planned_cp1}


def main(out_path: str, tp: int) -> None:
    torch.manual_seed(0)
    ps = initialize_parallel(
        tensor_parallel_size=tp, context_parallel_size=2, sequence_parallel=tp > 1
    )
    ps_ref = single_process_state()
    results = {"world": [dist.get_world_size(), ps.tp_size, ps.cp_size, ps.dp_size]}
    results["sequence_parallel"] = ps.sequence_parallel
    for preset, frames, text_len in (("tiny", 1, 5), ("tiny", 3, 6), ("tiny-sd3", 1, 7)):
        key = f"{preset}/T={frames}/L={text_len}"
        results[key] = mmdit_case(preset, frames, text_len, ps_ref, ps)
    results["recompute"] = mmdit_case("tiny", 3, 5, ps_ref, ps, recompute=True)
    # Wan: 1 x 3 x 4 = 12 tokens (CP chunks end mid-row), 3 x 2 x 4 = 24 (mid-frame)
    results["wan/T=1/L=5"] = wan_case(1, 6, 8, 5, ps_ref, ps)
    results["wan/T=3/L=7"] = wan_case(3, 4, 8, 7, ps_ref, ps)
    results["wan/T=1/L=5/no-mask"] = wan_case(1, 6, 8, 5, ps_ref, ps, masked=False)
    results["wan/recompute"] = wan_case(3, 4, 8, 7, ps_ref, ps, recompute=True)
    results["discriminator"] = disc_case(ps_ref, ps)
    results["discriminator/wan"] = disc_case(ps_ref, ps, family="wan")
    results["saved_bytes"] = saved_bytes_case(ps)

    # Negative controls: the checks above can fail.
    # (a) heads without the 1/cp gradient scale: their gradients count cp times
    saved_rep = discriminator_module.replicated_over_cp
    discriminator_module.replicated_over_cp = lambda fn, ps, *xs: fn(*xs)
    try:
        results["control/no-replicated-scale"] = disc_case(ps_ref, ps)
    finally:
        discriminator_module.replicated_over_cp = saved_rep

    # (b) the key mask in the unpermuted order [x; c] instead of the all-to-all's order
    def naive_mask(n, text_mask, ps):
        vis = torch.ones(text_mask.shape[0], n, dtype=torch.bool)
        return torch.cat([vis, text_mask.bool()], dim=1)

    saved_mask = mmdit_module.cp_key_mask
    mmdit_module.cp_key_mask = naive_mask
    try:
        results["control/naive-key-mask"] = mmdit_case("tiny", 1, 5, ps_ref, ps)
    finally:
        mmdit_module.cp_key_mask = saved_mask

    # (c) Wan: every CP rank rotating its tokens by the first chunk's positions (the RoPE
    # table not sliced to the rank's tokens)
    def first_chunk_rope(cfg, grid, ps, device):
        cos_sin = wan_module.rope_3d(grid, cfg.rope_axes_dim, cfg.rope_theta, device)
        return wan_module.rope_rotation(*(t[: t.shape[0] // ps.cp_size] for t in cos_sin))

    saved_rope = wan_module.rank_rope
    wan_module.rank_rope = first_chunk_rope
    try:
        results["control/wan-unsliced-rope"] = wan_case(1, 6, 8, 5, ps_ref, ps)
    finally:
        wan_module.rank_rope = saved_rope

    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    print("CP-EQUIVALENCE-DONE", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = ap.parse_args()
    main(args.out, args.tp)
