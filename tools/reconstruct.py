#!/usr/bin/env python
"""Pass captioned media through a VAE (encode to the posterior mode, decode) and write the
reconstructions with their captions: the floor that any latent model's samples meet.

    python tools/reconstruct.py --vae models/vae --input data/real --output samples/vae-recon \\
        --max-files 2048 --format gif

The demo scores the result as the row "real data through the VAE": whatever a generator's
row shows beyond it (FD, background noise, sharpness) is the generator's, not the VAE's.
Files are written as ``NNNNN.<format>`` + ``NNNNN.txt`` in input order, so that tools/evaluate.py
reads them in the same order as the inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_apt.data.media import MediaError, list_inputs, read_frames, write_media  # noqa: E402
from megatron_apt.vae import load_vae  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vae", required=True, help="load_vae spec: a diffusers directory, identity")
    p.add_argument("--input", required=True, help="captioned media folder or .jsonl manifest")
    p.add_argument("--output", required=True, help="folder for the reconstructions")
    p.add_argument("--max-files", type=int, help="the first N inputs only")
    p.add_argument("--format", choices=("png", "gif", "mp4"), default="gif")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--batch-size", type=int, default=64, help="clips per VAE call")
    args = p.parse_args(argv)
    try:
        vae = load_vae(args.vae)
        items, _ = list_inputs(args.input)
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    items = items[: args.max_files] if args.max_files else items
    if not items:
        p.error(f"{args.input}: no captioned media")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(items), args.batch_size):
        chunk = items[start : start + args.batch_size]
        try:
            clips = [read_frames(i.path) for i in chunk]  # uint8 [T, H, W, 3]
            pixels = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        except (MediaError, ValueError) as err:
            sys.exit(f"error: {chunk[0].path} ...: {err} (all clips must have one shape)")
        try:
            rec = vae.decode(vae.encode(pixels))  # [B, 3, T, H, W] in [-1, 1]
        except ValueError as err:
            sys.exit(f"error: {chunk[0].path}: {err}")
        frames = ((rec + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        for k, (item, clip) in enumerate(zip(chunk, frames.permute(0, 2, 3, 4, 1).numpy())):
            path = write_media(out / f"{start + k:05d}.{args.format}", clip, args.fps)
            path.with_suffix(".txt").write_text(item.caption + "\n")
    print(f"reconstructed {len(items)} clips through {args.vae} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
