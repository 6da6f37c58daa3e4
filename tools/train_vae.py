#!/usr/bin/env python
"""Train a small KL autoencoder (diffusers AutoencoderKL) on the frames of a captioned media
folder and save it in diffusers' layout, loadable as ``--vae DIR`` by every tool.

    python tools/train_vae.py --input data/train --output models/vae
    python tools/train_vae.py --input data/train --output models/vae --latent-channels 8 \\
        --channels 32,64,64 --steps 2000          # 4x spatial compression, 8 channels

The demo trains its VAE this way (examples/demo.py, stage "vae"): a learned decoder turns the
small per-element errors of one-step latents into smooth pixels, as real latent-diffusion
decoders do, where the pixel-unshuffle "VAE" shows them as speckle. The per-channel latent
mean and std of the training frames are written into config.json (latents_mean / latents_std),
so the diffusion model sees normalized latents. A report (PSNR on held-out frames, latent
statistics, time) is written as train_vae.json next to the weights.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apt.vae.train import VAETrainConfig, load_frames, train_vae  # noqa: E402


def _channels(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"channels must be positive, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    d = VAETrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True, help="captioned media folder or .jsonl manifest")
    p.add_argument("--output", required=True, help="folder for the VAE (replaced when done)")
    p.add_argument("--max-files", type=int, help="use the first N media files only")
    p.add_argument("--latent-channels", type=int, default=d.latent_channels)
    p.add_argument(
        "--channels",
        type=_channels,
        default=d.block_out_channels,
        help="block widths, comma-separated; spatial compression 2^(blocks - 1) (default "
        f"{','.join(map(str, d.block_out_channels))})",
    )
    p.add_argument("--layers-per-block", type=int, default=d.layers_per_block)
    p.add_argument("--norm-groups", type=int, default=d.norm_num_groups)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="frames per step")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW peak (warm-up, cosine)")
    p.add_argument("--kl-weight", type=float, default=d.kl_weight)
    p.add_argument("--holdout", type=float, default=d.holdout, help="share of frames held out")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-interval", type=int, default=d.log_interval)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = VAETrainConfig(
        latent_channels=args.latent_channels,
        block_out_channels=args.channels,
        layers_per_block=args.layers_per_block,
        norm_num_groups=args.norm_groups,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        kl_weight=args.kl_weight,
        holdout=args.holdout,
        seed=args.seed,
        log_interval=max(1, args.log_interval),
    )
    try:
        cfg.validate()
        frames, n_files = load_frames(args.input, args.max_files)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    print(f"train_vae: {frames.shape[0]} frames from {n_files} files in {args.input}", flush=True)
    train_vae(frames, args.output, cfg, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
