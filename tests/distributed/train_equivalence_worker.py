"""``pretrain_apt.py`` with one extra flag for the equivalence tests: ``--optim-eps EPS``.

Why: RMSprop's first step is ``lr * g / (sqrt(1 - alpha) |g| + eps)``, nearly ``lr * sign(g)``
when ``|g| >> eps``. A gradient that is zero in exact arithmetic (the key bias of an attention
head: softmax ignores a shift shared by all logits) or tiny comes out of fp32 as round-off
whose sign depends on the summation order (batch split, ZeRO buckets, TP reductions), and
with the recipe's eps of 1e-8 RMSprop turns that noise into a full step of ``lr / sqrt(0.1)``.
A larger eps bounds the step's sensitivity to gradient noise by ``lr / eps`` so that weights
after a few updates can be compared at 1e-5; it also makes the step depend on the gradient's
scale (mean vs. sum over micro-batches and ranks), which with eps -> 0 it almost does not.
Everything else is the real entry point, unchanged.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pretrain_apt  # noqa: E402

MARKER = "EQUIVALENCE-WORKER-DONE"


def main(argv: list[str]) -> int:
    argv = list(argv)
    eps = None
    if "--optim-eps" in argv:
        i = argv.index("--optim-eps")
        eps = float(argv[i + 1])
        del argv[i : i + 2]
    parse = pretrain_apt.config_from_args

    def config_from_args(args):
        cfg = parse(args)
        return cfg if eps is None else cfg.replace(optim=dataclasses.replace(cfg.optim, eps=eps))

    pretrain_apt.config_from_args = config_from_args
    code = pretrain_apt.main(argv)
    if code == 0:  # on every rank, for run_launcher's count
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(f"{MARKER} rank={rank}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
