#!/usr/bin/env python
r"""Prompts -> images (PNG) or videos (MP4, optional GIF) with the one-step APT generator, the
zero-shot two-step sampler, or the diffusion model (N Euler steps + CFG) for comparison.
Prints the time of each component (text encoder, DiT, VAE) like Table 8 of the paper and
writes summary.json next to the outputs.

    python tools/generate.py --checkpoint generator.safetensors --text-encoder t5/ --vae vae/ \
        --prompt "a red circle moving left" --frames 9 --height 64 --width 64 --output out/
    python tools/generate.py ... --steps 2 --t-mid 0.5            # zero-shot two-step
    python tools/generate.py ... --mode diffusion --checkpoint diffusion.safetensors \
        --steps 25 --guidance-scale 7.5 --negative-prompt "blurry" --shift 3
    # an imported SD3.5: its text encoders, VAE and scheduler, 28 steps as diffusers samples
    python tools/generate.py --checkpoint sd35.safetensors --text-encoder /models/sd3.5-large \
        --vae /models/sd3.5-large --scheduler /models/sd3.5-large --mode diffusion --steps 28 \
        --guidance-scale 3.5 --negative-prompt "" --height 1024 --width 1024 --output out/
    # Wan2.1: its umT5, VAE and UniPC scheduler; the pretrained model sees unmasked text
    python tools/generate.py --checkpoint /models/Wan2.1-T2V-1.3B-Diffusers \
        --text-encoder /models/Wan2.1-T2V-1.3B-Diffusers --vae /models/Wan2.1-T2V-1.3B-Diffusers \
        --scheduler /models/Wan2.1-T2V-1.3B-Diffusers --mode diffusion --steps 50 \
        --guidance-scale 5 --negative-prompt "" --frames 81 --height 480 --width 832 --output out/
    torchrun --nproc-per-node 4 tools/generate.py ... --device cuda --dtype bf16 --layer-spec te

Sizes are in pixels (checked against the VAE's compression) or given as latents with
--latent-shape T'xH'xW'. Sample i always gets the noise of (--seed, i), whatever --batch-size
or the number of ranks. Under torchrun the DiT runs tensor-parallel over all ranks; rank 0
encodes the text, decodes and writes. Library: megatron_apt.inference.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_apt.inference import (  # noqa: E402
    COMPONENTS,
    GenerationPipeline,
    SamplingConfig,
    check_writable_size,
    format_timing_table,
    write_sample,
    write_summary,
)
from megatron_apt.models.compile import compile_status  # noqa: E402
from megatron_apt.text import DEFAULT_NEGATIVE_PROMPT  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_STEPS = {"generator": 1, "diffusion": 25}
LATENTS_FILE = "latents.safetensors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    a = p.add_argument
    a("--prompt", action="append", default=[], help="a prompt (repeatable)")
    a("--prompts-file", help="text file, one prompt per line (blank lines skipped)")
    a(
        "--checkpoint",
        required=True,
        help="the generator (or, --mode diffusion, the diffusion model): model file, TP-sharded\n"
        "dir, diffusers SD3 or Wan dir (a pipeline root or its transformer/) or training\n"
        "checkpoint (megatron_apt.checkpoint.load_mmdit)",
    )
    a("--checkpoint-role", choices=("generator", "model"), help="training checkpoints only")
    a("--ema", action="store_true", help="training checkpoints only: the EMA weights")
    a(
        "--text-encoder",
        required=True,
        help="local T5 directory, an SD3/SD3.5 pipeline directory (CLIP-L + CLIP-G + T5) or a "
        "Wan pipeline directory (umT5)",
    )
    a(
        "--max-text-length",
        type=int,
        default=None,
        help="L: T5 / umT5 tokens (fixed padding); default: the family's, 512 for a Wan "
        "pipeline directory, 256 otherwise",
    )
    a("--vae", default="identity", help="identity, identity:<p> or a local diffusers VAE dir")
    a("--output", required=True, help="folder for the samples and summary.json")
    m = p.add_argument_group("sampling")
    m.add_argument("--mode", choices=("generator", "diffusion"), default="generator")
    m.add_argument("--steps", type=int, help="generator: 1 (default) or 2; diffusion: 25")
    m.add_argument("--t-mid", type=float, default=0.5, help="two-step: intermediate time")
    m.add_argument("--renoise", action="store_true", help="two-step: fresh noise at t_mid")
    m.add_argument("--guidance-scale", type=float, help="diffusion: CFG scale (7.5)")
    m.add_argument("--negative-prompt", help="diffusion: CFG negative prompt (a fixed default)")
    m.add_argument("--shift", type=float, help="diffusion: timestep shift of the schedule (1)")
    m.add_argument(
        "--scheduler",
        help="diffusion: sample with this diffusers scheduler (a pipeline dir, e.g. an SD3.5 or\n"
        "Wan one, its scheduler/ or scheduler_config.json; takes its shift):\n"
        "FlowMatchEulerDiscreteScheduler (its sigmas, our Euler steps) or Wan's\n"
        "UniPCMultistepScheduler (diffusers' own object): the steps of diffusers' pipeline",
    )
    m.add_argument("--seed", type=int, default=0, help="noise of sample i is f(seed, i)")
    m.add_argument("--batch-size", type=int, default=1, help="prompts per DiT call")
    s = p.add_argument_group("size (pixels) and output")
    s.add_argument("--frames", type=int, default=1, help="pixel frames (1 = image)")
    s.add_argument("--height", type=int, help="pixels")
    s.add_argument("--width", type=int, help="pixels")
    s.add_argument("--latent-shape", help="T'xH'xW' latents instead of a pixel size")
    s.add_argument("--fps", type=float, default=24.0, help="frame rate of the videos")
    s.add_argument("--gif", action="store_true", help="also write an animated GIF per video")
    s.add_argument(
        "--video-format",
        choices=("mp4", "gif"),
        default="mp4",
        help="main file of a video: mp4 (H.264, lossy) or gif (near-lossless; for scoring)",
    )
    s.add_argument("--save-latents", action="store_true", help=f"also write {LATENTS_FILE}")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    r.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    r.add_argument("--layer-spec", help="local | te | te-flash | auto (default: auto on cuda)")
    r.add_argument("--tensor-parallel-size", type=int, help="default: all ranks of torchrun")
    r.add_argument("--sequence-parallel", action="store_true", help="with TP > 1")
    r.add_argument(
        "--context-parallel-size",
        type=int,
        default=1,
        help="split the tokens over this many ranks (Ulysses all-to-all around attention; "
        "long videos); TP = ranks / CP unless given",
    )
    r.add_argument(
        "--warmup", type=int, default=0, help="untimed batches first (first-call overheads)"
    )
    r.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each MMDiT block (the first batch compiles: use --warmup 1 to "
        "keep it out of the timing); falls back to eager with a message",
    )
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Argument combinations that argparse cannot check (exit code 2 with the reason)."""
    if args.mode == "generator":
        for flag in ("guidance_scale", "negative_prompt", "shift", "scheduler"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} applies to --mode diffusion only")
    if args.scheduler is not None and args.shift is not None:
        p.error("--scheduler brings its own shift: give --scheduler or --shift, not both")
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.mode]
    if args.latent_shape is not None and (args.height or args.width or args.frames != 1):
        p.error("give either --latent-shape or --frames/--height/--width, not both")
    if args.latent_shape is None and (args.height is None or args.width is None):
        p.error("give --height and --width in pixels (and --frames for videos), or --latent-shape")
    text_length_bad = args.max_text_length is not None and args.max_text_length < 1
    if args.batch_size < 1 or args.warmup < 0 or text_length_bad:
        p.error("--batch-size and --max-text-length must be >= 1, --warmup >= 0")
    for flag in ("guidance_scale", "shift"):  # a NaN scale made a NaN image and exit 0
        v = getattr(args, flag, None)
        if v is not None and not math.isfinite(v):
            p.error(f"--{flag.replace('_', '-')} must be a finite number, got {v}")
    if not (math.isfinite(args.fps) and args.fps > 0):
        p.error(f"--fps must be a positive number, got {args.fps}")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts-file {args.prompts_file} is not UTF-8 text ({e})") from e
        except OSError as e:
            raise ValueError(f"--prompts-file {args.prompts_file}: {e.strerror or e}") from e
    if not prompts:
        raise ValueError("no prompts: give --prompt (repeatable) or --prompts-file")
    return prompts


def parse_latent_shape(text: str) -> tuple[int, int, int]:
    try:
        t, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--latent-shape must be T'xH'xW' (e.g. 3x8x8), got {text!r}") from None
    if min(t, h, w) < 1:
        raise ValueError(f"--latent-shape sizes must be >= 1, got {text!r}")
    return t, h, w


def setup_runtime(args: argparse.Namespace):
    """``(ps, device, dtype, spec)``: one model-parallel group (TP x CP) over all ranks under a
    launcher, else one process."""
    from megatron_apt.parallel import initialize_parallel, single_process_state

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp = args.context_parallel_size
    if cp < 1 or world % cp:
        raise ValueError(
            f"--context-parallel-size {cp} must be >= 1 and divide the number of ranks ({world})"
        )
    tp = args.tensor_parallel_size or world // cp
    if tp * cp != world:
        raise ValueError(
            f"--tensor-parallel-size {tp} x --context-parallel-size {cp} must equal the number "
            f"of ranks ({world}): generation runs one model-parallel group"
        )
    if world > 1:
        ps = initialize_parallel(
            tensor_parallel_size=tp,
            context_parallel_size=cp,
            sequence_parallel=args.sequence_parallel,
        )
    else:
        ps = single_process_state()
    cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else "cpu")
    if device == "cuda":
        if not cuda:
            raise ValueError("--device cuda but CUDA is not available")
        device = f"cuda:{torch.cuda.current_device() if world > 1 else 0}"
    dtype = DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    spec = args.layer_spec or ("auto" if device.startswith("cuda") else "local")
    return ps, torch.device(device), dtype, spec


def load_pipeline(args, ps, device, dtype, spec) -> GenerationPipeline:
    from megatron_apt.checkpoint import load_mmdit
    from megatron_apt.text import load_text_encoder
    from megatron_apt.vae import load_vae

    model = load_mmdit(
        args.checkpoint, device, dtype, ps, spec=spec, role=args.checkpoint_role, ema=args.ema
    )
    encoder = None
    if ps.model_rank == 0:  # only model-parallel rank 0 encodes (the embeddings are broadcast)
        enc_dtype = torch.float32 if dtype == torch.float16 else dtype  # T5 overflows in fp16
        encoder = load_text_encoder(
            args.text_encoder, device=device, dtype=enc_dtype, max_length=args.max_text_length
        )
    vae = load_vae(args.vae, device=device, dtype=dtype)
    if args.compile:
        from megatron_apt.models.compile import compile_blocks

        compile_blocks(model)
    return GenerationPipeline(model, vae, encoder, ps=ps, device=device)


def sampling_config(args) -> SamplingConfig:
    diffusion = {}
    if args.mode == "diffusion":
        diffusion = dict(
            guidance_scale=7.5 if args.guidance_scale is None else args.guidance_scale,
            negative_prompt=(
                DEFAULT_NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
            ),
            shift=1.0 if args.shift is None else args.shift,
        )
        if args.scheduler is not None:
            from megatron_apt.inference.schedule import read_scheduler

            diffusion.update(read_scheduler(args.scheduler))
    return SamplingConfig(
        mode=args.mode, steps=args.steps, t_mid=args.t_mid, renoise=args.renoise, **diffusion
    )


def run(args: argparse.Namespace) -> dict | None:
    """Generate and write; returns the summary on the writing rank (None on the others)."""
    prompts = read_prompts(args)
    sampling = sampling_config(args)
    start = time.perf_counter()
    ps, device, dtype, spec = setup_runtime(args)
    pipe = load_pipeline(args, ps, device, dtype, spec)
    if args.latent_shape:
        shape = (pipe.cfg.in_channels, *parse_latent_shape(args.latent_shape))
        pipe.check_latent_shape(shape)
    else:
        shape = pipe.latent_shape(args.frames, args.height, args.width)
    frames, height, width = pipe.pixel_shape(shape)
    check_writable_size(frames, height, width)
    load_s = time.perf_counter() - start
    gen = dict(seed=args.seed, batch_size=args.batch_size)
    for _ in range(args.warmup):
        list(pipe.generate(prompts[: args.batch_size], shape, sampling, **gen))
    pipe.timer.reset()
    records, latents, write_s = [], [], 0.0
    for sample in pipe.generate(prompts, shape, sampling, **gen):
        if not pipe.is_writer:
            continue
        t0 = time.perf_counter()
        paths = write_sample(
            args.output,
            sample.index,
            sample.prompt,
            sample.pixels,
            args.fps,
            args.gif,
            args.video_format,
        )
        write_s += time.perf_counter() - t0
        latents.append(sample.latents)
        records.append(
            {"index": sample.index, "prompt": sample.prompt, "files": [p.name for p in paths]}
        )
        print(f"[{sample.index + 1}/{len(prompts)}] {' '.join(str(p) for p in paths)}")
    if not pipe.is_writer:
        return None
    if args.save_latents:
        from safetensors.torch import save_file

        save_file(
            {"latents": torch.stack(latents).contiguous()}, os.path.join(args.output, LATENTS_FILE)
        )
    return summarize(args, pipe, sampling, shape, (frames, height, width), records, load_s, write_s)


def sampling_summary(sampling: SamplingConfig) -> dict:
    out = {"mode": sampling.mode, "steps": sampling.steps}
    if sampling.mode == "generator" and sampling.steps == 2:
        out.update(t_mid=sampling.t_mid, renoise=sampling.renoise)
    if sampling.mode == "diffusion":
        out.update(
            guidance_scale=sampling.guidance_scale,
            negative_prompt=sampling.negative_prompt if sampling.uses_cfg else None,
            shift=sampling.shift,
            schedule=sampling.schedule,
        )
    return out


def summarize(args, pipe, sampling, shape, pixels, records, load_s, write_s) -> dict:
    seconds = {k: round(pipe.timer.seconds.get(k, 0.0), 6) for k in COMPONENTS}
    total = sum(seconds.values())
    n = len(records)
    summary = {
        "checkpoint": args.checkpoint,
        "text_encoder": args.text_encoder,
        "vae": args.vae,
        "sampling": sampling_summary(sampling),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "latent_shape": list(shape),
        "pixel_shape": {"frames": pixels[0], "height": pixels[1], "width": pixels[2]},
        "fps": args.fps if pixels[0] > 1 else None,
        "device": str(pipe.device),
        "dtype": str(pipe.model.final_proj.weight.dtype).removeprefix("torch."),
        "layer_spec": pipe.model.spec.name,
        "compile": compile_status(pipe.model),
        "tensor_parallel_size": pipe.ps.tp_size,
        "context_parallel_size": pipe.ps.cp_size,
        "sequence_parallel": pipe.ps.sequence_parallel,
        "num_samples": n,
        "seconds": {**seconds, "total": round(total, 6)},
        "seconds_per_sample": {
            k: round(v / max(n, 1), 6) for k, v in {**seconds, "total": total}.items()
        },
        "load_seconds": round(load_s, 3),
        "write_seconds": round(write_s, 3),
        "samples": records,
    }
    if args.save_latents:
        summary["latents_file"] = LATENTS_FILE
    return summary


def print_report(summary: dict) -> None:
    s = summary["sampling"]
    steps = f"{s['steps']} step{'s' if s['steps'] > 1 else ''}"
    cfg = f", CFG {s['guidance_scale']:g}" if s["mode"] == "diffusion" else ""
    p, n = summary["pixel_shape"], summary["num_samples"]
    print(
        f"\n{n} sample{'s' if n != 1 else ''} of {p['frames']}x{p['height']}x{p['width']} "
        f"(frames x H x W), {s['mode']} {steps}{cfg}, batch {summary['batch_size']}, "
        f"{summary['device']} {summary['dtype']}, TP={summary['tensor_parallel_size']}"
        f" CP={summary['context_parallel_size']}"
    )
    print(format_timing_table(summary["seconds"], summary["num_samples"]))
    print(
        f"(not included: loading {summary['load_seconds']:.2f} s, "
        f"writing {summary['write_seconds']:.2f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from megatron_apt.parallel import destroy_parallel

            destroy_parallel()
    if summary is not None:
        path = write_summary(args.output, summary)
        print_report(summary)
        print(f"summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
