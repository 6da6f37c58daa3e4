#!/usr/bin/env python
"""What a trained velocity model conditions on: the caption words it uses and whether it knows
which way time runs (megatron_apt/evaluation/probes.py).

    R=runs/demo-wan-seed0
    python tools/probe_conditioning.py --checkpoint $R/diffusion/diffusion_ema.safetensors \\
        --shards $R/shards --text-encoder $R/models/t5 --max-text-length 12 \\
        --output $R/probe-teacher.json

For each noise level t: the flow-matching loss on the first ``--num-samples`` training latents
with their own captions, and its ratio when the motion / colour / shape word is swapped (the
demo's synthetic vocabulary: ``left <-> right``, ``up <-> down``, the next colour, the next
shape); a ratio near 1 means the model does not use that word. Then the relative change of
``v(P x)`` against ``P v(x)`` for three frame permutations ``P`` at random inputs: 0 means the
model cannot tell a clip from its frames reordered (a clip moving left, reversed, moves right).
Single process, CPU or one GPU; the checkpoint in any format ``tools/generate.py`` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="velocity model (model file, directory)")
    p.add_argument("--shards", required=True, help="latent shard directory (its index.json)")
    p.add_argument("--text-encoder", required=True, help="the shards' text encoder directory")
    p.add_argument("--max-text-length", type=int, help="T5 tokens per caption (the shards')")
    p.add_argument("--num-samples", type=int, default=256, help="training samples to score")
    p.add_argument(
        "--timesteps", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.95],
        help="noise levels t in (0, 1] (x_t = (1 - t) x + t z)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and random inputs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", help="write the numbers as JSON here too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_apt.checkpoint import load_mmdit
    from megatron_apt.data.reader import LatentShardReader
    from megatron_apt.evaluation.probes import caption_swap_losses, frame_permutation_errors
    from megatron_apt.models.families import family_of
    from megatron_apt.text import load_text_encoder

    if not 0 < min(args.timesteps) <= max(args.timesteps) <= 1:
        sys.exit(f"probe_conditioning: --timesteps {args.timesteps} must lie in (0, 1]")
    index = Path(args.shards) / "index.json"
    if not index.is_file():
        sys.exit(f"probe_conditioning: {index} missing (is --shards a preprocess_data output?)")
    device = torch.device(args.device)
    reader = LatentShardReader(index, batch_size=1, shuffle=False, prefetch=0)
    n = min(args.num_samples, len(reader))
    batch = reader.read_samples(np.arange(n))
    model = load_mmdit(args.checkpoint, device)
    uses_mask = family_of(model.cfg).uses_text_mask
    encoder = load_text_encoder(args.text_encoder, device=device, max_length=args.max_text_length)
    width = batch["text"].shape[-1]
    if encoder.dim != width:
        sys.exit(f"probe_conditioning: {args.text_encoder} encodes width {encoder.dim}, the "
                 f"shards in {args.shards} hold width {width}: another text encoder")  # fmt: skip

    def encode(captions: list[str]):
        e = encoder(captions)
        return e.text.to(device), (e.text_mask.to(device) if uses_mask else None)

    print(f"{type(model).__name__} from {args.checkpoint}: {n} training clips of {args.shards}")
    losses = caption_swap_losses(
        model, batch["latents"].to(device), batch["captions"], encode, args.timesteps,
        args.batch_size, args.seed,
    )  # fmt: skip
    print("flow-matching loss with the caption's own text, and its ratio with one word swapped:")
    for t, row in losses.items():
        ratios = "  ".join(f"{k} x{v / row['true']:.3f}" for k, v in row.items() if k != "true")
        print(f"  t={t:.2f}  loss {row['true']:.4f}  {ratios}")
    latent_shape = tuple(batch["latents"].shape[1:])
    perm = None
    if latent_shape[1] >= 2:
        text_shape = tuple(batch["text"].shape[1:])
        perm = frame_permutation_errors(model, latent_shape, text_shape, uses_mask, seed=args.seed)
        print("|v(P x) - P v(x)| / |v(x)| (0: the model cannot tell the frames' order):")
        print("  " + "  ".join(f"{k} {v:.4f}" for k, v in perm.items()))
    else:
        print("single-frame latents: no frame permutation to probe")
    if args.output:
        out = {
            "checkpoint": str(args.checkpoint),
            "model": type(model).__name__,
            "num_samples": n,
            "caption_swap_losses": {str(t): row for t, row in losses.items()},
            "caption_swap_ratios": {
                str(t): {k: v / row["true"] for k, v in row.items() if k != "true"}
                for t, row in losses.items()
            },
            "frame_permutation_errors": perm,
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
