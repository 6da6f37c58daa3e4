"""Worker of test_master_weights.py: bf16 DeepSpeed engines (ZeRO 0-3, DP = 2) whose EMA,
consistency target and export are checked against DeepSpeed's own fp32 masters.

For each ZeRO stage: a small network with odd sizes (so that ZeRO 1/2 split parameters
between the ranks' flat partitions), RMSprop with a learning rate small enough that most
updates are below bf16's resolution of the weights, a few steps; after each step the
project's EMA and consistency target are updated, and so are references computed from the
full fp32 masters as DeepSpeed itself assembles them (``deepspeed.utils.safe_get_full_fp32_param``
for ZeRO 1-3; for ZeRO 0, ``FP16_UnfusedOptimizer.fp32_groups``, the per-parameter fp32
clones that the RMSprop recipes get), and, as controls, what the previous code computed: the
EMA of the module's bf16 weights and a target lerped in bf16. Rank 0 writes the largest
differences as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_apt.config.recipes import get_recipe  # noqa: E402
from megatron_apt.config.training import plan_batch  # noqa: E402
from megatron_apt.engine.ema import EngineEMA, TargetEMA  # noqa: E402
from megatron_apt.engine.engines import create_engine  # noqa: E402
from megatron_apt.engine.export import stream_full  # noqa: E402
from megatron_apt.engine.master_weights import MasterWeights  # noqa: E402
from megatron_apt.parallel.state import initialize_parallel  # noqa: E402

MARKER = "MASTER-WEIGHTS-DONE"
DECAY, MU, STEPS = 0.5, 0.9, 6


def reference_masters(engine, stage: int) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in engine.module.named_parameters()}
    if stage == 0:
        from torch._utils import _unflatten_dense_tensors

        opt, out = engine.optimizer, {}
        if hasattr(opt, "fp32_groups_flat"):  # FP16_Optimizer (fused Adam)
            for flat, params in zip(opt.fp32_groups_flat, opt.fp16_groups, strict=True):
                for p, t in zip(params, _unflatten_dense_tensors(flat, params), strict=True):
                    out[names[id(p)]] = t.float().clone()
        else:  # FP16_UnfusedOptimizer: one fp32 clone per parameter
            for masters, params in zip(opt.fp32_groups, opt.fp16_groups, strict=True):
                for p, t in zip(params, masters, strict=True):
                    out[names[id(p)]] = t.float().clone()
        return out
    from deepspeed.utils import safe_get_full_fp32_param

    return {
        n: safe_get_full_fp32_param(p).float().clone() for n, p in engine.module.named_parameters()
    }


def module_weights(engine, stage: int) -> dict[str, torch.Tensor]:
    params = list(engine.module.parameters())
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def maxdiff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def export_vs_master(mw: MasterWeights, ps, reference: dict) -> float:
    """The end-of-run export's tensors (streamed to rank 0, one parameter at a time) against
    DeepSpeed's own fp32 masters; every rank takes part in the gathers, rank 0 compares."""
    streamed = dict(stream_full(mw, mw.local, ps))
    return maxdiff(streamed, reference) if dist.get_rank() == 0 else 0.0


def run_stage(stage: int, ps) -> dict:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 11))
    target = torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 11))
    target.load_state_dict(net.state_dict())
    target.requires_grad_(False).to(torch.bfloat16)
    cfg = get_recipe("tiny-apt")
    cfg = cfg.replace(
        zero_stage=stage,
        bf16=True,
        micro_batch_size=4,
        global_batch_size=8,
        optim=dataclasses.replace(cfg.optim, lr=3e-4, grad_clip=0.0),
    )
    plan = plan_batch(cfg, dist.get_world_size())
    engine = create_engine(net, cfg, plan, ps, cfg.optim.lr)
    ema = EngineEMA(engine, ps, DECAY)
    tgt = TargetEMA(engine, ps, MU, target)
    ref_ema = reference_masters(engine, stage)
    ref_target = {k: v.clone() for k, v in ref_ema.items()}
    old_ema = module_weights(engine, stage)
    old_target = {k: v.to(torch.bfloat16) for k, v in old_ema.items()}  # lerped in bf16
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    for _ in range(STEPS):
        x = torch.randn(4, 13, generator=gen).to(torch.bfloat16)
        loss = engine(x).float().square().mean()
        engine.backward(loss)
        engine.step()
        ema.update()
        tgt.update()
        master = reference_masters(engine, stage)
        module = module_weights(engine, stage)
        for k in ref_ema:
            ref_ema[k].mul_(DECAY).add_(master[k], alpha=1 - DECAY)
            ref_target[k].mul_(MU).add_(master[k], alpha=1 - MU)
            old_ema[k].mul_(DECAY).add_(module[k], alpha=1 - DECAY)
            old_target[k].mul_(MU).add_(module[k].to(torch.bfloat16), alpha=1 - MU)
    mw = MasterWeights(engine, ps)
    full_master = mw.full_state()
    roundtrip = 0.0
    for n in mw.params:
        local, again = mw.local(n), mw.localize(n, full_master[n])
        assert (local is None) == (again is None), n
        if local is not None:
            roundtrip = max(roundtrip, (local - again).abs().max().item())
    # an EMA file of the earlier format (full shapes) loads into this layout
    reloaded = EngineEMA(engine, ps, DECAY)
    reloaded.load_state_dict(ema.full_state_dict(), source="<full-shaped>")
    target_module = {n: p.detach().float() for n, p in target.named_parameters()}
    ref_target_bf16 = {k: v.to(torch.bfloat16).float() for k, v in ref_target.items()}
    return {
        "layouts": sorted(set(mw.layout.values())),
        "fragments_split": sum(
            1
            for n in mw.params
            if mw.layout[n] == "fragment"
            and mw.local_shape(n) is not None
            and mw.local_shape(n)[0] < mw.params[n].numel()
        ),
        "ema_vs_reference": maxdiff(ema.full_state_dict(), ref_ema),
        "old_ema_vs_reference": maxdiff(old_ema, ref_ema),
        "export_vs_master": export_vs_master(mw, ps, reference_masters(engine, stage)),
        "module_vs_master": maxdiff(
            module_weights(engine, stage), reference_masters(engine, stage)
        ),
        "target_shadow_vs_reference": maxdiff(tgt.tp_local_state_dict(), ref_target),
        "target_module_vs_reference_bf16": maxdiff(target_module, ref_target_bf16),
        "old_target_vs_reference": maxdiff(old_target, ref_target),
        "localize_roundtrip": roundtrip,
        "reloaded_vs_ema": maxdiff(reloaded.full_state_dict(), ema.full_state_dict()),
    }


def main(argv: list[str]) -> int:
    out, stages = Path(argv[0]), [int(s) for s in argv[1:]]
    ps = initialize_parallel(seed=0)
    results = {str(s): run_stage(s, ps) for s in stages}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))
    dist.barrier()
    print(f"{MARKER} rank={dist.get_rank()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
