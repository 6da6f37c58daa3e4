#!/usr/bin/env python
"""Write the synthetic captioned data set: coloured shapes (circle, square, triangle) moving
left/right/up/down (videos) or static (images), with same-stem .txt captions.

    python tools/make_synthetic_data.py --output data/shapes --num 64 --kind video --format mp4
    python tools/make_synthetic_data.py --output data/shapes --num 64 --kind image --size 64
    python tools/make_synthetic_data.py ... --text-encoder models/t5   # + a tiny random T5

``--text-encoder DIR`` also writes a tiny random T5 encoder (a sentencepiece tokenizer trained
on the synthetic captions, saved in a real T5 directory's layout) for the demo and the tests.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apt.data.synthetic import make_synthetic_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", required=True, help="folder for media files and captions")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--kind", choices=("image", "video"), default="video")
    p.add_argument("--size", type=int, default=32, help="width = height in pixels")
    p.add_argument("--frames", type=int, default=9, help="frames per video")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate written to videos")
    p.add_argument("--format", choices=("png", "jpg", "mp4", "gif"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-encoder", metavar="DIR", help="also build a tiny random T5 here")
    args = p.parse_args(argv)
    if args.format and (args.format in ("png", "jpg")) != (args.kind == "image"):
        p.error(f"--format {args.format} does not fit --kind {args.kind}")
    paths = make_synthetic_dataset(
        args.output, args.num, args.kind, args.size, args.frames, args.format, args.fps, args.seed
    )
    print(f"wrote {len(paths)} {args.kind}s with captions to {args.output}")
    if args.text_encoder:
        from megatron_apt.text import build_tiny_text_encoder

        build_tiny_text_encoder(args.text_encoder, seed=args.seed)
        print(f"wrote a tiny T5 text encoder to {args.text_encoder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
