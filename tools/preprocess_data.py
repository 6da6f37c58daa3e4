#!/usr/bin/env python
r"""Captioned images and videos -> latent shards (VAE latents + text embeddings) + index.json.

    python tools/preprocess_data.py --input media/ --output shards/ --bucket image-1024 \
        --vae /models/sd3/vae --text-encoder /models/t5-v1_1-xxl --batch-size 16
    # SD3 / SD3.5: its VAE (vae/) and its three text encoders, from the pipeline directory
    python tools/preprocess_data.py ... --vae /models/sd3.5-large --text-encoder /models/sd3.5-large
    # Wan2.1: its VAE (vae/, 1 + 4k frames, 8x spatial) and umT5 (512 tokens) from the pipeline
    python tools/preprocess_data.py ... --vae /models/Wan2.1-T2V-1.3B-Diffusers \
        --text-encoder /models/Wan2.1-T2V-1.3B-Diffusers
    torchrun --nproc-per-node 8 tools/preprocess_data.py ... --device cuda   # one rank per GPU

``--input``: a folder (media + same-stem .txt captions, or a captions.jsonl) or a manifest
.jsonl of {"path", "caption"}. ``--first-frame`` reads each video as the image of its first
frame (stills for an image stage: give image buckets). Re-running the same command resumes:
finished shards are kept.
Library: ``megatron_apt.data.preprocess``; format: ``megatron_apt.data.format``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_apt.data.buckets import BUCKET_PRESETS  # noqa: E402
from megatron_apt.data.preprocess import DTYPES, PreprocessConfig, preprocess  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True, help="media folder or manifest .jsonl")
    p.add_argument("--output", required=True, help="output folder (index.json, shards/)")
    p.add_argument(
        "--bucket",
        action="append",
        help=f"bucket preset, repeatable (default image-32 and video-32): {sorted(BUCKET_PRESETS)}"
        " or WxH / WxHxFRAMES@FPS",
    )
    p.add_argument("--vae", default="identity", help="load_vae spec: identity, a local dir")
    p.add_argument(
        "--text-encoder",
        required=True,
        help="local T5 directory, an SD3/SD3.5 pipeline directory (CLIP-L + CLIP-G + T5, "
        "pooled vectors stored in the shards) or a Wan pipeline directory (umT5)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="inputs per VAE/text batch")
    p.add_argument("--samples-per-shard", type=int, default=64, help="inputs per work unit")
    p.add_argument(
        "--max-text-length",
        type=int,
        default=None,
        help="L: T5 / umT5 tokens (fixed pad; SD3 adds 77); default: the family's, 512 for a "
        "Wan pipeline directory, 256 otherwise",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="storage dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:LOCAL_RANK per rank)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-shards", type=int, default=None, help="debug: units per rank per run")
    p.add_argument("--num-workers", type=int, default=4, help="media decoding threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument(
        "--first-frame",
        action="store_true",
        help="videos give their first frame as an image (to image buckets): stills of the "
        "clips for an image stage",
    )
    p.add_argument(
        "--negative-prompt",
        default=None,
        help="the consistency teacher's negative prompt, stored embedded next to the shards "
        "(default: the repository's fixed one, megatron_apt.text.DEFAULT_NEGATIVE_PROMPT; "
        'WanPipeline\'s own default is "")',
    )
    return p.parse_args(argv)


def init_distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; gloo group for the final barrier."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def load_models(args: argparse.Namespace, device: str):
    from megatron_apt.text import load_text_encoder
    from megatron_apt.vae import load_vae

    vae = load_vae(args.vae, device=device)
    enc = load_text_encoder(args.text_encoder, device=device, max_length=args.max_text_length)
    return vae, enc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world = init_distributed()
    device = args.device
    if device == "cuda" and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    vae, enc = load_models(args, device)
    cfg = PreprocessConfig(
        input=args.input,
        output=args.output,
        buckets=args.bucket or ["image-32", "video-32"],
        vae=args.vae,
        text_encoder=args.text_encoder,
        batch_size=args.batch_size,
        samples_per_shard=args.samples_per_shard,
        max_text_length=enc.max_length,  # the flag, or the family's default
        dtype=args.dtype,
        device=device,
        resume=args.resume,
        max_shards=args.max_shards,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        first_frame=args.first_frame,
        negative_prompt=args.negative_prompt,
    )
    barrier = dist.barrier if world > 1 else None
    index = preprocess(cfg, vae, enc, rank=rank, world_size=world, barrier=barrier)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    state = "" if rank else (" (index written)" if index is not None else " (incomplete)")
    print(f"preprocess_data: rank {rank} done{state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
