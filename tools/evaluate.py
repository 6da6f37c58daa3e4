#!/usr/bin/env python
"""Score generated samples against real ones on the synthetic shapes data.

    python tools/evaluate.py --real data/media \\
        --row "diffusion 25 steps (CFG)=samples/diffusion" --row "APT 1 step=samples/apt1" \\
        --output results.md

Every folder is a tools/generate.py output (its summary.json names files and prompts) or is
read like preprocessing input: media files with a same-stem .txt caption, or a captions.jsonl
(``{"path", "caption"}`` per line). Columns:
Fréchet distance in the feature space of a small CNN trained on the synthetic data (lower is
better), sharpness (variance of the Laplacian, higher is sharper) and caption accuracy (colour,
shape, motion, all three). Prints a Markdown table (like Tables 5 and 7 of the paper) and
writes it, plus JSON, to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apt.data.media import list_inputs, read_frames  # noqa: E402
from megatron_apt.evaluation import evaluate_samples, load_or_train_feature_net  # noqa: E402
from megatron_apt.evaluation.metrics import features_of, sharpness  # noqa: E402


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


def markdown(rows: dict[str, dict], real: dict) -> str:
    lines = [
        "| method | FD ↓ | sharpness ↑ | colour | shape | motion | all |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in {"real data": real, **rows}.items():
        lines.append(
            f"| {name} | {r['fd']:.2f} | {r['sharpness']:.1f} | {r['caption_color']:.2f} | "
            f"{r['caption_shape']:.2f} | {r['caption_motion']:.2f} | {r['caption_all']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--real", required=True, help="folder of real captioned media")
    ap.add_argument(
        "--row",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="a method's generated samples (repeatable)",
    )
    ap.add_argument("--output", help="write NAME.md and NAME.json (default: print only)")
    ap.add_argument("--feature-net", help="cache path (.safetensors) of the feature network")
    ap.add_argument("--size", type=int, default=32, help="feature-net input size (pixels)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--feature-steps",
        type=int,
        default=300,
        help="training steps of the feature network when not cached",
    )
    args = ap.parse_args(argv)
    rows_spec = []
    for spec in args.row:
        if "=" not in spec:
            ap.error(f"--row wants NAME=FOLDER, got {spec!r}")
        rows_spec.append(spec.rsplit("=", 1))
    net, acc = load_or_train_feature_net(
        args.feature_net, size=args.size, steps=args.feature_steps, seed=args.seed
    )
    real, real_caps = load_folder(args.real)
    half = len(real) // 2  # the real row compares two halves of the real data: FD's floor
    real_feats = features_of(net, real)
    real_row = evaluate_samples(net, real[half:], real_caps[half:], real_feats[:half])
    real_row["sharpness"] = sharpness(real)
    rows = {}
    for name, folder in rows_spec:
        samples, caps = load_folder(folder)
        rows[name] = evaluate_samples(net, samples, caps, real_feats)
    table = markdown(rows, real_row)
    print(table)
    print(f"\nfeature net held-out accuracy: {json.dumps(acc)}")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(table + "\n")
        out.with_suffix(".json").write_text(
            json.dumps({"real": real_row, "rows": rows, "feature_net_accuracy": acc}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
