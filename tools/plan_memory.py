#!/usr/bin/env python
"""Per-GPU memory and step time of a training set-up, without building anything.

Components: G and D weights, G's EMA, gradients, optimizer states (RMSprop: one fp32 state per
parameter; fp32 master weights with bf16), activations from the model family's saved-tensor
inventory (megatron_apt/models/mmdit/memory.py explains every term for the MMDiT,
megatron_apt/models/wan/memory.py for Wan2.1, megatron_apt/config/memory.py the rest), and the
step time from the analytic FLOPs at a stated utilization. Any family's preset (--model); Wan's
default VAE is 4x8x8 and its text 512 umT5 tokens.

    python tools/plan_memory.py                      # the paper's image and video set-ups
    python tools/plan_memory.py --recipe mmdit-8b-video-apt --gpus 1024 --recompute all
    python tools/plan_memory.py --model mmdit-8b --pixels 49x720x1280 --vae 4x8x8 \\
        --tp 4 --sp --gpus 1024 --global-batch 2048 --zero-stage 3 --recompute all --json
    python tools/plan_memory.py --model wan2.1-t2v-14b --pixels 81x720x1280 --vae 4x8x8 \
        --tp 8 --sp --gpus 256 --recompute all
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apt.config.memory import (  # noqa: E402
    GIB,
    H100_PEAK_TFLOPS,
    FamilyMemory,
    MemoryPlan,
    MemoryPlanInput,
    layout_rule,
    plan_memory,
)
from megatron_apt.config.recipes import RECIPES, get_recipe  # noqa: E402
from megatron_apt.config.training import parse_head_layers  # noqa: E402
from megatron_apt.models.mmdit.config import PRESETS as MMDIT_PRESETS  # noqa: E402
from megatron_apt.models.mmdit.config import MMDiTConfig  # noqa: E402
from megatron_apt.models.mmdit.config import get_preset as mmdit_preset  # noqa: E402
from megatron_apt.models.mmdit.memory import MMDIT_MEMORY  # noqa: E402

# The family registry (megatron_apt.models.families) loads torch and megatron-core (seconds):
# it is imported only for a model of another family than the MMDiT, whose config and planner
# terms are plain Python (the paper's set-ups and every MMDiT recipe plan in a fraction of a
# second).


def get_model(name: str):
    """The preset ``name`` of any family (``ValueError`` naming them all)."""
    if name in MMDIT_PRESETS:
        return mmdit_preset(name)
    from megatron_apt.models.families import get_preset

    return get_preset(name)


def memory_terms(cfg) -> FamilyMemory:
    """The planner's terms of ``cfg``'s family (the registry's ``memory``)."""
    if isinstance(cfg, MMDiTConfig):
        return MMDIT_MEMORY
    from megatron_apt.models.families import family_of

    return family_of(cfg).memory


PAPER_SETUPS = {
    "paper image (1024px, batch 9062, 256 H100)": dict(
        recipe="mmdit-8b-image-apt", gpus=256, global_batch=9062
    ),
    "paper video (1280x720x49, batch 2048, 1024 H100, TP4+SP)": dict(
        recipe="mmdit-8b-video-apt", gpus=1024, global_batch=2048
    ),
}


def _triple(text: str, what: str) -> tuple[int, int, int]:
    try:
        a, b, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} wants AxBxC integers, got {text!r}") from None
    if min(a, b, c) < 1:
        raise argparse.ArgumentTypeError(f"{what} sizes must be >= 1, got {text!r}")
    return a, b, c


def pixels_to_latent(
    pixels: tuple[int, int, int], vae: tuple[int, int, int]
) -> tuple[int, int, int]:
    """(frames, height, width) in pixels -> latent units through a VAE with compression
    (temporal, spatial, spatial); video VAEs keep the first frame: (F - 1) / t + 1."""
    (f, h, w), (ct, ch, cw) = pixels, vae
    if h % ch or w % cw:
        raise ValueError(f"pixels {h}x{w} are not divisible by the VAE factor {ch}x{cw}")
    frames = f if ct == 1 else (f - 1) // ct + 1
    if ct > 1 and (f - 1) % ct:
        raise ValueError(f"{f} frames do not fit a {ct}x temporal VAE (need k x {ct} + 1)")
    return frames, h // ch, w // cw


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = ap.add_argument
    a("--recipe", choices=sorted(RECIPES), help="take model, latent, TP/SP, ZeRO, dtype from it")
    a(
        "--model",
        help="a preset of any family, e.g. mmdit-8b, wan2.1-t2v-14b, wan2.1-t2v-1.3b (default: "
        "the recipe's, or mmdit-8b; tools/plan_model.py --all lists them)",
    )
    a("--stage", choices=("apt", "diffusion", "consistency"), help="default: recipe's or apt")
    a("--latent", type=lambda t: _triple(t, "--latent"), help="latent FxHxW, e.g. 13x90x160")
    a("--pixels", type=lambda t: _triple(t, "--pixels"), help="pixels FRAMESxHxW, e.g. 1x1024x1024")
    a(
        "--vae",
        type=lambda t: _triple(t, "--vae"),
        help="VAE factor TxHxW (default: the family's: 1x8x8 MMDiT, 4x8x8 Wan)",
    )
    a("--text-len", type=int, help="text tokens (default: recipe's, or the family's: 256, Wan 512)")
    a("--gpus", type=int, help="GPUs in the job (default: TP x CP)")
    a("--tp", type=int, help="tensor-parallel size")
    a(
        "--cp",
        type=int,
        help="context-parallel size (divides sequence activations; default: the recipe's, or 1)",
    )
    a("--sp", action="store_true", default=None, help="sequence parallel (with TP > 1)")
    a("--zero-stage", type=int, choices=(0, 1, 2, 3))
    a("--micro-batch", type=int)
    a("--global-batch", type=int, help="for the step time (default micro x DP)")
    a("--recompute", help="none | all | 1-based block numbers '1,2,5-8' (default none)")
    a("--dtype", choices=("bf16", "fp32"))
    a("--optimizer", choices=("rmsprop", "adamw"))
    a("--no-ema", action="store_true", help="leave out the EMA copy")
    a("--d-head-layers", help="D's head blocks: 'last' or '2,4' (default: recipe's / paper's)")
    a("--utilization", type=float, default=0.4, help="share of peak FLOPs reached (0.4)")
    a(
        "--peak-tflops",
        type=float,
        help=f"per-GPU peak (default H100 dense: {H100_PEAK_TFLOPS})",
    )
    a("--gpu-memory-gib", type=float, default=80.0, help="flag plans above this (80, H100)")
    a("--json", action="store_true", help="print JSON")
    return ap


def plan_input(args: argparse.Namespace, **defaults) -> MemoryPlanInput:
    """A :class:`MemoryPlanInput` from the flags over the recipe (flags win)."""
    recipe = args.recipe or defaults.get("recipe")
    cfg = get_recipe(recipe) if recipe else None
    pick = lambda flag, rec, default: (  # noqa: E731
        flag if flag is not None else (rec if cfg is not None else default)
    )
    model = get_model(args.model) if args.model else (cfg.model if cfg else get_model("mmdit-8b"))
    if args.latent and args.pixels:
        raise ValueError("give --latent or --pixels, not both")
    family = memory_terms(model)
    if args.pixels:
        latent = pixels_to_latent(args.pixels, args.vae or family.vae)
    elif args.latent:
        latent = args.latent
    elif cfg is not None:
        latent = (cfg.data.frames, cfg.data.height, cfg.data.width)
    else:
        latent = (1, 128, 128)
    tp = pick(args.tp, cfg and cfg.tensor_parallel, 1)
    sp = pick(args.sp, cfg and cfg.sequence_parallel, False)
    cp = pick(args.cp, cfg and cfg.context_parallel, 1)
    gpus = args.gpus or defaults.get("gpus") or tp * cp
    recompute = (
        args.recompute or defaults.get("recompute") or (cfg.recompute_layers if cfg else "none")
    )
    micro = pick(args.micro_batch, cfg and cfg.micro_batch_size, 1)
    global_batch = args.global_batch or defaults.get("global_batch")
    if global_batch is None and cfg is not None and gpus % (tp * cp) == 0:
        step = micro * gpus // (tp * cp)  # the recipe's batch where this layout reaches it
        global_batch = cfg.global_batch_size if cfg.global_batch_size % step == 0 else None
    return MemoryPlanInput(
        model=model,
        stage=pick(args.stage, cfg and cfg.stage, "apt"),
        frames=latent[0],
        height=latent[1],
        width=latent[2],
        text_len=pick(args.text_len, cfg and cfg.data.text_len, family.text_len),
        micro_batch=micro,
        global_batch=global_batch,
        gpus=gpus,
        tp=tp,
        cp=cp,
        sequence_parallel=bool(sp) and tp > 1,
        zero_stage=pick(args.zero_stage, cfg and cfg.zero_stage, 3),
        dtype=args.dtype or ("bf16" if cfg is None or cfg.bf16 else "fp32"),
        optimizer=pick(args.optimizer, cfg and cfg.optim.name, "rmsprop"),
        recompute=recompute,
        ema=not args.no_ema,
        d_updates=cfg.d_updates_per_iter if cfg else 1,
        head_layers=parse_head_layers(
            args.d_head_layers or (cfg.d_head_layers if cfg else None), model.num_layers
        ),
        utilization=args.utilization,
        peak_tflops=args.peak_tflops,
    )


def format_plan(title: str, plan: MemoryPlan, limit_gib: float, model) -> str:
    i = plan.inputs
    rule = "; ".join([layout_rule(model), *memory_terms(model).notes])
    lines = [
        f"## {title}",
        f"model: {i['family']}, {model.num_layers} layers, hidden {model.hidden_size}, "
        f"ffn {model.ffn_hidden_size}; {rule}",
        f"stage {i['stage']}, latent {i['frames']}x{i['height']}x{i['width']} "
        f"({plan.visual_tokens} visual + {i['text_len']} text tokens), micro-batch "
        f"{i['micro_batch']}, {i['gpus']} GPUs = TP {i['tp']} x CP {i['cp']} x DP {i['dp']}"
        f"{' + SP' if i['sequence_parallel'] else ''}, ZeRO-{i['zero_stage']}, {i['dtype']}, "
        f"{i['optimizer']}, recompute {i['recompute_blocks']} blocks",
        "",
        "| component | GiB per GPU |",
        "|---|---:|",
    ]
    for name, value in plan.components.items():
        lines.append(f"| {name} | {value / GIB:.2f} |")
    total = plan.total / GIB
    verdict = "fits" if total <= limit_gib else "does NOT fit"
    lines.append(f"| **total** | **{total:.2f}** ({verdict} in {limit_gib:g} GiB) |")
    phases = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in plan.activations_by_phase.items())
    lines.append("")
    lines.append(f"activations by phase: {phases}")
    lines.append(
        f"one update: {plan.flops_per_update / 1e15:.1f} PFLOP, ~{plan.step_time_s:.1f} s at "
        f"{i['utilization']:.0%} of {i['peak_tflops'] or H100_PEAK_TFLOPS[i['dtype']]:g} "
        f"TFLOP/s per GPU (global batch {i['global_batch'] or i['micro_batch'] * i['dp']})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    custom = any(
        getattr(args, k) is not None
        for k in ("recipe", "model", "latent", "pixels", "tp", "gpus", "recompute")
    )
    jobs = (
        [("custom", {})]
        if custom
        else [
            (f"{title}, recompute {rc}", {**setup, "recompute": rc})
            for title, setup in PAPER_SETUPS.items()
            for rc in ("none", "all")
        ]
    )
    results = []
    try:
        for title, defaults in jobs:
            inp = plan_input(args, **defaults)
            plan = plan_memory(inp, memory_terms(inp.model))
            results.append((title, plan, inp.model))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({t: p.to_dict() for t, p, _ in results}, indent=1))
        return 0
    print("\n\n".join(format_plan(t, p, args.gpu_memory_gib, m) for t, p, m in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
