#!/usr/bin/env python
"""Convert, reshard and inspect checkpoints of every model family (MMDiT / SD3, Wan2.1)
(library: megatron_apt.checkpoint.convert; families: megatron_apt.models.families).

    # a diffusers transformer -> ours; the family comes from its config.json's _class_name
    # (SD3Transformer2DModel, WanTransformer3DModel); a pipeline root (transformer/) and
    # sharded safetensors (an index json) are read too. A .safetensors OUTPUT is one TP=1
    # model file, any other OUTPUT a TP-sharded directory (megatron_apt_sharded.json +
    # tp_rank_XX.safetensors)
    python tools/convert_checkpoint.py import-diffusers --input sd3/transformer --output sd3-tp2 \\
        --tensor-model-parallel-size 2
    python tools/convert_checkpoint.py import-diffusers --input Wan2.1-T2V-1.3B-Diffusers \\
        --output wan-tp2 --tensor-model-parallel-size 2
    # ours -> the family's diffusers class (SD3: sincos2d / pooled-text models only)
    python tools/convert_checkpoint.py export-diffusers --input sd3-tp2 --output sd3-back
    python tools/convert_checkpoint.py export-diffusers --input wan-tp2 --output wan-back
    # a post-trained generator + the base pipeline's text encoders and VAE -> a diffusers
    # StableDiffusion3Pipeline / WanPipeline directory that samples our one step
    # (num_inference_steps=1; Wan: num_inference_steps=2 is our two-step at --t-mid)
    python tools/convert_checkpoint.py export-diffusers-pipeline --input runs/apt \
        --ema --base /models/sd3.5-large --output out/sd35-apt [--copy]
    python tools/convert_checkpoint.py export-diffusers-pipeline --input wan-apt.safetensors \
        --base /models/Wan2.1-T2V-1.3B-Diffusers --output out/wan-apt [--t-mid 0.5]
    # a training checkpoint (any ZeRO stage, any TP size) -> one TP=1 model file
    python tools/convert_checkpoint.py export --input runs/apt --output g_ema.safetensors --ema
    python tools/convert_checkpoint.py reshard --input sd3-tp2 --output sd3-tp4 \\
        --tensor-model-parallel-size 4
    python tools/convert_checkpoint.py inspect runs/apt/iter_0000020 [--json]

Nothing is written unless the input validates; outputs appear atomically; an existing output
is replaced only with --overwrite. Exit status 2 with a one-line reason on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

from megatron_apt.checkpoint import convert  # noqa: E402

ROLES = ("generator", "discriminator", "model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str, tp: bool = False, tp_required: bool = False):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--input", required=True)
        s.add_argument("--output", required=True)
        s.add_argument("--overwrite", action="store_true", help="replace an existing output")
        if tp:
            s.add_argument(
                "--tensor-model-parallel-size", type=int, default=1, required=tp_required
            )
        return s

    add("import-diffusers", "diffusers SD3 / Wan transformer dir -> ours", tp=True)
    add("export-diffusers", "ours -> diffusers SD3 / Wan transformer dir")
    x = add("export-diffusers-pipeline", "generator + base SD3/Wan pipeline -> runnable pipeline")
    x.add_argument("--base", required=True, help="the SD3/SD3.5 or Wan pipeline dir it came from")
    x.add_argument(
        "--t-mid",
        type=float,
        default=0.5,
        help="two-step middle time: Wan, the exported scheduler's two steps; SD3, its README",
    )
    x.add_argument("--copy", action="store_true", help="copy the base's folders, not symlink")
    x.add_argument("--ema", action="store_true", help="training checkpoints: the EMA weights")
    e = add("export", "training checkpoint -> one TP=1 model file")
    e.add_argument("--ema", action="store_true", help="the EMA weights")
    e.add_argument("--role", choices=ROLES, help="engine (default: generator, else model)")
    add("reshard", "any checkpoint -> TP=N", tp=True, tp_required=True)
    i = sub.add_parser("inspect", help="keys, shapes, dtypes, TP layout, parameter count")
    i.add_argument("checkpoint")
    i.add_argument("--ema", action="store_true")
    i.add_argument("--role", choices=ROLES)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    return p.parse_args(argv)


def print_inspection(info: dict) -> None:
    split = info["tp_layout"].get("split", {})
    print(f"{info['path']}: {info['format']} checkpoint, role {info['role']}, {info['family']}")
    print(
        f"  TP layout: {json.dumps({k: v for k, v in info['tp_layout'].items() if k != 'split'})}"
    )
    print(f"  parameters: {info['num_parameters']:,}")
    print(f"  model: {info['summary']}")
    for k, t in info["tensors"].items():
        dim = split.get(k)
        tag = f"  split dim {dim}" if dim is not None else ""
        print(f"  {k:<48} {str(tuple(t['shape'])):<16} {t['dtype']}{tag}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        if a.command == "import-diffusers":
            out = convert.import_diffusers(
                a.input, a.output, a.tensor_model_parallel_size, a.overwrite
            )
        elif a.command == "export-diffusers":
            out = convert.export_diffusers(a.input, a.output, a.overwrite)
        elif a.command == "export-diffusers-pipeline":
            from megatron_apt.checkpoint.pipeline_export import export_diffusers_pipeline

            out = export_diffusers_pipeline(
                a.input, a.base, a.output, a.overwrite, copy=a.copy, ema=a.ema, t_mid=a.t_mid
            )
        elif a.command == "export":
            out = convert.export_training(a.input, a.output, a.role, a.ema, a.overwrite)
        elif a.command == "reshard":
            out = convert.reshard(a.input, a.output, a.tensor_model_parallel_size, a.overwrite)
        else:
            info = convert.inspect(a.checkpoint, a.role, a.ema)
            print(json.dumps(info, indent=1)) if a.json else print_inspection(info)
            return 0
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        print(f"convert_checkpoint.py {a.command}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
