"""Worker of test_bf16_grad_accumulation.py: the gradient a bf16 DeepSpeed engine hands its
optimizer after N micro-batches, against fp64 references, per ZeRO stage.

For each ZeRO stage and N: a small MLP (odd sizes, so ZeRO 1/2 split parameters between ranks'
partitions) in a bf16 engine with ``torch.optim.SGD(lr=1)`` as the client optimizer; one update
of N micro-batches per rank. The gradient the optimizer received is read off its fp32 masters,
``before - after`` (:class:`MasterWeights`, every layout), so the read-out is the same at every
stage and sees exactly what the optimizer stepped with (its rounding: one fp32 subtraction).

Configs per stage: ``project`` (``build_deepspeed_config`` as the trainer uses it),
``bf16-accum`` (the same without ``data_types`` and ``communication_data_type``: DeepSpeed's
defaults, the project's config before), where the project leaves the data-parallel
reduction in bf16 (ZeRO-2/3), ``fp32-comm`` (``project`` with
``communication_data_type: "fp32"``), and ``offload`` (``project`` with a user JSON that
offloads the optimizer to CPU memory). Two references, in plain torch:

* ``accum``: the micro-batch gradients a plain bf16 copy of the model computes (the same bf16
  forward/backward, the loss divided by N as ``engine.backward`` does), summed in fp64 and
  averaged over the ranks: what an exact accumulation would give. The error against it is the
  accumulation's (and the data-parallel reduction's);
* ``fp64``: the gradient of the fp64 model (the same bf16-valued weights and inputs) on the
  full batch: the total error, including bf16's forward/backward.

Rank 0 writes ``{stage: {N: {config: {"accum": rel, "fp64": rel, "optimizer": name,
"norm_vs_gradient": rel}}}}`` as JSON, ``rel`` = ||g - g_ref|| / ||g_ref|| over all
parameters and, for the norm, |DeepSpeed's recorded norm - ||g||| / ||g||; a config DeepSpeed
or the project refuses gets ``{"refused": message}``. ``trainer_sees_norm``: whether an engine
built by ``create_engine`` reports a DeepSpeed norm before its first step (the trainer's
``deepspeed_has_norm``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_apt.config.recipes import get_recipe  # noqa: E402
from megatron_apt.config.training import plan_batch  # noqa: E402
from megatron_apt.engine.ds_config import build_deepspeed_config  # noqa: E402
from megatron_apt.engine.engines import create_engine, prepare_deepspeed  # noqa: E402
from megatron_apt.engine.grad_norm import deepspeed_has_norm  # noqa: E402
from megatron_apt.engine.master_weights import MasterWeights  # noqa: E402
from megatron_apt.engine.mpu import DeepSpeedMPU  # noqa: E402
from megatron_apt.parallel.state import initialize_parallel  # noqa: E402

MARKER = "GRAD-ACCUM-DONE"
MICRO = 4  # samples per micro-batch
PRECISION = ("data_types", "communication_data_type")  # what the project added to the config
D_IN, D_HID, D_OUT = 29, 61, 13


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, D_HID), torch.nn.Tanh(), torch.nn.Linear(D_HID, D_OUT)
    )


def make_data(n: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [world, n, MICRO, D_IN]`` (bf16 values) and targets ``y [world, n, MICRO, D_OUT]``:
    a shared offset plus noise, so the micro-batch gradients agree in sign and their running
    sum grows (as a training gradient's does)."""
    gen = torch.Generator().manual_seed(1234)
    x = 1.0 + 0.5 * torch.randn(world, n, MICRO, D_IN, generator=gen)
    y = 2.0 + 0.1 * torch.randn(world, n, MICRO, D_OUT, generator=gen)
    return x.bfloat16(), y


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.float() - y).square().mean()


def reference_accum(net, x, y, n: int) -> dict[str, torch.Tensor]:
    """Per micro-batch bf16 gradients of ``loss / n`` (as ``engine.backward`` scales it),
    summed in fp64, averaged over the ranks."""
    model = copy.deepcopy(net).bfloat16()
    acc = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in model.named_parameters()}
    for r in range(x.shape[0]):
        for k in range(n):
            model.zero_grad(set_to_none=True)
            (loss_fn(model(x[r, k]), y[r, k]) / n).backward()
            for name, p in model.named_parameters():
                acc[name] += p.grad.double()
    return {k: v / x.shape[0] for k, v in acc.items()}


def reference_fp64(net, x, y) -> dict[str, torch.Tensor]:
    """The fp64 gradient of the mean loss over every rank's micro-batches, weights rounded to
    bf16 as the engine's module holds them."""
    model = copy.deepcopy(net).bfloat16().double()
    model.zero_grad(set_to_none=True)
    losses = [loss_fn(model(xb.double()), yb) for xb, yb in zip(x.flatten(0, 1), y.flatten(0, 1))]
    torch.stack(losses).mean().backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def rel_error(g: dict, ref: dict) -> float:
    num = sum(float((g[k].double() - ref[k]).square().sum()) for k in ref)
    den = sum(float(ref[k].square().sum()) for k in ref)
    return (num / den) ** 0.5


def engine_gradient(net, conf: dict, ps, x, y, n: int) -> tuple[dict, str]:
    """One update of ``n`` micro-batches on this rank; the gradient from the masters."""
    import deepspeed

    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    engine, *_ = deepspeed.initialize(
        model=net, optimizer=opt, config=conf, mpu=DeepSpeedMPU(ps), dist_init_required=False
    )
    masters = MasterWeights(engine, ps)
    before = masters.full_state()
    rank = dist.get_rank(ps.grad_group) if ps.dp_cp_size > 1 else 0
    for k in range(n):
        engine.backward(loss_fn(engine(x[rank, k]), y[rank, k]))
        engine.step()
    after = masters.full_state()
    grad = {k: before[k].double() - after[k].double() for k in before}
    true_norm = sum(float(g.square().sum()) for g in grad.values()) ** 0.5
    norm = abs(float(engine.get_global_grad_norm()) - true_norm) / true_norm
    name = type(engine.optimizer).__name__
    engine.destroy()
    return grad, {"optimizer": name, "norm_vs_gradient": norm}


def run(stage: int, n: int, ps) -> dict:
    world = ps.dp_cp_size
    cfg = get_recipe("tiny-apt")
    cfg = cfg.replace(
        zero_stage=stage,
        bf16=True,
        micro_batch_size=MICRO,
        global_batch_size=MICRO * n * world,
        optim=dataclasses.replace(cfg.optim, grad_clip=0.0),
    )
    plan = plan_batch(cfg, dist.get_world_size())
    assert plan.accumulation == n, plan
    x, y = make_data(n, world)
    refs = {"accum": reference_accum(make_net(), x, y, n), "fp64": reference_fp64(make_net(), x, y)}
    out = {}
    try:
        project = build_deepspeed_config(cfg, plan)
    except ValueError as e:
        out["project"] = {"refused": str(e)}
        project = None
    if project is not None:
        out["trainer_sees_norm"] = trainer_sees_norm(cfg, plan, ps)
    old = {k: v for k, v in (project or _without_accum(cfg, plan)).items() if k not in PRECISION}
    configs = {"bf16-accum": old, "project": project}
    if project is not None and "communication_data_type" not in project:
        configs["fp32-comm"] = {**project, "communication_data_type": "fp32"}
    if project is not None:  # the project's config with a user JSON offloading the optimizer
        user = _offload_json()
        configs["offload"] = build_deepspeed_config(cfg, plan, user)
        Path(user).unlink()
    for label, conf in configs.items():
        if conf is None:
            continue
        grad, info = engine_gradient(make_net(), conf, ps, x, y, n)
        out[label] = {k: rel_error(grad, ref) for k, ref in refs.items()} | info
        out[label]["data_types"] = conf.get("data_types")
        out[label]["communication_data_type"] = conf.get("communication_data_type")
    return out


def trainer_sees_norm(cfg, plan, ps) -> bool:
    """Whether the trainer takes the gradient norm from DeepSpeed already on the first update
    (``deepspeed_has_norm`` before any step) of an engine built by ``create_engine``."""
    engine = create_engine(make_net(), cfg, plan, ps, cfg.optim.lr)
    seen = deepspeed_has_norm(engine)
    engine.destroy()
    return seen


def _offload_json() -> str:
    """A user DeepSpeed JSON offloading the optimizer (a temporary file of this process)."""
    user = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(user, f)
    return f.name


def _without_accum(cfg, plan) -> dict:
    """The config of a stage the project refuses (bf16 ZeRO-0, N > 1), as it was before:
    built for one micro-batch per update, with the batch arithmetic of ``plan``."""
    one = dataclasses.replace(plan, accumulation=1)
    conf = build_deepspeed_config(cfg, one)
    conf.update(
        gradient_accumulation_steps=plan.accumulation, train_batch_size=plan.deepspeed_batch_size
    )
    return conf


def main(argv: list[str]) -> int:
    out, stages, counts = Path(argv[0]), argv[1].split(","), argv[2].split(",")
    prepare_deepspeed()
    ps = initialize_parallel(seed=0)
    results = {s: {c: run(int(s), int(c), ps) for c in counts} for s in stages}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))
        for s, per_n in results.items():
            for c, r in per_n.items():
                print(f"ZeRO-{s} N={c} world={dist.get_world_size()}: {json.dumps(r)}")
    dist.barrier()
    print(f"{MARKER} rank={dist.get_rank()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
