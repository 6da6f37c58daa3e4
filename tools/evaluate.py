#!/usr/bin/env python
"""Score generated samples against real ones on the synthetic shapes data.

    python tools/evaluate.py --real data/media \\
        --row "diffusion 25 steps (CFG)=samples/diffusion" --row "APT 1 step=samples/apt1" \\
        --row "APT 1 step (first 256)=samples/apt1@256" --output results --max-samples 2048

Every folder is a tools/generate.py output (its summary.json names files and prompts) or is
read like preprocessing input: media files with a same-stem .txt caption, or a captions.jsonl
(``{"path", "caption"}`` per line). ``NAME=FOLDER@N`` scores only the folder's first N clips
(to compare a row with another of N clips, e.g. a 25-step teacher sampled for fewer prompts).

The real clips are split in two halves of N: the second half is the reference of every row,
the first half is scored like a row ("real data": the floor of every metric at that N). Columns
(definitions in megatron_apt/evaluation/metrics.py):

* video FD [95 % CI]: Fréchet distance in the feature space of a small (2+1)D network over
  every frame and the motion between frames (megatron_apt/evaluation/features.py), trained on
  freshly rendered synthetic clips of the real set's length and --size, with a percentile
  bootstrap interval centred on the estimate (--bootstrap resamples); lower is better. The
  headline. FD depends on N: for rows with fewer clips than the reference the real-data floor
  is measured again at their N ("real data (first N)"), and they get a warning.
* conditional FD [95 % CI]: the same distance per caption class (each colour, shape and
  motion), averaged: a sample of the wrong colour or shape for its prompt costs here.
* caption accuracy [95 % CI]: colour, shape, motion and all three, read back from the pixels
  by the synthetic data's scorer (independent of the network).
* sharpness ratio: Laplacian variance over the reference's (1 = as sharp as real data).
* background noise: mean |pixel - 3x3 median| over background pixels, 0-255 (real ~0): speckle
  raises sharpness but also this.
* saturation distance: Wasserstein-1 between the object pixels' HSV-saturation histograms of
  the row and the reference (CFG over-saturation, paper section 5.3), with the mean saturation.
* N: clips scored.

Prints a Markdown table (like Tables 5 and 7 of the paper) and writes it to OUTPUT.md, and the
numbers to OUTPUT.json: {"real": row, "rows": {name: row}, "reference", "bootstrap",
"floors", "warnings", "feature_net_accuracy"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apt.data.media import list_inputs, read_frames  # noqa: E402
from megatron_apt.evaluation import evaluate_against_real, load_or_train_feature_net  # noqa: E402
from megatron_apt.evaluation.metrics import markdown_table  # noqa: E402


def load_folder(path: str):
    summary = Path(path) / "summary.json"
    if summary.is_file():  # a tools/generate.py output folder
        records = json.loads(summary.read_text())["samples"]
        files = [Path(path) / r["files"][0] for r in records]
        return [read_frames(f) for f in files], [r["prompt"] for r in records]
    items, skipped = list_inputs(path)
    if not items:
        raise SystemExit(f"error: no captioned media in {path} ({len(skipped)} skipped)")
    return [read_frames(i.path) for i in items], [i.caption for i in items]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--real", required=True, help="folder of real captioned media")
    ap.add_argument(
        "--row",
        action="append",
        default=[],
        metavar="NAME=FOLDER[@N]",
        help="a method's generated samples (repeatable); @N: only the first N clips",
    )
    ap.add_argument("--output", help="write OUTPUT.md and OUTPUT.json (default: print only)")
    ap.add_argument("--feature-net", help="cache path (.safetensors) of the feature network")
    ap.add_argument("--size", type=int, default=32, help="feature-net input size (pixels)")
    ap.add_argument(
        "--frames",
        type=int,
        help="clip length the feature net is trained for (default: the real clips' length)",
    )
    ap.add_argument("--seed", type=int, default=0, help="feature-net and bootstrap seed")
    ap.add_argument(
        "--feature-steps",
        type=int,
        default=300,
        help="training steps of the feature network when not cached",
    )
    ap.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples of the FD interval (0: no interval; default 1000)",
    )
    ap.add_argument(
        "--max-samples",
        type=int,
        metavar="N",
        help="use at most N clips of every row and of each real half (the first ones)",
    )
    args = ap.parse_args(argv)
    rows_spec, limits = [], {}
    for spec in args.row:
        if "=" not in spec:
            ap.error(f"--row wants NAME=FOLDER or NAME=FOLDER@N, got {spec!r}")
        name, folder = spec.rsplit("=", 1)
        head, _, n = folder.rpartition("@")
        if head and n.isdigit():  # FOLDER@N (an "@" followed by anything else: the path's)
            if int(n) < 2:
                ap.error(f"--row {spec!r}: N after @ must be >= 2")
            folder, limits[name] = head, int(n)
        rows_spec.append((name, folder))
    real, real_caps = load_folder(args.real)
    frames = args.frames or len(real[0])
    net, acc = load_or_train_feature_net(
        args.feature_net, size=args.size, frames=frames, steps=args.feature_steps, seed=args.seed
    )
    rows = {name: load_folder(folder) for name, folder in rows_spec}
    results = evaluate_against_real(
        net,
        real,
        real_caps,
        rows,
        bootstrap=args.bootstrap,
        seed=args.seed,
        max_samples=args.max_samples,
        limits=limits,
    )
    results["feature_net_accuracy"] = acc
    table = markdown_table(results)
    print(table)
    print(f"\nfeature net held-out accuracy: {json.dumps(acc)}")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
