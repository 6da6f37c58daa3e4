"""FLOP accounting and the report of ``tools/benchmark.py``: per-phase statistics (median
time, tokens/s, TFLOP/s, utilization against the run's matmul and the datasheet), the ratios
between contenders (ours / diffusers, compiled / eager, trainer / plain torch), and the
Markdown tables."""

from __future__ import annotations

import os
import platform
import statistics

import torch

from megatron_apt.models.families import family_of

__all__ = [
    "APT_FORWARD_EQUIVALENTS",
    "FLOP_FORMULA",
    "FLOP_FORMULAS",
    "benchmark_flops",
    "contenders",
    "device_description",
    "markdown",
    "phase_stats",
    "ratios",
]

# One APT update in forward-equivalents of one MMDiT forward at batch B:
#   D phase: G forward (no grad) 1 + D forward+backward on [real; fake; real + sigma*eps]
#            (3B samples) 3 x 3 = 9
#   G phase: G forward+backward 3 + D forward 1 + D backward to its input only (no weight
#            gradients, frozen) 1 = 5
# The discriminator's heads and its skipped output layer are left out (< 1% at these sizes).
APT_FORWARD_EQUIVALENTS = 15


FLOP_FORMULA = (
    "forward_flops (megatron_apt/models/mmdit/config.py): 2 FLOPs per multiply-add of every "
    "linear layer a token passes through (per block and stream: qkv 3d^2, out d^2, "
    "MLP 2*d*f; patch/text embeddings and the output projection) plus attention "
    "QK^T and AV (4*S^2*d per block, S = visual + text tokens), times the batch; "
    "fwd+bwd = 3x forward; APT update = 15x forward (an estimate, see "
    "APT_FORWARD_EQUIVALENTS)"
)


WAN_FLOP_FORMULA = (
    "forward_flops (megatron_apt/models/wan/config.py): 2 FLOPs per multiply-add of every "
    "linear layer (per block: self-attention q, k, v, out 4d^2 and cross-attention q, out "
    "2d^2 per visual token, cross-attention k, v 2d^2 per text token, FFN 2*d*f per visual "
    "token; patch, text and output projections) plus attention QK^T and AV (4*N^2*d "
    "self, 4*N*L*d cross per block, N visual and L text tokens), times the batch; fwd+bwd = "
    "3x forward; APT update = 15x forward (an estimate, see APT_FORWARD_EQUIVALENTS)"
)
FLOP_FORMULAS = {"mmdit": FLOP_FORMULA, "wan": WAN_FLOP_FORMULA}  # per model family


def benchmark_flops(cfg, n_visual: int, n_text: int, batch: int) -> dict[str, float]:
    """Analytic FLOPs of each benchmark phase (the forward from ``cfg``'s family:
    ``ModelFamily.forward_flops``)."""
    fwd = family_of(cfg).forward_flops(cfg, n_visual, n_text, batch)
    return {
        "forward": fwd,
        "forward_backward": 3 * fwd,
        "apt_update": APT_FORWARD_EQUIVALENTS * fwd,
    }


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


def ratios(a: list[float], b: list[float]) -> dict:
    """The time of ``a`` over ``b``: of the medians (the headline, ``ratio``), of the minima
    (best of the repeats) and the median of the per-repeat ratios (each repeat runs both back
    to back, so this one is the least sensitive to other processes sharing the machine)."""
    return {
        "ratio": statistics.median(a) / statistics.median(b),
        "ratio_min": min(a) / min(b),
        "ratio_paired_median": statistics.median(x / y for x, y in zip(a, b)),
    }


NOT_CONTENDERS = ("comparisons", "profile")


def contenders(entry: dict) -> list[str]:
    """The timed contenders of a phase entry (``ours``, ``diffusers compiled``, ...)."""
    return [k for k in entry if k not in NOT_CONTENDERS]


def _fmt(v, spec: str = ".3g", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def markdown(result: dict) -> str:
    dev = result["device"]
    mm, peak = result["reference"]["matmul"], result["reference"]["peak"]
    compiled = {"off": "eager", "on": "compiled blocks", "both": "eager and compiled blocks"}
    family = {"mmdit": "MMDiT", "wan": "Wan"}.get(result.get("family", "mmdit"), "Model")
    twin = result["diffusers"]
    if twin["skipped"]:
        twin_text = twin["skipped"]
    elif twin.get("agreement"):
        a = twin["agreement"]
        twin_text = (
            f"{twin['class_name']}, same config, our weights (outputs agree: relative error "
            f"{a['rel_err']:.2g} <= {a['tolerance']:g})"
        )
    else:
        twin_text = f"{twin.get('class_name', 'SD3Transformer2DModel')}, same size"
    lines = [
        f"## {family} benchmark: preset {result['preset']}, latent "
        f"{'x'.join(map(str, result['latent']))}, batch {result['batch']}",
        "",
        f"- device: {dev['name']} ({dev['type']}, {dev['torch_threads']} torch threads), "
        f"{result['dtype']}, layer spec {result['layer_spec']}, {result['date_utc']}, "
        f"{compiled[result.get('compile', 'off')]}",
        f"- tokens per sample: {result['visual_tokens']} visual + {result['text_tokens']} text; "
        f"forward {result['flops']['forward'] / 1e9:.4g} GFLOP (analytic)",
        f"- dense matmul {mm['shape'][0]}x{mm['shape'][1]} @ {mm['shape'][1]}x{mm['shape'][2]} "
        f"({mm['dtype']}): {mm['tflops']:.3g} TFLOP/s",
        "- datasheet peak: "
        + (f"{peak['device']} {peak['precision']} {peak['tflops']:g} TFLOP/s" if peak else "n/a"),
        f"- warm-up {result['warmup']}, median of {result['repeats']}; diffusers: {twin_text}",
    ]
    if "trainer" in result:
        t = result["trainer"]
        lines.append(
            f"- trainer-apt: ZeRO-{t['zero_stage']}, {t['accumulation']} micro-batch(es) of "
            f"{result['batch']} per update, one process"
        )
    lines += [
        "",
        "| phase | model | median ms | tokens/s | TFLOP/s | util vs matmul | util vs peak "
        "| peak mem MiB | page faults |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    comparisons = []
    for phase, entry in result["phases"].items():
        for who in contenders(entry):
            s = entry[who]
            mem = s["memory"]
            mem_text = _fmt(mem["peak_mib"], ".0f")
            if mem["peak_above_start_mib"] is not None and dev["type"] == "cuda":
                mem_text += f" ({mem['peak_above_start_mib'] + 0.0:+.0f})"
            lines.append(
                f"| {phase} | {who} | {s['median_s'] * 1e3:.1f} | {s['tokens_per_s']:.4g} "
                f"| {s['tflops']:.3g} | {_fmt(s['utilization_vs_matmul'], '.1%')} "
                f"| {_fmt(s['utilization_vs_peak'], '.1%')} | {mem_text} "
                f"| {_fmt(s.get('minor_page_faults'), '.0f')} |"
            )
        comparisons += [(phase, k, v) for k, v in entry.get("comparisons", {}).items()]
    if comparisons:
        lines += [
            "",
            "| phase | ratio of times | of medians | of minima | paired median |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {phase} | {name} | {r['ratio']:.3f} | {r['ratio_min']:.3f} "
            f"| {r['ratio_paired_median']:.3f} |"
            for phase, name, r in comparisons
        ]
    mem = next(iter(result["phases"].values()), {}).get("ours", {}).get("memory")
    if mem:
        lines += [
            "",
            f"Peak memory: {mem['method']}"
            + (
                "; in parentheses the rise during the call."
                if dev["type"] == "cuda"
                else " (every model's weights and the allocator's cached pages included)."
            )
            + " Page faults: the process's minor page faults per call (median; pages mapped "
            "in afresh, e.g. for buffers allocated anew each call).",
        ]
    for phase, entry in result["phases"].items():
        for who, prof in entry.get("profile", {}).items():
            lines += [
                "",
                f"Profile of {phase} / {who} (cProfile, per update; {prof['total_s'] * 1e3:.1f} "
                "ms with the profiler's own cost):",
                "",
                "| function | calls | own ms | cumulative ms |",
                "|---|---:|---:|---:|",
            ]
            lines += [
                f"| `{r['function']}` | {r['calls_per_update']:.3g} | {r['own_s'] * 1e3:.2f} "
                f"| {r['cumulative_s'] * 1e3:.2f} |"
                for r in prof["top"]
            ]
    return "\n".join(lines)
