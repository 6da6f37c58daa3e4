#!/usr/bin/env python
"""Train the three stages of APT: diffusion, consistency distillation, adversarial post-training.

Launch with ``deepspeed --hostfile HOSTFILE pretrain_apt.py ...``, ``torchrun`` or ``mpirun``.
A named recipe sets every hyper-parameter; Megatron-style flags override it:

    deepspeed --num_gpus 2 pretrain_apt.py --recipe tiny-apt --save runs/apt
    torchrun --nproc-per-node 8 pretrain_apt.py --recipe mmdit-8b-image-apt \\
        --data-path /data/shards --init-generator distilled.safetensors \\
        --init-discriminator diffusion.safetensors --save /ckpt/apt-image
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from megatron_apt.config.recipes import RECIPES, get_recipe
from megatron_apt.config.training import (
    COLLAPSE_ACTIONS,
    D_TIMESTEPS,
    LR_DECAYS,
    OPTIMIZERS,
    R1_NOISE_STDS,
    STAGES,
    TrainConfig,
    plan_batch,
    validate,
)
from megatron_apt.models.families import get_preset

# World size as the launchers announce it (torchrun/deepspeed, Open MPI, MPICH), read before
# any process group exists so that an impossible batch split fails before anything starts.
WORLD_SIZE_ENV = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a(
        "--recipe",
        default="tiny-apt",
        choices=sorted(RECIPES),
        help="named recipe (default tiny-apt: 2-layer models, synthetic data, seconds on a CPU)",
    )
    a("--stage", choices=STAGES, help="override the recipe's stage")
    a(
        "--model",
        help="model preset of any family: an MMDiT (tiny, demo, sd3.5-large, mmdit-8b, ...) or "
        "Wan (wan-debug, wan2.1-t2v-1.3b, wan2.1-t2v-14b); tools/plan_model.py --all lists them",
    )
    a("--layer-spec", help="local | te | te-fp8 | te-flash | auto")
    g = p.add_argument_group("parallelism")
    g.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        dest="tensor_parallel",
        help="TP size: heads and MLP split over this many ranks (inside a node)",
    )
    g.add_argument(
        "--sequence-parallel",
        action="store_true",
        default=None,
        help="split tokens over the TP group around norms and modulation",
    )
    g.add_argument(
        "--context-parallel-size",
        type=int,
        dest="context_parallel",
        help="CP size: tokens split over this many ranks, Ulysses all-to-all around attention "
        "(long videos); heads must divide by TP x CP",
    )
    g.add_argument(
        "--zero-stage",
        type=int,
        choices=(0, 1, 2, 3),
        help="DeepSpeed ZeRO stage of every engine (sharded over data parallel)",
    )
    g.add_argument(
        "--zero-init",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ZeRO-3: build G, D and the student under deepspeed.zero.Init, partitioned from "
        "the start (default on; --no-zero-init builds them whole on every rank first)",
    )
    g.add_argument(
        "--recompute-activations",
        action="store_const",
        const="all",
        dest="recompute_layers",
        help="recompute every MMDiT block's activations in backward (= --recompute-layers all)",
    )
    g.add_argument(
        "--recompute-layers",
        dest="recompute_layers",
        metavar="SPEC",
        help="blocks to recompute in backward: none | all | 1-based numbers and ranges, e.g. "
        "'1,2,5-8' (G's blocks and D's backbone; default: none)",
    )
    g.add_argument("--bf16", action="store_true", default=None, help="BF16 mixed precision")
    g.add_argument("--fp32", action="store_false", dest="bf16", help="train in fp32")
    g.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile each MMDiT block (regional; G, D's backbone, the student, teacher "
        "and target); falls back to eager with a message when compilation fails",
    )
    g.add_argument(
        "--deepspeed-config-g",
        help="JSON merged over the generator's (or single) engine config: ZeRO buckets, "
        "CPU offload (zero_optimization.offload_optimizer at ZeRO 1-3, offload_param at "
        "ZeRO-3), communication_data_type, ...; not the batch, clipping, precision, ZeRO "
        "stage or gradient accumulation dtype (fp32 under --bf16)",
    )
    g.add_argument("--deepspeed-config-d", help="JSON merged over the discriminator's config")
    b = p.add_argument_group("batch and schedule")
    b.add_argument("--micro-batch-size", type=int)
    b.add_argument("--global-batch-size", type=int, help="= micro x accumulation x DP")
    b.add_argument("--train-iters", type=int, help="optimizer updates (APT: G updates)")
    b.add_argument("--d-updates-per-iter", type=int, help="APT: D updates per G update")
    b.add_argument("--lr", type=float, help="learning rate (G and D unless --lr-d)")
    b.add_argument("--lr-d", type=float, help="discriminator learning rate")
    b.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="rmsprop (the paper's, alpha 0.9, no bias correction), adam (torch Adam with bias "
        "correction, no weight decay; --adam-betas 0 0.9 is the paper's 'equivalent' of "
        "RMSprop(alpha 0.9), whose first steps are ~3x larger) or adamw (pre-stages)",
    )
    b.add_argument(
        "--adam-betas",
        type=float,
        nargs=2,
        metavar=("B1", "B2"),
        help="betas of adam / adamw (default 0.9 0.99)",
    )
    b.add_argument("--optim-eps", type=float, help="optimizer epsilon (1e-8)")
    b.add_argument("--lr-warmup-iters", type=int, help="linear warm-up updates (0)")
    b.add_argument("--lr-decay", choices=LR_DECAYS, help="constant (paper) or cosine")
    b.add_argument("--ema-decay", type=float, help="EMA decay of the trained model (0.995)")
    b.add_argument("--seed", type=int, help="seed of weights, data order and all noise")
    s = p.add_argument_group("stage hyper-parameters")
    s.add_argument("--shift", type=float, help="APT: D timestep shift s (1 images, 12 video)")
    s.add_argument("--r1-lambda", type=float, help="weight of the approximated R1 (100)")
    s.add_argument("--r1-sigma", type=float, help="0.01 images, 0.1 videos")
    s.add_argument(
        "--r1-noise-std",
        choices=R1_NOISE_STDS,
        help="standard deviation of the R1 perturbation: sigma (default; exact-R1 weight "
        "lambda*sigma^2) or sqrt-sigma (the paper's N(x, sigma I) read as a variance; weight "
        "lambda*sigma)",
    )
    s.add_argument(
        "--d-timesteps",
        choices=D_TIMESTEPS,
        help="APT: D's timestep per sample: ensemble (default, t = shift(u, s)) or zero "
        "(always t = 0: the section 3.3 ablation), in both the D and G phases",
    )
    s.add_argument(
        "--d-head-layers",
        metavar="SPEC",
        help="APT: blocks (1-based) after which D's heads read tokens: 'last' (one head on "
        "the last block: the section 5.2 ablation) or numbers like '2,4' (default: the "
        "paper's 16, 26, 36 of 36 as fractions of the depth)",
    )
    s.add_argument(
        "--freeze-discriminator",
        action="store_true",
        default=None,
        help="APT control run: D keeps its initialization (diffusion backbone + fresh heads); "
        "its phase only computes and logs its metrics, G trains against the frozen D",
    )
    s.add_argument(
        "--d-warmup-iters",
        type=int,
        help="APT: the first N updates train D only (G and its EMA wait; they count towards "
        "--train-iters): D's heads start random, and a G following a random D learns noise (0)",
    )
    s.add_argument("--guidance-scale", type=float, help="consistency teacher CFG (7.5)")
    s.add_argument(
        "--cond-dropout",
        type=float,
        help="diffusion: share of samples trained on the negative prompt, for CFG (0)",
    )
    h = p.add_argument_group(
        "discriminator health (APT): balanced accuracy = (d_acc_real + d_acc_fake) / 2 per log step"
    )
    h.add_argument(
        "--on-collapse",
        choices=COLLAPSE_ACTIONS,
        help="when D saturates or goes blind: warn (default: one WARNING line, training goes "
        "on), stop (exit code 3, nothing more saved; names the last healthy checkpoint) or "
        "rollback (reload the newest checkpoint saved healthy before the streak began, learning "
        "rates x --rollback-lr-factor, go on; needs --save and --save-interval)",
    )
    h.add_argument(
        "--collapse-patience",
        type=int,
        help="D saturated: this many consecutive log steps with balanced accuracy >= "
        "--saturated-acc and loss_d < --saturated-loss-d (3)",
    )
    h.add_argument("--saturated-acc", type=float, help="saturation accuracy threshold (0.98)")
    h.add_argument("--saturated-loss-d", type=float, help="saturation loss_d threshold (0.05)")
    h.add_argument(
        "--blind-patience",
        type=int,
        help="D blind: this many consecutive log steps with balanced accuracy within 0.5 +- "
        "--blind-margin (20)",
    )
    h.add_argument("--blind-margin", type=float, help="blindness margin around 0.5 (0.03)")
    h.add_argument(
        "--rollback-lr-factor",
        type=float,
        help="every engine's learning rate x this at each rollback, cumulative, kept across "
        "resumes (0.5)",
    )
    h.add_argument("--max-rollbacks", type=int, help="rollbacks before the run stops (3)")
    io = p.add_argument_group("data, init, checkpoints, logs")
    io.add_argument(
        "--data-path",
        help="latent shards (tools/preprocess_data.py); default: synthetic latents made on the fly",
    )
    io.add_argument(
        "--init-generator",
        help="model file: diffusion weights (consistency stage) or distilled weights (apt stage)",
    )
    io.add_argument("--init-discriminator", help="model file of the ORIGINAL diffusion weights")
    io.add_argument("--save", help="checkpoint directory")
    io.add_argument("--load", help="resume from the latest checkpoint in this directory")
    io.add_argument("--save-interval", type=int)
    io.add_argument(
        "--exit-signal-handler",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on SIGTERM/SIGINT (SLURM preemption, Ctrl-C), finish the update, save a "
        "checkpoint (with --save) and exit 0 (default: on; a second Ctrl-C stops at once)",
    )
    io.add_argument(
        "--distributed-timeout-minutes",
        type=float,
        help="how long a collective waits for a stalled rank before the job fails (30)",
    )
    io.add_argument(
        "--max-consecutive-skips",
        type=int,
        help="stop (exit code 4, nothing exported) after this many updates in a row skipped "
        "for non-finite losses (10; 0 = never)",
    )
    io.add_argument(
        "--exit-duration-in-mins",
        type=float,
        help="the same once this many minutes have passed (set it below the job's time limit)",
    )
    io.add_argument("--log-interval", type=int)
    io.add_argument("--log-dir", help="metrics.jsonl and TensorBoard (default: --save)")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # deepspeed
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = get_recipe(args.recipe)
    top = {
        k: getattr(args, k)
        for k in (
            "stage",
            "layer_spec",
            "tensor_parallel",
            "context_parallel",
            "sequence_parallel",
            "zero_stage",
            "zero_init",
            "recompute_layers",
            "bf16",
            "compile",
            "micro_batch_size",
            "global_batch_size",
            "train_iters",
            "d_updates_per_iter",
            "ema_decay",
            "seed",
            "shift",
            "r1_lambda",
            "r1_sigma",
            "r1_noise_std",
            "d_timesteps",
            "d_head_layers",
            "freeze_discriminator",
            "d_warmup_iters",
            "guidance_scale",
            "cond_dropout",
            "init_generator",
            "init_discriminator",
            "save",
            "load",
            "save_interval",
            "exit_signal_handler",
            "exit_duration_in_mins",
            "max_consecutive_skips",
            "distributed_timeout_minutes",
            "log_interval",
            "log_dir",
            "deepspeed_config_g",
            "deepspeed_config_d",
        )
        if getattr(args, k, None) is not None
    }
    if args.model:
        top["model"] = get_preset(args.model)
    optim = {
        field: value
        for field, value in (
            ("lr", args.lr),
            ("lr_d", args.lr_d),
            ("name", args.optimizer),
            ("eps", args.optim_eps),
            ("warmup_iters", args.lr_warmup_iters),
            ("decay", args.lr_decay),
            ("adam_betas", tuple(args.adam_betas) if args.adam_betas else None),
        )
        if value is not None
    }
    if optim:
        top["optim"] = dataclasses.replace(cfg.optim, **optim)
    health = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cfg.health)
        if getattr(args, f.name, None) is not None
    }
    if health:
        top["health"] = dataclasses.replace(cfg.health, **health)
    if args.data_path:
        top["data"] = dataclasses.replace(cfg.data, path=args.data_path)
    cfg = cfg.replace(**top)
    if cfg.log_dir is None and cfg.save:
        cfg = cfg.replace(log_dir=cfg.save)
    if args.stage and not args.recipe.endswith(args.stage):
        cfg = cfg.replace(recipe=f"{cfg.recipe}+stage={args.stage}")
    return cfg


def launcher_world_size() -> int:
    for key in WORLD_SIZE_ENV:
        if key in os.environ:
            return int(os.environ[key])
    return 1


def check_config(cfg: TrainConfig) -> None:
    """Every config error that needs no process group: ``ValueError`` naming the values."""
    validate(cfg)
    plan_batch(cfg, launcher_world_size())
    if cfg.save:
        probe_writable(Path(cfg.save))


def probe_writable(root: Path) -> None:
    """``--save`` must take files now, not at the first save after hours of training."""
    probe = root / f".write-probe-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--save {root}: cannot write there ({e.strerror or e})") from e


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=1))
            return 0
        check_config(cfg)
    except ValueError as e:  # user and config errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    from megatron_apt.parallel.state import configure_cuda_env

    note = configure_cuda_env(cfg.tensor_parallel)  # before CUDA starts
    if note and os.environ.get("RANK", "0") == "0":
        print(note, file=sys.stderr, flush=True)
    from megatron_apt.engine.recovery import TrainingStopped
    from megatron_apt.engine.trainer import Trainer
    from megatron_apt.testing.hooks import install_test_hooks

    try:  # init files and --load of another model / stage: named keys, nothing written
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("MEGATRON_APT_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    install_test_hooks(trainer)
    try:
        trainer.train()
    except TrainingStopped as e:  # collapse policy or preemption: on every rank alike
        if trainer.rank == 0:
            print(f"stopped: {e}", file=sys.stderr, flush=True)
        print(f"TRAINING-STOPPED rank={trainer.rank} step={trainer.step}", flush=True)
        import torch.distributed as dist

        dist.barrier()  # every rank has said so before a launcher tears the others down
        return e.exit_code
    if hasattr(trainer, "test_hook_finish"):
        trainer.test_hook_finish()
    # Every rank prints it: launch tests count one per process (a rank that died late shows).
    print(
        f"TRAINING-DONE rank={trainer.rank} stage={cfg.stage} steps={trainer.step} "
        f"skipped={trainer.skipped}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
