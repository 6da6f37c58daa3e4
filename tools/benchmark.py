#!/usr/bin/env python
"""Time the MMDiT (forward, forward+backward, one APT update) against diffusers' SD3 transformer.

For a preset and a latent shape: warm-up calls, then ``--repeats`` timed calls (median kept) of

* ``forward``: one MMDiT forward under ``torch.no_grad``;
* ``fwd-bwd``: forward + ``backward`` of a scalar loss (the parameter gradients);
* ``apt``: one full APT update in plain torch: ``discriminator_step`` + backward + RMSprop step
  of D, then ``generator_step`` + backward + RMSprop step of G with D frozen.

Reported per phase: median time, tokens/s, achieved TFLOP/s from the analytic FLOP count
(``megatron_apt.config.flops.forward_flops``: linear layers + attention; fwd+bwd = 3x forward;
APT update ~ 15x forward, see ``apt_flops``), utilization against a dense matmul of matching size
measured in the same run and, on a GPU with a known datasheet, against its peak; peak memory.
diffusers' ``SD3Transformer2DModel`` of the same width, depth, heads and token count is timed in
the same run (repeats interleaved with ours) and ``ours / diffusers`` printed: <= 1.0 means we
are at least as fast.

    python tools/benchmark.py --preset mid --latent 1x64x64 --batch 1 --threads 2
    python tools/benchmark.py --preset tiny --latent 1x8x8 --warmup 1 --repeats 2 --json-out b.json
    python tools/benchmark.py --preset mmdit-8b --latent 13x90x160 --text-len 256 --device cuda \\
        --dtype bf16 --layer-spec te --phases forward --skip-diffusers --json-out h100.json

Exit code 2 for a bad argument (unknown preset, a latent not divisible by the patch, a layer
spec this machine cannot build).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_apt.config.flops import forward_flops, visual_tokens  # noqa: E402
from megatron_apt.config.model import PRESETS, MMDiTConfig, get_preset  # noqa: E402

PHASES = {"forward": "forward", "fwd-bwd": "forward_backward", "apt": "apt_update"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# NVIDIA datasheet peaks, dense (without sparsity), TFLOP/s: "NVIDIA H100 Tensor Core GPU"
# datasheet (H100 SXM5 / PCIe / NVL columns) and "NVIDIA H200 Tensor Core GPU" datasheet
# (H200 SXM). float32 is the non-tensor-core FP32 figure (torch does not use TF32 by default);
# fp8 applies to the Transformer Engine FP8 spec.
DATASHEET_PEAK_TFLOPS = {
    "H100 SXM": {"float32": 67.0, "bfloat16": 989.0, "float16": 989.0, "fp8": 1979.0},
    "H100 PCIe": {"float32": 51.0, "bfloat16": 756.0, "float16": 756.0, "fp8": 1513.0},
    "H100 NVL": {"float32": 60.0, "bfloat16": 835.0, "float16": 835.0, "fp8": 1671.0},
    "H200 SXM": {"float32": 67.0, "bfloat16": 989.0, "float16": 989.0, "fp8": 1979.0},
}
DATASHEET_SOURCE = (
    "DATASHEET_PEAK_TFLOPS in tools/benchmark.py (NVIDIA H100 / H200 Tensor Core GPU "
    "datasheets, dense, no sparsity)"
)

# One APT update in forward-equivalents of one MMDiT forward at batch B:
#   D phase: G forward (no grad) 1 + D forward+backward on [real; fake; real + sigma*eps]
#            (3B samples) 3 x 3 = 9
#   G phase: G forward+backward 3 + D forward 1 + D backward to its input only (no weight
#            gradients, frozen) 1 = 5
# The discriminator's heads and its skipped output layer are left out (< 1% at these sizes).
APT_FORWARD_EQUIVALENTS = 15


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


def check_latent(cfg: MMDiTConfig, latent: tuple[int, int, int], preset: str) -> None:
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
    ap.add_argument("--preset", default="mid", choices=sorted(PRESETS), help="model preset")
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
        "--phases",
        default="forward,fwd-bwd,apt",
        help="comma list of forward, fwd-bwd, apt (default all)",
    )
    ap.add_argument(
        "--skip-diffusers", action="store_true", help="do not time diffusers' SD3 transformer"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inputs and weights")
    ap.add_argument("--json-out", type=Path, default=None, help="write the results here")
    return ap


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function. Warm-up calls first; then each repeat calls every
    function once, alternating the order, so that a drift in machine load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for key in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[key]()
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    return times


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def measure_peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak memory of one (untimed) call of ``fn``.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset before the call). CPU: the process's peak
    resident set size (Linux VmHWM, reset before the call through /proc/self/clear_refs), which
    counts the weights, every live tensor and the allocator's cached pages; where the reset is
    not allowed, ``ru_maxrss`` (the peak since the process started).
    """
    gc.collect()
    mib = 2**20
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "method": "torch.cuda.max_memory_allocated",
            "peak_mib": peak / mib,
            "peak_above_start_mib": (peak - start) / mib,
        }
    if _reset_peak_rss():
        start = _proc_status_kib("VmRSS") or 0
        fn()
        peak = _proc_status_kib("VmHWM") or 0
        return {
            "method": "peak RSS of the process (VmHWM reset before the call)",
            "peak_mib": peak / 1024,
            "peak_above_start_mib": (peak - start) / 1024,
        }
    fn()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": "peak RSS of the process since start (ru_maxrss; VmHWM reset unavailable)",
        "peak_mib": peak_kib / 1024,
        "peak_above_start_mib": None,
    }


def matmul_reference(
    m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, warmup: int, repeats: int
) -> dict:
    """A dense ``[m x k] @ [k x n]`` in the benchmark's dtype, device and threads: what this
    machine's GEMM reaches on an MLP-like product of the run's size."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device, dtype)
    b = torch.randn(k, n, generator=g).to(device, dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    times = time_interleaved(
        {"mm": lambda: torch.mm(a, b, out=out)}, max(warmup, 1), max(repeats, 3), device
    )["mm"]
    median = statistics.median(times)
    return {
        "shape": [m, k, n],
        "dtype": str(dtype).removeprefix("torch."),
        "flops": 2.0 * m * k * n,
        "times_s": times,
        "median_s": median,
        "tflops": 2.0 * m * k * n / median / 1e12,
    }


def datasheet_peak(device: torch.device, dtype: torch.dtype, fp8: bool) -> dict | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        key = "H200 SXM"
    elif "H100" in name:
        key = "H100 PCIe" if "PCIe" in name else "H100 NVL" if "NVL" in name else "H100 SXM"
    else:
        return None
    column = "fp8" if fp8 else str(dtype).removeprefix("torch.")
    tflops = DATASHEET_PEAK_TFLOPS[key].get(column)
    if tflops is None:
        return None
    return {"device": key, "precision": column, "tflops": tflops, "source": DATASHEET_SOURCE}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs visible)"


# ------------------------------------------------------------------------------------------
# The work being timed
# ------------------------------------------------------------------------------------------


def make_inputs(
    cfg: MMDiTConfig, batch: int, latent, text_len: int, dtype, device, seed: int
) -> dict:
    g = torch.Generator().manual_seed(seed)
    t, h, w = latent
    pooled_dim = cfg.pooled_text_dim or cfg.text_dim
    x = {
        "latents": torch.randn(batch, cfg.in_channels, t, h, w, generator=g),
        "timesteps": torch.rand(batch, generator=g),
        "text": torch.randn(batch, text_len, cfg.text_dim, generator=g),
        "pooled": torch.randn(batch, pooled_dim, generator=g),
    }
    out = {k: v.to(device, torch.float32 if k == "timesteps" else dtype) for k, v in x.items()}
    out["pooled_text"] = out["pooled"] if cfg.pooled_text_dim else None
    return out


def _backward_loss(out: torch.Tensor) -> None:
    out.float().square().mean().backward()


def ours_calls(model, inputs) -> dict[str, Callable[[], object]]:
    args = (inputs["latents"], inputs["timesteps"], inputs["text"], None, inputs["pooled_text"])

    def forward():
        with torch.no_grad():
            return model(*args)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        _backward_loss(model(*args))

    return {"forward": forward, "forward_backward": fwd_bwd}


def diffusers_calls(model, inputs) -> dict[str, Callable[[], object]]:
    kw = dict(
        hidden_states=inputs["latents"][:, :, 0],  # images: [B, C, H, W]
        encoder_hidden_states=inputs["text"],
        pooled_projections=inputs["pooled"],
        timestep=inputs["timesteps"] * 1000.0,
        return_dict=False,
    )

    def forward():
        with torch.no_grad():
            return model(**kw)[0]

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        _backward_loss(model(**kw)[0])

    return {"forward": forward, "forward_backward": fwd_bwd}


def apt_update_call(cfg, spec, dtype, device, inputs, latent) -> Callable[[], object]:
    """One APT update (D phase then G phase) of freshly built G and D, plain torch + RMSprop."""
    from megatron_apt.models.builders import build_discriminator, build_generator
    from megatron_apt.stages.apt import APTConfig, discriminator_step, frozen, generator_step

    gen = build_generator(cfg, spec=spec, params_dtype=dtype).to(device)
    disc = build_discriminator(cfg, spec=spec, params_dtype=dtype).to(device)
    gen.train()
    disc.train()

    def rmsprop(module):
        params = [p for p in module.parameters() if p.requires_grad]
        return torch.optim.RMSprop(params, lr=1e-6, alpha=0.9, eps=1e-8)

    opt_g, opt_d = rmsprop(gen), rmsprop(disc)
    apt_cfg = APTConfig.image() if latent[0] == 1 else APTConfig.video()
    batch = {
        "latents": inputs["latents"],
        "text": inputs["text"],
        "text_mask": None,
        "pooled_text": inputs["pooled_text"],
    }
    rng = torch.Generator().manual_seed(1)

    def update():
        opt_d.zero_grad(set_to_none=True)
        loss_d, _ = discriminator_step(disc, gen, batch, apt_cfg, rng)
        loss_d.backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        with frozen(disc):
            loss_g, _ = generator_step(disc, gen, batch, apt_cfg, rng)
            loss_g.backward()
        opt_g.step()

    return update


def phase_stats(times: list[float], flops: float, tokens: int, visual: int, ref: dict) -> dict:
    median = statistics.median(times)
    tflops = flops / median / 1e12
    out = {
        "times_s": times,
        "median_s": median,
        "min_s": min(times),
        "tokens_per_s": tokens / median,
        "visual_tokens_per_s": visual / median,
        "flops": flops,
        "tflops": tflops,
        "utilization_vs_matmul": tflops / ref["matmul"]["tflops"],
        "utilization_vs_peak": (
            tflops / ref["peak"]["tflops"] if ref.get("peak") is not None else None
        ),
    }
    return out


def ratios(ours: list[float], theirs: list[float]) -> dict:
    """Our time over diffusers': of the medians (the headline), of the minima (best of the
    repeats), and the median of the per-repeat ratios (each repeat runs both back to back, so
    this one is the least sensitive to other processes sharing the machine)."""
    return {
        "ratio_ours_over_diffusers": statistics.median(ours) / statistics.median(theirs),
        "ratio_min": min(ours) / min(theirs),
        "ratio_paired_median": statistics.median(a / b for a, b in zip(ours, theirs)),
    }


# ------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------


def resolve(args: argparse.Namespace):
    """Validate the arguments; ``UsageError`` naming the bad value."""
    try:
        cfg = get_preset(args.preset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_latent(cfg, args.latent, args.preset)
    for name in ("batch", "text_len", "repeats"):
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
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device!r}: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device!r}: use cpu or cuda")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    from megatron_apt.models.specs import get_spec

    try:
        spec = get_spec(args.layer_spec)
    except (ValueError, RuntimeError, ImportError) as e:
        raise UsageError(f"--layer-spec {args.layer_spec!r}: {e}") from None
    return cfg, [PHASES[p] for p in phases], device, dtype, spec


def run_benchmark(args: argparse.Namespace, command: str = "") -> dict:
    cfg, phases, device, dtype, spec = resolve(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from megatron_apt.models.builders import build_mmdit

    b, latent, n_text = args.batch, tuple(args.latent), args.text_len
    n_vis = visual_tokens(cfg, *latent)
    tokens, visual = b * (n_vis + n_text), b * n_vis
    fwd = forward_flops(cfg, n_vis, n_text, b)
    flops = {
        "forward": fwd,
        "forward_backward": 3 * fwd,
        "apt_update": APT_FORWARD_EQUIVALENTS * fwd,
    }
    torch.manual_seed(args.seed)
    inputs = make_inputs(cfg, b, latent, n_text, dtype, device, args.seed)
    d = cfg.hidden_size
    ref = {
        "matmul": matmul_reference(tokens, d, 4 * d, dtype, device, args.warmup, args.repeats),
        "peak": datasheet_peak(device, dtype, spec.fp8),
    }
    result: dict = {
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
        "config": cfg.to_dict(),
        "layer_spec": spec.name,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": b,
        "latent": list(latent),
        "visual_tokens": n_vis,
        "text_tokens": n_text,
        "tokens": tokens,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "flops": {
            **flops,
            "formula": (
                "forward_flops (megatron_apt/config/flops.py): 2 FLOPs per multiply-add of every "
                "linear layer a token passes through (per block and stream: qkv 3d^2, out d^2, "
                "MLP 2*d*f; patch/text embeddings and the output projection) plus attention "
                "QK^T and AV (4*S^2*d per block, S = visual + text tokens), times the batch; "
                "fwd+bwd = 3x forward; APT update = 15x forward (an estimate, see "
                "APT_FORWARD_EQUIVALENTS)"
            ),
        },
        "reference": ref,
        "phases": {},
    }
    diff_model, diff_reason = None, None
    needs_diffusers = any(p in phases for p in ("forward", "forward_backward"))
    if args.skip_diffusers:
        diff_reason = "--skip-diffusers"
    elif not needs_diffusers:
        diff_reason = "no forward/fwd-bwd phase asked for"
    elif latent[0] != 1:
        diff_reason = f"diffusers' SD3 transformer is images-only; --latent has T={latent[0]}"
    else:
        try:
            import diffusers

            from megatron_apt.testing.diffusers_ref import sd3_kwargs_like, sd3_transformer

            kwargs = sd3_kwargs_like(cfg, latent[1], latent[2])
            result["versions"]["diffusers"] = diffusers.__version__
        except ImportError:
            diff_reason = "diffusers is not installed"
        except ValueError as e:
            diff_reason = str(e)
    result["diffusers"] = {"skipped": diff_reason}
    if diff_reason is None:
        torch.manual_seed(args.seed)
        diff_model = sd3_transformer(**kwargs).to(device, dtype).train()
        result["diffusers"].update(
            config=kwargs,
            parameters=sum(p.numel() for p in diff_model.parameters()),
        )

    model_phases = [p for p in phases if p in ("forward", "forward_backward")]
    if model_phases:
        torch.manual_seed(args.seed)
        model = build_mmdit(cfg, spec=spec, params_dtype=dtype).to(device).train()
        result["parameters"] = sum(p.numel() for p in model.parameters())
        ours = ours_calls(model, inputs)
        theirs = diffusers_calls(diff_model, inputs) if diff_model is not None else {}
        for phase in model_phases:
            fns = {"ours": ours[phase]}
            if phase in theirs:
                fns["diffusers"] = theirs[phase]
            times = time_interleaved(fns, args.warmup, args.repeats, device)
            entry = {}
            for who, fn in fns.items():
                entry[who] = phase_stats(times[who], flops[phase], tokens, visual, ref)
                entry[who]["memory"] = measure_peak_memory(fn, device)
            if "diffusers" in entry:
                entry.update(ratios(times["ours"], times["diffusers"]))
            result["phases"][phase] = entry
        del model, ours, theirs
    del diff_model
    gc.collect()
    if "apt_update" in phases:
        torch.manual_seed(args.seed)
        update = apt_update_call(cfg, spec, dtype, device, inputs, latent)
        times = time_interleaved({"ours": update}, args.warmup, args.repeats, device)
        entry = {"ours": phase_stats(times["ours"], flops["apt_update"], tokens, visual, ref)}
        entry["ours"]["memory"] = measure_peak_memory(update, device)
        result["phases"]["apt_update"] = entry
    return result


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------


def _fmt(v, spec: str = ".3g", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def markdown(result: dict) -> str:
    dev = result["device"]
    mm, peak = result["reference"]["matmul"], result["reference"]["peak"]
    lines = [
        f"## MMDiT benchmark: preset {result['preset']}, latent "
        f"{'x'.join(map(str, result['latent']))}, batch {result['batch']}",
        "",
        f"- device: {dev['name']} ({dev['type']}, {dev['torch_threads']} torch threads), "
        f"{result['dtype']}, layer spec {result['layer_spec']}, {result['date_utc']}",
        f"- tokens per sample: {result['visual_tokens']} visual + {result['text_tokens']} text; "
        f"forward {result['flops']['forward'] / 1e9:.4g} GFLOP (analytic)",
        f"- dense matmul {mm['shape'][0]}x{mm['shape'][1]} @ {mm['shape'][1]}x{mm['shape'][2]} "
        f"({mm['dtype']}): {mm['tflops']:.3g} TFLOP/s",
        "- datasheet peak: "
        + (f"{peak['device']} {peak['precision']} {peak['tflops']:g} TFLOP/s" if peak else "n/a"),
        f"- warm-up {result['warmup']}, median of {result['repeats']}; diffusers: "
        + (result["diffusers"]["skipped"] or "SD3Transformer2DModel, same size"),
        "",
        "| phase | model | median ms | tokens/s | TFLOP/s | util vs matmul | util vs peak "
        "| peak mem MiB | ours / diffusers | (min; paired) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for phase, entry in result["phases"].items():
        for who in ("ours", "diffusers"):
            if who not in entry:
                continue
            s = entry[who]
            ratio = entry.get("ratio_ours_over_diffusers") if who == "ours" else None
            more = "-"
            if ratio is not None:
                more = f"{entry['ratio_min']:.3f}; {entry['ratio_paired_median']:.3f}"
            mem = s["memory"]
            mem_text = _fmt(mem["peak_mib"], ".0f")
            if mem["peak_above_start_mib"] is not None and dev["type"] == "cuda":
                mem_text += f" ({mem['peak_above_start_mib'] + 0.0:+.0f})"
            lines.append(
                f"| {phase} | {who} | {s['median_s'] * 1e3:.1f} | {s['tokens_per_s']:.4g} "
                f"| {s['tflops']:.3g} | {_fmt(s['utilization_vs_matmul'], '.1%')} "
                f"| {_fmt(s['utilization_vs_peak'], '.1%')} "
                f"| {mem_text} | {_fmt(ratio, '.3f')} | {more} |"
            )
    mem = next(iter(result["phases"].values()), {}).get("ours", {}).get("memory")
    if mem:
        lines += [
            "",
            f"Peak memory: {mem['method']}"
            + (
                "; in parentheses the rise during the call."
                if dev["type"] == "cuda"
                else " (both models' weights and the allocator's cached pages included)."
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    command = "python tools/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        result = run_benchmark(args, command=command.strip())
    except UsageError as e:
        ap.error(str(e))  # exit code 2
    print(markdown(result))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
