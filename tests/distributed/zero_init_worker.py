"""2 ranks (torchrun, gloo): the trained networks built under ZeRO-3's ``zero.Init``
(megatron_apt.engine.zero_init.partitioned_build) against the same networks built whole.

Writes a JSON of measurements; the assertions are in test_zero_init.py."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from megatron_apt.checkpoint.io import save_model_file
from megatron_apt.checkpoint.model_init import build_discriminator, build_mmdit
from megatron_apt.config.recipes import get_recipe
from megatron_apt.config.training import plan_batch
from megatron_apt.engine.zero_init import copy_weights, partitioned_build
from megatron_apt.models.build_options import gathered, is_partitioned
from megatron_apt.models.discriminator import Discriminator
from megatron_apt.models.mmdit import MMDiT
from megatron_apt.parallel import initialize_parallel


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    return max((pa[k] - pb[k]).abs().max().item() for k in pa)


def whole_copy(module: torch.nn.Module, factory) -> torch.nn.Module:
    out = factory()
    copy_weights(out, module)
    return out


def main(out_path: str) -> None:
    ps = initialize_parallel(tensor_parallel_size=1)
    rank = dist.get_rank()
    cfg = get_recipe("tiny-apt")
    cfg.zero_stage = 3
    plan = plan_batch(cfg, ps.dp_cp_size)
    res: dict = {"dp": ps.dp_cp_size}

    # random init: partitioned == whole (same seed), every parameter split over the 2 ranks
    torch.manual_seed(0)
    whole = MMDiT(cfg.model, ps)
    torch.manual_seed(0)
    with partitioned_build(cfg, plan, ps):
        part = MMDiT(cfg.model, ps)
    params = list(part.parameters())
    res["all_partitioned"] = all(is_partitioned(p) for p in params)
    res["placeholders_empty"] = all(p.data.numel() == 0 for p in params)
    res["local_fraction"] = sum(p.ds_tensor.numel() for p in params) / sum(
        p.ds_numel for p in params
    )
    res["init_diff"] = max_diff(whole_copy(part, lambda: MMDiT(cfg.model, ps)), whole)
    # the adaLN-Zero init of the replicated layers ran on the gathered weights
    res["final_proj_zero"] = bool(
        (whole_copy(part, lambda: MMDiT(cfg.model, ps)).final_proj.weight == 0).all()
    )
    # without zero.Init (--no-zero-init) nothing is partitioned
    cfg.zero_init = False
    with partitioned_build(cfg, plan, ps):
        plain = MMDiT(cfg.model, ps)
    res["no_zero_init_partitioned"] = any(is_partitioned(p) for p in plain.parameters())
    cfg.zero_init = True

    # loading a model file (--init-discriminator) into a partitioned D: exact, heads split
    path = out_path + ".init.safetensors"
    if rank == 0:
        torch.manual_seed(5)
        src = MMDiT(cfg.model, ps)
        with torch.no_grad():
            for p in src.parameters():
                p.add_(torch.randn_like(p))
        save_model_file(path, src.state_dict(), cfg.model, role="diffusion")
    dist.barrier()
    ref = build_mmdit(cfg.model, ps, init_from=path)
    torch.manual_seed(1)
    with partitioned_build(cfg, plan, ps):
        d = build_discriminator(cfg.model, ps, init_from=path)
    res["load_diff"] = max_diff(whole_copy(d.backbone, lambda: MMDiT(cfg.model, ps)), ref)
    res["heads_partitioned"] = all(is_partitioned(p) for p in d.heads.parameters())
    torch.manual_seed(1)
    d_whole = build_discriminator(cfg.model, ps, init_from=path)
    res["disc_diff"] = max_diff(
        whole_copy(d, lambda: Discriminator(MMDiT(cfg.model, ps), d.cfg)), d_whole
    )
    # outside a build context a partitioned module cannot be written by mistake
    try:
        with gathered(part.final_proj.parameters(), modify=True):
            pass
        res["gather_outside_refused"] = False
    except RuntimeError:
        res["gather_outside_refused"] = True
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.barrier()
    print("ZERO-INIT-DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
