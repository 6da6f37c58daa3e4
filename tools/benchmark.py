#!/usr/bin/env python
"""Time our model (forward, forward+backward, one APT update) against diffusers' twin of it.

For a preset of any model family (the MMDiT's, Wan2.1's: ``megatron_apt/models/families.py``)
and a latent shape: warm-up calls, then ``--repeats`` timed calls (median kept) of

* ``forward``: one forward under ``torch.no_grad``;
* ``fwd-bwd``: forward + ``backward`` of a scalar loss (the parameter gradients);
* ``apt``: one full APT update in plain torch: ``discriminator_step`` + backward + RMSprop step
  of D, then ``generator_step`` + backward + RMSprop step of G with D frozen;
* ``trainer-apt``: the framework's overhead: the same APT update through the trainer
  (``Trainer.run_update``: two DeepSpeed engines of ``--zero-stage``, ``--accumulation``
  micro-batches from the data stream, the non-finite check, health metrics, gradient norms,
  G's EMA; one process) against plain torch, interleaved; ``--profile`` adds where the time
  goes (cProfile of both).

``--compile`` compiles every transformer block (ours per block, diffusers' per entry of its
block list, ``transformer_blocks`` in SD3, ``blocks`` in Wan: regional, the same way);
``--compile both`` times eager and compiled copies of every contender in the same run, repeats
interleaved.

Reported per phase: median time, tokens/s, achieved TFLOP/s from the family's analytic FLOP
count (``ModelFamily.forward_flops``: linear layers + attention; fwd+bwd = 3x forward; APT
update ~ 15x forward, see ``APT_FORWARD_EQUIVALENTS``), utilization against a dense matmul of
matching size measured in the same run and, on a GPU with a known datasheet, against its peak;
peak memory. diffusers' twin is timed in the same run (repeats interleaved with ours) and
``ours / diffusers`` printed: <= 1.0 means we are at least as fast. The twin
(``megatron_apt/benchmarking/twins.py``): for an MMDiT preset ``SD3Transformer2DModel`` of the
same width, depth, heads and token count (its own weights; images only); for a Wan preset
``WanTransformer3DModel`` of the same config loaded with our weights (``to_diffusers``), whose
output must agree with ours before anything is timed (exit code 1 if not).

    python tools/benchmark.py --preset mid --latent 1x64x64 --batch 1 --threads 2
    python tools/benchmark.py --preset tiny --latent 1x8x8 --warmup 1 --repeats 2 --json-out b.json
    python tools/benchmark.py --preset mid --latent 1x64x64 --compile both --threads 2
    python tools/benchmark.py --preset demo --latent 5x8x8 --text-len 12 --batch 8 \
        --phases trainer-apt --profile
    python tools/benchmark.py --preset mmdit-8b --latent 13x90x160 --text-len 256 --device cuda \\
        --dtype bf16 --layer-spec te --phases forward --skip-diffusers --json-out h100.json
    python tools/benchmark.py --preset wan-debug --override num_heads=4 --override head_dim=64 \\
        --latent 5x16x16 --text-len 64 --phases forward,fwd-bwd --compile both
    python tools/benchmark.py --preset wan2.1-t2v-1.3b --latent 21x60x104 --text-len 512 \\
        --device cuda --dtype bf16 --phases forward

Exit code 2 for a bad argument (unknown preset, a latent not divisible by the patch, a layer
spec this machine cannot build, an ``--override`` the config refuses); 1 when ours and a
same-weights twin disagree. Every phase runs for every family (Wan's APT update and trainer
through the family-neutral builders and trainer).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_apt.benchmarking.device import resolve_device  # noqa: E402
from megatron_apt.benchmarking.report import (  # noqa: E402, F401 (the tests read them here)
    APT_FORWARD_EQUIVALENTS,
    FLOP_FORMULA,
    FLOP_FORMULAS,
    benchmark_flops,
    contenders,
    device_description,
    markdown,
    phase_stats,
    ratios,
)
from megatron_apt.benchmarking.timing import (  # noqa: E402
    matmul_reference,
    measure_peak_memory,
    time_interleaved,
)
from megatron_apt.benchmarking.twins import (  # noqa: E402
    AgreementError,
    check_agreement,
    prepare_ours,
    twin_for,
)
from megatron_apt.benchmarking.workloads import (  # noqa: E402
    apt_update_call,
    make_inputs,
    ours_calls,
)
from megatron_apt.config.flops import visual_tokens  # noqa: E402
from megatron_apt.models.compile import compile_blocks, compile_status  # noqa: E402
from megatron_apt.models.families import FAMILIES, family_of, get_preset  # noqa: E402
from megatron_apt.utils.throughput import datasheet_peak  # noqa: E402

PHASES = {
    "forward": "forward",
    "fwd-bwd": "forward_backward",
    "apt": "apt_update",
    "trainer-apt": "trainer_apt_update",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRESETS = sorted(name for family in FAMILIES.values() for name in family.presets)


class UsageError(ValueError):
    """A bad command-line value (exit code 2)."""


# ------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------


def parse_latent(text: str) -> tuple[int, int, int]:
    try:
        t, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--latent wants TxHxW in latent units (e.g. 1x64x64), got {text!r}"
        ) from None
    if min(t, h, w) < 1:
        raise argparse.ArgumentTypeError(f"--latent {text}: sizes must be positive")
    return t, h, w


def parse_override(text: str) -> tuple[str, object]:
    """``FIELD=VALUE`` of ``--override``: VALUE as JSON (a list becomes a tuple), else the
    string itself."""
    field, sep, value = text.partition("=")
    if not sep or not field.strip():
        raise argparse.ArgumentTypeError(
            f"--override wants FIELD=VALUE (e.g. num_layers=4), got {text!r}"
        )
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return field.strip(), tuple(parsed) if isinstance(parsed, list) else parsed


def check_latent(cfg, latent: tuple[int, int, int], preset: str) -> None:
    """``UsageError`` naming the value when a latent size is not divisible by its patch."""
    text = "x".join(str(v) for v in latent)
    bad = [
        f"{name}={size} is not divisible by the patch size {p}"
        for name, size, p in zip("THW", latent, cfg.patch_size)
        if size % p
    ]
    if bad:
        raise UsageError(
            f"--latent {text}: {'; '.join(bad)} (preset {preset!r} has patch_size "
            f"{cfg.patch_size} as (pt, ph, pw))"
        )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: python tools/benchmark.py --preset mid --latent 1x64x64 --threads 2",
    )
    ap.add_argument("--preset", default="mid", choices=PRESETS, help="model preset of any family")
    ap.add_argument(
        "--override",
        type=parse_override,
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change a field of the preset's config (VALUE as JSON; repeatable), e.g. "
        "--preset wan-debug --override num_heads=4 --override head_dim=64: a size between "
        "the presets (the family's get_preset(name, **overrides))",
    )
    ap.add_argument(
        "--latent",
        type=parse_latent,
        default=(1, 64, 64),
        help="latent TxHxW in latent units (default 1x64x64: 1024 tokens with 2x2 patches)",
    )
    ap.add_argument("--text-len", type=int, default=256, help="text tokens (default 256)")
    ap.add_argument("--batch", type=int, default=1, help="samples per call (default 1)")
    ap.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when present)"
    )
    ap.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="parameter/activation dtype (default bf16 on cuda, fp32 on cpu)",
    )
    ap.add_argument(
        "--layer-spec",
        default="local",
        help="local, te, te-fp8, te-flash, te-fp8-flash or auto (megatron_apt/models/specs.py)",
    )
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls, median (default 5)")
    ap.add_argument(
        "--skip-diffusers",
        action="store_true",
        help="do not time diffusers' twin (SD3Transformer2DModel / WanTransformer3DModel)",
    )
    ap.add_argument(
        "--phases",
        default="forward,fwd-bwd,apt",
        help="comma list of forward, fwd-bwd, apt, trainer-apt (default forward,fwd-bwd,apt)",
    )
    ap.add_argument(
        "--compile",
        nargs="?",
        const="on",
        default="off",
        choices=("off", "on", "both"),
        help="torch.compile every transformer block of every model (regional, the same way: "
        "ours per block, diffusers' per transformer_blocks (SD3) or blocks (Wan) entry); "
        "'both' times eager "
        "and compiled copies in the same run; the warm-up calls compile (default off; "
        "--compile alone = on)",
    )
    ap.add_argument(
        "--zero-stage", type=int, default=2, choices=(0, 1, 2), help="trainer-apt (default 2)"
    )
    ap.add_argument(
        "--accumulation",
        type=int,
        default=1,
        help="trainer-apt: micro-batches of --batch per optimizer step (default 1)",
    )
    ap.add_argument(
        "--deepspeed-config",
        type=Path,
        default=None,
        help="trainer-apt: a DeepSpeed JSON merged over both engines' configs, as "
        "pretrain_apt.py's --deepspeed-config-{g,d} (e.g. ZeRO bucket sizes)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="trainer-apt: cProfile both updates, print the top"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inputs and weights")
    ap.add_argument("--json-out", type=Path, default=None, help="write the results here")
    return ap


# ------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------


def resolve(args: argparse.Namespace):
    """Validate the arguments; ``UsageError`` naming the bad value."""
    try:
        cfg = get_preset(args.preset, **dict(args.override))
    except (ValueError, TypeError) as e:  # TypeError: a field the config does not have
        overrides = " ".join(f"{k}={v}" for k, v in args.override)
        raise UsageError(f"--preset {args.preset} --override {overrides}: {e}") from None
    check_latent(cfg, args.latent, args.preset)
    for name in ("batch", "text_len", "repeats", "accumulation"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise UsageError(f"--phases {args.phases!r}: use a comma list of {', '.join(PHASES)}")
    if args.deepspeed_config is not None:
        if "trainer-apt" not in phases:
            raise UsageError("--deepspeed-config applies to --phases trainer-apt only")
        try:
            json.loads(args.deepspeed_config.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--deepspeed-config {args.deepspeed_config}: {e}") from None
    try:  # a CUDA device with its index: torch.cuda.set_device refuses one without
        device = resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device {e}") from None
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    from megatron_apt.models.specs import get_spec

    try:
        spec = get_spec(args.layer_spec)
    except (ValueError, RuntimeError, ImportError) as e:
        raise UsageError(f"--layer-spec {args.layer_spec!r}: {e}") from None
    return cfg, [PHASES[p] for p in phases], device, dtype, spec


def _describe(args, cfg, spec, device, dtype, n_vis: int, flops: dict, ref: dict, command) -> dict:
    """The run's header: machine, versions, model, shapes, FLOP counts, references."""
    b, latent = args.batch, tuple(args.latent)
    return {
        "tool": "tools/benchmark.py",
        "command": command,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {
            "type": device.type,
            "name": device_description(device),
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "preset": args.preset,
        "family": family_of(cfg).name,
        "overrides": dict(args.override),
        "config": cfg.to_dict(),
        "layer_spec": spec.name,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": b,
        "latent": list(latent),
        "visual_tokens": n_vis,
        "text_tokens": args.text_len,
        "tokens": b * (n_vis + args.text_len),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "compile": args.compile,
        "flops": {**flops, "formula": FLOP_FORMULAS[family_of(cfg).name]},
        "reference": ref,
        "phases": {},
    }


def _variants(args) -> list[bool]:
    """Which copies to time: eager, compiled, or both."""
    return {"off": [False], "on": [True], "both": [False, True]}[args.compile]


def _name(who: str, compiled: bool, args) -> str:
    return f"{who} compiled" if compiled and args.compile == "both" else who


def _diffusers_twin(args, cfg, phases, result: dict):
    """diffusers' twin of our model (:func:`megatron_apt.benchmarking.twins.twin_for`) and its
    constructor's arguments, or ``(None, None)`` with the reason recorded."""
    latent = tuple(args.latent)
    reason, twin, kwargs = None, None, None
    if args.skip_diffusers:
        reason = "--skip-diffusers"
    elif not any(p in phases for p in ("forward", "forward_backward")):
        reason = "no forward/fwd-bwd phase asked for"
    else:
        try:
            import diffusers

            twin = twin_for(cfg)
            kwargs = twin.kwargs(cfg, latent)
            result["versions"]["diffusers"] = diffusers.__version__
        except ImportError:
            reason = "diffusers is not installed"
        except ValueError as e:
            reason = str(e)
    result["diffusers"] = {"skipped": reason}
    if reason is not None:
        return None, None
    result["diffusers"].update(class_name=twin.class_name, same_weights=twin.same_weights)
    result["diffusers"]["config"] = kwargs
    return twin, kwargs


def _compare(entry: dict, a: str, b: str) -> None:
    """Add the ratio ``a / b`` of two timed contenders of a phase entry."""
    if a in entry and b in entry:
        entry.setdefault("comparisons", {})[f"{a} / {b}"] = ratios(
            entry[a]["times_s"], entry[b]["times_s"]
        )


def _time_phase(args, fns: dict, flops: float, counts, ref, device) -> dict:
    faults: dict[str, list[int]] = {}
    times = time_interleaved(fns, args.warmup, args.repeats, device, faults)
    entry = {}
    for who, fn in fns.items():
        entry[who] = phase_stats(times[who], flops, *counts, ref)
        entry[who]["minor_page_faults"] = statistics.median(faults[who])
        entry[who]["memory"] = measure_peak_memory(fn, device)
    return entry


def _time_models(args, cfg, spec, phases, inputs, twin, diff_kwargs, result, counts, device,
                 dtype):  # fmt: skip
    """forward / fwd-bwd of ours and diffusers' twin (eager, compiled or both), repeats
    interleaved; a twin with our weights must agree with ours first."""
    from megatron_apt.models.builders import build_model

    calls, status = {}, {}
    for compiled in _variants(args):
        torch.manual_seed(args.seed)  # the same weights in the eager and the compiled copy
        model = build_model(cfg, spec=spec, params_dtype=dtype).to(device).train()
        prepare_ours(model, cfg)
        result["parameters"] = sum(p.numel() for p in model.parameters())
        ours_name = _name("ours", compiled, args)
        calls[ours_name] = ours_calls(model, inputs)
        status[ours_name] = model
        if twin is not None:
            theirs = twin.build(diff_kwargs, model, cfg, device, dtype, args.seed)
            result["diffusers"]["parameters"] = sum(p.numel() for p in theirs.parameters())
            theirs_name = _name("diffusers", compiled, args)
            calls[theirs_name] = twin.calls(theirs, inputs)
            if twin.same_weights and "agreement" not in result["diffusers"]:
                # once, before timing, eagerly (the copies are compiled after it)
                result["diffusers"]["agreement"] = {
                    "models": [ours_name, theirs_name],
                    **check_agreement(calls[ours_name]["forward"],
                                      calls[theirs_name]["forward"], dtype),
                }  # fmt: skip
            if compiled:
                twin.compile(theirs)
        if compiled:  # after the agreement check, which thus compiles nothing
            compile_blocks(model)
        gc.collect()
    for phase in phases:
        fns = {who: c[phase] for who, c in calls.items()}
        entry = _time_phase(args, fns, result["flops"][phase], counts, result["reference"], device)
        for suffix in ("", " compiled"):
            _compare(entry, "ours" + suffix, "diffusers" + suffix)
        for who in ("ours", "diffusers"):
            _compare(entry, who + " compiled", who)
        result["phases"][phase] = entry
    result["compile_status"] = {k: compile_status(m) for k, m in status.items()}


def _time_apt(args, cfg, spec, inputs, result, counts, device, dtype) -> None:
    fns = {}
    for compiled in _variants(args):
        torch.manual_seed(args.seed)
        fns[_name("ours", compiled, args)] = apt_update_call(
            cfg, spec, dtype, device, inputs, tuple(args.latent), compiled
        )
    flops = result["flops"]["apt_update"]
    entry = _time_phase(args, fns, flops, counts, result["reference"], device)
    _compare(entry, "ours compiled", "ours")
    result["phases"]["apt_update"] = entry


def _time_trainer(args, cfg, spec, result, counts, device, dtype) -> None:
    """The trainer's APT update against plain torch's (module docstring of
    megatron_apt/benchmarking/framework.py)."""
    from megatron_apt.benchmarking.framework import profile_calls, trainer_apt_calls, trainer_config

    fns = {}
    for compiled in _variants(args):
        tc = trainer_config(
            cfg,
            tuple(args.latent),
            args.text_len,
            args.batch,
            accumulation=args.accumulation,
            zero_stage=args.zero_stage,
            bf16=dtype == torch.bfloat16,
            compile=compiled,
            layer_spec=args.layer_spec,
            seed=args.seed,
            deepspeed_config=args.deepspeed_config,
        )
        try:
            calls = trainer_apt_calls(tc, device)
        except ValueError as e:
            raise UsageError(f"--phases trainer-apt: {e}") from None
        for who in ("trainer", "plain"):
            fns[_name(who, compiled, args)] = calls[who]
    flops = result["flops"]["apt_update"] * args.accumulation
    entry = _time_phase(args, fns, flops, counts, result["reference"], device)
    for suffix in ("", " compiled"):
        _compare(entry, "trainer" + suffix, "plain" + suffix)
    if args.profile:
        entry["profile"] = profile_calls(fns, args.repeats)
    result["phases"]["trainer_apt_update"] = entry
    result["trainer"] = {
        "zero_stage": args.zero_stage,
        "accumulation": args.accumulation,
        "deepspeed_config": None if args.deepspeed_config is None else str(args.deepspeed_config),
    }


def run_benchmark(args: argparse.Namespace, command: str = "") -> dict:
    cfg, phases, device, dtype, spec = resolve(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # indexed by resolve_device
    b, latent, n_text = args.batch, tuple(args.latent), args.text_len
    n_vis = visual_tokens(cfg, *latent)
    counts = (b * (n_vis + n_text), b * n_vis)  # tokens, visual tokens per call
    flops = benchmark_flops(cfg, n_vis, n_text, b)
    torch.manual_seed(args.seed)
    inputs = make_inputs(cfg, b, latent, n_text, dtype, device, args.seed)
    d = cfg.hidden_size
    ref = {
        "matmul": matmul_reference(counts[0], d, 4 * d, dtype, device, args.warmup, args.repeats),
        "peak": datasheet_peak(device, dtype, spec.fp8),
    }
    result = _describe(args, cfg, spec, device, dtype, n_vis, flops, ref, command)
    twin, diff_kwargs = _diffusers_twin(args, cfg, phases, result)
    model_phases = [p for p in phases if p in ("forward", "forward_backward")]
    if model_phases:
        _time_models(
            args, cfg, spec, model_phases, inputs, twin, diff_kwargs, result, counts, device,
            dtype,
        )  # fmt: skip
    gc.collect()
    if "apt_update" in phases:
        _time_apt(args, cfg, spec, inputs, result, counts, device, dtype)
        gc.collect()
    if "trainer_apt_update" in phases:
        acc = (args.accumulation * counts[0], args.accumulation * counts[1])
        _time_trainer(args, cfg, spec, result, acc, device, dtype)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    command = "python tools/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        result = run_benchmark(args, command=command.strip())
    except UsageError as e:
        ap.error(str(e))  # exit code 2
    except AgreementError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 1
    print(markdown(result))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
