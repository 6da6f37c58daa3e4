#!/usr/bin/env python
"""Size a model preset of any family without building it: parameters (analytic), weight
memory, and the FLOPs and tokens of one forward for a latent shape (the family's own counts,
megatron_apt.models.families).

    python tools/plan_model.py --preset mmdit-8b
    python tools/plan_model.py --preset mmdit-8b --latent 13x90x160 --text-len 256
    python tools/plan_model.py --preset wan2.1-t2v-14b --latent 21x90x160 --text-len 512
    python tools/plan_model.py --all --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apt.config.flops import visual_tokens  # noqa: E402
from megatron_apt.models.families import FAMILIES, family_of, get_preset  # noqa: E402

PRESETS = {name: fam for fam in FAMILIES.values() for name in fam.presets}


def parse_latent(text: str) -> tuple[int, int, int]:
    try:
        t, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--latent wants TxHxW in latent units, got {text!r}"
        ) from None
    return t, h, w


def plan(preset: str, latent: tuple[int, int, int] | None, text_len: int) -> dict:
    cfg = get_preset(preset)
    family = family_of(cfg)
    params = family.count_parameters(cfg)
    row = {
        "preset": preset,
        "family": family.name,
        "layers": cfg.num_layers,
        "hidden": cfg.hidden_size,
        "heads": cfg.num_heads,
        "head_dim": cfg.head_dim,
        "params": params,
        "weights_bf16_gib": params * 2 / 2**30,
    }
    if latent is not None:
        n = visual_tokens(cfg, *latent)
        row.update(
            latent=list(latent),
            visual_tokens=n,
            text_tokens=text_len,
            forward_tflop=family.forward_flops(cfg, n, text_len) / 1e12,
        )
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="mmdit-8b")
    ap.add_argument("--all", action="store_true", help="every preset")
    ap.add_argument(
        "--latent",
        type=parse_latent,
        default=None,
        help="latent TxHxW, e.g. 13x90x160 (49 frames of 1280x720 with a 4x8x8 VAE)",
    )
    ap.add_argument("--text-len", type=int, default=256, help="text tokens (default 256)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    rows = [
        plan(p, args.latent, args.text_len)
        for p in (sorted(PRESETS) if args.all else [args.preset])
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        "| preset | layers | hidden | heads x dim | parameters | bf16 weights |"
        + (" tokens | forward TFLOP |" if args.latent else "")
    )
    print("|---|---|---|---|---|---|" + ("---|---|" if args.latent else ""))
    for r in rows:
        line = (
            f"| {r['preset']} | {r['layers']} | {r['hidden']} | {r['heads']} x "
            f"{r['head_dim']} | {r['params']:,} ({r['params'] / 1e9:.2f}B) | "
            f"{r['weights_bf16_gib']:.1f} GiB |"
        )
        if args.latent:
            line += f" {r['visual_tokens']:,} + {r['text_tokens']} | {r['forward_tflop']:.1f} |"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
