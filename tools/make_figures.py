#!/usr/bin/env python
"""Pictures of a run: per sample folder a frame-strip grid (PNG) and an animated grid (GIF and
MP4); per training log a panel of its loss curves (one PNG); with --health, per training log a
row of panels per key group (losses, D logits, D accuracy, gradient norms) with the collapse /
rollback events marked (``<curves-name>_health.png``).

    python tools/make_figures.py --output figures/ \\
        --samples "APT 1 step=samples/apt1" --samples "consistency 1 step=samples/cd1" \\
        --metrics "APT=runs/apt/metrics.jsonl" --metrics "diffusion=runs/diffusion/metrics.jsonl"

Sample folders are tools/generate.py outputs (summary.json) or captioned media folders; the
first --num samples of each are drawn (the same prompts in every folder of a generate.py run).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apt.evaluation.figures import (  # noqa: E402
    comparison_grid,
    plot_curves,
    plot_health,
    write_grids,
)
from megatron_apt.inference.writers import slugify  # noqa: E402
from tools.evaluate import load_folder  # noqa: E402


def _pairs(ap: argparse.ArgumentParser, specs: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        if "=" not in spec:
            ap.error(f"{flag} wants NAME=PATH, got {spec!r}")
        out.append(tuple(spec.rsplit("=", 1)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--output", required=True, help="folder for the pictures")
    ap.add_argument("--samples", action="append", default=[], metavar="NAME=FOLDER")
    ap.add_argument("--metrics", action="append", default=[], metavar="NAME=metrics.jsonl")
    ap.add_argument(
        "--keys",
        action="append",
        default=[],
        metavar="NAME=KEY,KEY",
        help="metrics drawn in the panel NAME (default: loss* and d_*)",
    )
    ap.add_argument("--num", type=int, default=16, help="samples per grid")
    ap.add_argument("--fps", type=float, default=4.0, help="frame rate of the animations")
    ap.add_argument(
        "--comparison",
        metavar="STEM",
        help="also one PNG with a labelled row per --samples folder (first --per-row samples)",
    )
    ap.add_argument("--per-row", type=int, default=4, help="samples per comparison row")
    ap.add_argument("--curves-name", default="loss_curves", help="stem of the curves PNG")
    ap.add_argument(
        "--health",
        action="store_true",
        help="also draw the discriminator health panels of every --metrics log "
        "(<curves-name>_health.png: losses, D logits, D accuracy, gradient norms, events)",
    )
    args = ap.parse_args(argv)
    if not args.samples and not args.metrics:
        ap.error("nothing to draw: give --samples and/or --metrics")
    out = Path(args.output)
    rows = {}
    for name, folder in _pairs(ap, args.samples, "--samples"):
        clips, _ = load_folder(folder)
        rows[name] = clips[: args.per_row]
        paths = write_grids(clips[: args.num], out, slugify(name), args.fps)
        print(f"{name}: {' '.join(str(p) for p in paths)}")
    if args.comparison and rows:
        from PIL import Image

        path = out / f"{args.comparison}.png"
        Image.fromarray(comparison_grid(rows)).save(path)
        print(f"comparison: {path}")
    if args.metrics:
        runs = dict(_pairs(ap, args.metrics, "--metrics"))
        try:
            keys = {n: k.split(",") for n, k in _pairs(ap, args.keys, "--keys")}
            path = plot_curves(runs, out / f"{args.curves_name}.png", keys)
            health = (
                plot_health(runs, out / f"{args.curves_name}_health.png") if args.health else None
            )
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"curves: {path}")
        if health:
            print(f"health: {health}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
