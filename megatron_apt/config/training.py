"""Training configuration of the three stages, its validation and the batch arithmetic.

A recipe (:mod:`megatron_apt.config.recipes`) is a function returning a :class:`TrainConfig`;
``pretrain_apt.py`` picks one with ``--recipe`` and overrides fields with Megatron-style flags.
Batch arithmetic:
``global_batch = micro_batch x accumulation x data_parallel`` (validated before anything
starts); data parallel = world size / (tensor parallel x context parallel).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_apt.config.flops import visual_tokens
from megatron_apt.config.fp8 import FP8_GEMM_COLS, FP8_GEMM_ROWS

STAGES = ("diffusion", "consistency", "apt")


OPTIMIZERS = ("rmsprop", "adam", "adamw")
LR_DECAYS = ("constant", "cosine")
# APT ablations (TrainConfig.r1_noise_std / d_timesteps; megatron_apt.stages.apt)
R1_NOISE_STDS = ("sigma", "sqrt-sigma")
D_TIMESTEPS = ("ensemble", "zero")
COLLAPSE_ACTIONS = ("warn", "stop", "rollback")


@dataclass(kw_only=True)
class DataConfig:
    """Training data: latent shards (``path``), or synthetic latents made on the fly."""

    path: str | None = None  # latent shards (tools/preprocess_data.py); None = synthetic
    frames: int = 1  # synthetic latent shape [C, frames, height, width]
    height: int = 8
    width: int = 8
    text_len: int = 8
    num_samples: int = 256  # synthetic data set size (an "epoch")


@dataclass(kw_only=True)
class OptimConfig:
    """The paper's APT optimizer is RMSprop (section 3.5). ``name="adamw"`` is for the
    pre-stages (diffusion pre-training, consistency distillation), which the paper leaves open
    and which converge far faster with Adam at toy scale.

    ``name="adam"`` (torch Adam, bias-corrected, no weight decay) with ``adam_betas=(0, 0.9)``
    is what the paper calls RMSprop(alpha 0.9) "equivalent" to. It is not the same in its first
    updates: torch's RMSprop has no bias correction, so with ``v_1 = (1 - alpha) g^2`` its first
    step is ``lr / sqrt(1 - alpha)`` ~ 3.16 lr on a constant gradient where Adam's is ``lr``
    (tests/unit/test_ablation_options.py); the two agree once ``alpha^t`` is small."""

    name: str = "rmsprop"  # rmsprop | adam | adamw
    lr: float = 5e-6
    lr_d: float | None = None  # discriminator lr; None = same as the generator's (paper)
    rmsprop_alpha: float = 0.9  # paper: RMSprop alpha 0.9 (Adam beta1 = 0, beta2 = 0.9)
    adam_betas: tuple[float, float] = (0.9, 0.99)  # adam and adamw
    eps: float = 1e-8
    weight_decay: float = 0.0  # paper: none
    grad_clip: float = 0.0  # paper: none (DeepSpeed's default of 1.0 is turned off)
    warmup_iters: int = 0  # linear warm-up over this many updates (paper: none)
    decay: str = "constant"  # constant (paper) | cosine (to min_lr_ratio x lr at the end)
    min_lr_ratio: float = 0.1


@dataclass(kw_only=True)
class HealthConfig:
    """Discriminator collapse detection at every log step (``megatron_apt.engine.health``) and
    what the run does when it fires (``megatron_apt.engine.recovery``). Balanced accuracy =
    ``(d_acc_real + d_acc_fake) / 2``; streaks count consecutive log steps."""

    on_collapse: str = "warn"  # warn | stop (exit code 3) | rollback (reload a healthy ckpt)
    saturated_acc: float = 0.98  # D saturated: balanced accuracy >= this ...
    saturated_loss_d: float = 0.05  # ... and loss_d (without R1) below this ...
    collapse_patience: int = 3  # ... for this many consecutive log steps
    blind_margin: float = 0.03  # D blind: balanced accuracy within 0.5 +- this ...
    blind_patience: int = 20  # ... for this many consecutive log steps
    rollback_lr_factor: float = 0.5  # every engine's lr x this per rollback (cumulative)
    max_rollbacks: int = 3  # then stop


def _default_model() -> Any:
    """The MMDiT's ``tiny`` preset (config/ imports models/ lazily)."""
    from megatron_apt.models.mmdit.config import get_preset

    return get_preset("tiny")


@dataclass(kw_only=True)
class TrainConfig:
    recipe: str = "custom"
    stage: str = "apt"
    # the model of any registered family (megatron_apt.models.families): an MMDiTConfig, a
    # WanConfig; serialized with its family's name ({"family": "wan", ...})
    model: Any = field(default_factory=_default_model)
    layer_spec: str = "local"
    # parallelism
    tensor_parallel: int = 1
    sequence_parallel: bool = False
    # Ulysses context parallelism: tokens split over this many ranks, attention heads
    # exchanged by all-to-all (long video sequences); gradients reduced over DP x CP
    context_parallel: int = 1
    zero_stage: int = 2
    zero_init: bool = True  # ZeRO-3: build the trained networks under deepspeed.zero.Init
    bf16: bool = False
    compile: bool = False  # torch.compile per MMDiT block (models/compile.py)
    # activation recompute: "none", "all", or 1-based block numbers "1,2,5-8" (every trained
    # MMDiT: diffusion model, consistency student, APT generator and discriminator backbone)
    recompute_layers: str = "none"
    # batch
    micro_batch_size: int = 2
    global_batch_size: int = 4
    train_iters: int = 10  # optimizer updates (APT: generator updates)
    d_updates_per_iter: int = 1  # APT: discriminator updates per generator update
    # optimizer, EMA
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema_decay: float = 0.995
    # stage hyper-parameters
    shift: float = 1.0  # APT: discriminator timestep shift s; diffusion: training shift
    r1_lambda: float = 100.0
    r1_sigma: float = 0.01
    # APT ablations. r1_noise_std: the R1 perturbation's standard deviation is sigma ("sigma",
    # default) or sqrt(sigma) ("sqrt-sigma": the paper's N(x, sigma I) read as a variance).
    r1_noise_std: str = "sigma"
    d_timesteps: str = "ensemble"  # D's t: "ensemble" shift(u, s) (paper) | "zero" (sec. 3.3)
    d_head_layers: str | None = None  # D's heads: None = paper fractions | "last" | "1,2,..."
    freeze_discriminator: bool = False  # D keeps its init (control run); G trains against it
    # APT: the first d_warmup_iters updates train D only (G and its EMA wait): D's heads start
    # random, and a G that follows a random D's gradient learns noise (measured: demo recipe)
    d_warmup_iters: int = 0
    health: HealthConfig = field(default_factory=HealthConfig)  # APT: collapse detector
    guidance_scale: float = 7.5  # consistency teacher CFG
    consistency_steps: int = 32
    target_ema_decay: float = 0.95
    timestep_sampling: str = "logit_normal"  # diffusion stage
    cond_dropout: float = 0.0  # diffusion: share of samples trained on the negative prompt (CFG)
    # data, init, io
    data: DataConfig = field(default_factory=DataConfig)
    init_generator: str | None = None  # consistency: teacher/student init; apt: G init
    init_discriminator: str | None = None  # apt: D backbone init (diffusion weights)
    seed: int = 1234
    save: str | None = None
    load: str | None = None
    save_interval: int = 0  # 0: only at the end
    # on SIGTERM/SIGINT: agree at the next update, save a checkpoint (with --save), exit 0
    exit_signal_handler: bool = True
    exit_duration_in_mins: float | None = None  # the same when this much wall time has passed
    max_consecutive_skips: int = 10  # non-finite updates in a row before stopping (0: never)
    distributed_timeout_minutes: float = 30.0  # how long a collective waits for a stalled rank
    log_interval: int = 1
    log_dir: str | None = None
    deepspeed_config_g: str | None = None  # JSON merged over the generated config
    deepspeed_config_d: str | None = None
    notes: str = ""

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = {"family": self.model.family, **d["model"]}  # as families.config_to_dict
        return d


# ------------------------------------------------------------------------------------------
# Batch arithmetic
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    accumulation: int
    data_parallel: int
    context_parallel: int = 1

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation * self.data_parallel

    @property
    def deepspeed_batch_size(self) -> int:
        """``train_batch_size`` as DeepSpeed counts it: its data-parallel group is DP x CP
        (every CP rank of a DP replica sees the same samples)."""
        return self.global_batch_size * self.context_parallel


def plan_batch(cfg: TrainConfig, world_size: int) -> BatchPlan:
    """Accumulation steps for ``cfg`` on ``world_size`` ranks; ``ValueError`` naming the values
    when the global batch cannot be reached exactly. Context-parallel ranks share samples, so
    data parallel = world / (TP x CP)."""
    mp = cfg.tensor_parallel * cfg.context_parallel
    if world_size % mp:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel={cfg.tensor_parallel}"
            f" x context_parallel={cfg.context_parallel}"
        )
    dp = world_size // mp
    per_step = cfg.micro_batch_size * dp
    if cfg.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} is not a multiple of micro_batch_size="
            f"{cfg.micro_batch_size} x data_parallel={dp} (= {per_step}); choose a global batch"
            f" of k x {per_step} or another micro batch"
        )
    return BatchPlan(
        cfg.micro_batch_size, cfg.global_batch_size // per_step, dp, cfg.context_parallel
    )


def lr_factor(optim: OptimConfig, step: int, total: int) -> float:
    """Multiplier of the base learning rate at optimizer update ``step`` (0-based) of ``total``:
    linear warm-up over ``warmup_iters``, then constant or cosine down to ``min_lr_ratio``."""
    f = min(1.0, (step + 1) / optim.warmup_iters) if optim.warmup_iters else 1.0
    if optim.decay == "cosine":
        span = max(1, total - optim.warmup_iters)
        progress = min(1.0, max(0.0, (step - optim.warmup_iters) / span))
        cos = 0.5 * (1.0 + math.cos(math.pi * progress))
        f *= optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cos
    return f


def parse_recompute_layers(
    spec: str | int | Sequence[int] | None, num_layers: int
) -> tuple[int, ...]:
    """The blocks to recompute in backward, as sorted 1-based block numbers.

    ``spec``: ``None`` or ``"none"`` (no recompute), ``"all"``, or block numbers counted from 1
    like ``return_layers`` and the discriminator's head layers: ``"1,3"``, ranges ``"1-4"``
    (inclusive), or a sequence of ints. ``ValueError`` names a malformed or out-of-range value.
    """
    if spec is None:
        return ()
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("", "none"):
            return ()
        if text == "all":
            return tuple(range(1, num_layers + 1))
        numbers: list[int] = []
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            try:
                a = int(lo)
                b = int(hi) if sep else a
            except ValueError:
                raise ValueError(
                    f"recompute_layers={spec!r}: use 'none', 'all' or 1-based block numbers "
                    f"and ranges like '1,3,5-8'"
                ) from None
            if b < a:
                raise ValueError(f"recompute_layers={spec!r}: range {part.strip()!r} is empty")
            numbers.extend(range(a, b + 1))
    else:
        numbers = [int(k) for k in spec]
    bad = sorted({k for k in numbers if not 1 <= k <= num_layers})
    if bad:
        raise ValueError(
            f"recompute_layers={spec!r}: block numbers {bad} outside 1..{num_layers} "
            f"(blocks are counted from 1)"
        )
    return tuple(sorted(set(numbers)))


def parse_head_layers(spec: str | Sequence[int] | None, num_layers: int) -> tuple[int, ...] | None:
    """The discriminator's head layers as 1-based block numbers, from ``d_head_layers``.

    ``None`` (or ``"paper"``): ``None``, i.e. the paper's layers 16, 26, 36 of 36 as fractions
    of other depths (:func:`megatron_apt.models.discriminator.default_head_layers`); ``"last"``:
    one head on the last layer only (section 5.2's ablation); ``"2,4"`` (or ints): heads after
    those blocks, in that order. ``ValueError`` naming the value when malformed, repeated or
    outside ``1..num_layers``.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "paper":
            return None
        if text == "last":
            return (num_layers,)
        try:
            layers = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise ValueError(
                f"d_head_layers={spec!r}: use 'last' or 1-based block numbers like '2,4'"
            ) from None
    else:
        layers = tuple(int(k) for k in spec)
    bad = sorted({k for k in layers if not 1 <= k <= num_layers})
    if not layers or bad:
        raise ValueError(
            f"d_head_layers={spec!r}: block numbers {bad} outside 1..{num_layers} (the model's "
            "num_layers; blocks are counted from 1)"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"d_head_layers={spec!r}: a block is named twice")
    return layers


def _validate_apt_options(cfg: TrainConfig) -> None:
    if cfg.r1_noise_std not in R1_NOISE_STDS:
        raise ValueError(f"r1_noise_std={cfg.r1_noise_std!r}: choose one of {R1_NOISE_STDS}")
    if cfg.d_timesteps not in D_TIMESTEPS:
        raise ValueError(f"d_timesteps={cfg.d_timesteps!r}: choose one of {D_TIMESTEPS}")
    parse_head_layers(cfg.d_head_layers, cfg.model.num_layers)
    if not 0 <= cfg.d_warmup_iters < cfg.train_iters:
        raise ValueError(
            f"d_warmup_iters={cfg.d_warmup_iters} must lie in [0, train_iters={cfg.train_iters})"
            " (the warm-up updates train D only and count towards train_iters)"
        )
    if cfg.stage != "apt":
        for name, default in (
            ("freeze_discriminator", False),
            ("d_head_layers", None),
            ("d_warmup_iters", 0),
        ):
            if getattr(cfg, name) != default:
                raise ValueError(
                    f"{name}={getattr(cfg, name)!r} applies to the apt stage only "
                    f"(stage={cfg.stage!r} has no discriminator)"
                )


def _validate_health(cfg: TrainConfig) -> None:
    h = cfg.health
    if h.on_collapse not in COLLAPSE_ACTIONS:
        raise ValueError(f"on_collapse={h.on_collapse!r}: choose one of {COLLAPSE_ACTIONS}")
    for name in ("collapse_patience", "blind_patience"):
        if getattr(h, name) < 1:
            raise ValueError(f"{name}={getattr(h, name)} must be >= 1 (log steps)")
    if not 0.5 < h.saturated_acc <= 1.0 or h.saturated_loss_d <= 0:
        raise ValueError(
            f"saturated_acc={h.saturated_acc} must lie in (0.5, 1] and saturated_loss_d="
            f"{h.saturated_loss_d} be > 0"
        )
    if not 0.0 <= h.blind_margin < 0.5:
        raise ValueError(f"blind_margin={h.blind_margin} must lie in [0, 0.5)")
    if not 0.0 < h.rollback_lr_factor <= 1.0:
        raise ValueError(f"rollback_lr_factor={h.rollback_lr_factor} must lie in (0, 1]")
    if h.max_rollbacks < 0:
        raise ValueError(f"max_rollbacks={h.max_rollbacks} must be >= 0")
    if h.on_collapse != "warn" and cfg.stage != "apt":
        raise ValueError(
            f"on_collapse={h.on_collapse!r} watches the discriminator: stage={cfg.stage!r} "
            "has none (use it with the apt stage)"
        )
    if h.on_collapse == "rollback" and not (cfg.save and cfg.save_interval > 0):
        raise ValueError(
            f"on_collapse='rollback' reloads a healthy checkpoint: it needs --save and "
            f"--save-interval > 0 (save={cfg.save!r}, save_interval={cfg.save_interval})"
        )


def _validate_kernels(cfg: TrainConfig) -> None:
    """What the layer spec's GPU kernels accept, checked before any GPU is touched."""
    parts = set(cfg.layer_spec.split("-")[1:]) if cfg.layer_spec.startswith("te") else set()
    if "flash" in parts and not cfg.bf16:
        raise ValueError(
            f"layer_spec={cfg.layer_spec!r} runs flash-attn, which takes fp16/bf16 only: add "
            "--bf16, or use layer_spec 'te' (TE attention) or 'local'"
        )
    if "fp8" not in parts:
        return
    m, tp = cfg.model, cfg.tensor_parallel
    split = cfg.context_parallel * (tp if cfg.sequence_parallel else 1)
    n_vis = visual_tokens(m, cfg.data.frames, cfg.data.height, cfg.data.width)
    rows = n_vis // split * cfg.micro_batch_size
    if rows % FP8_GEMM_ROWS:
        raise ValueError(
            f"layer_spec={cfg.layer_spec!r}: {n_vis} visual tokens of a {cfg.data.frames}x"
            f"{cfg.data.height}x{cfg.data.width} latent / {split} ranks that split them x "
            f"micro batch {cfg.micro_batch_size} = {rows} GEMM rows per rank, not divisible by "
            f"{FP8_GEMM_ROWS} as Transformer Engine's FP8 GEMMs need: change the latent size, "
            "the micro batch or the TP/CP layout, or use layer_spec 'te' (BF16). (Text is padded "
            "with masked tokens to the alignment by the model.)"
        )
    for name, width in (
        ("hidden_size", m.hidden_size),
        ("hidden_size / tensor_parallel", m.hidden_size // tp),
        ("ffn_hidden_size / tensor_parallel", m.ffn_hidden_size // tp),
    ):
        if width % FP8_GEMM_COLS:
            raise ValueError(
                f"layer_spec={cfg.layer_spec!r}: {name} = {width} is not divisible by "
                f"{FP8_GEMM_COLS}, the width Transformer Engine's FP8 GEMMs need"
            )


def _validate_optim(o: OptimConfig) -> None:
    if o.name not in OPTIMIZERS:
        raise ValueError(f"optimizer={o.name!r}: choose one of {OPTIMIZERS}")
    if o.decay not in LR_DECAYS:
        raise ValueError(f"lr decay={o.decay!r}: choose one of {LR_DECAYS}")
    if o.warmup_iters < 0:
        raise ValueError(f"warmup_iters={o.warmup_iters} must be >= 0")
    if o.eps <= 0 or o.lr <= 0:
        raise ValueError(f"lr={o.lr} and eps={o.eps} must be > 0")
    if len(o.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in o.adam_betas):
        raise ValueError(f"adam_betas={tuple(o.adam_betas)}: two betas in [0, 1)")
    if o.name == "adam" and o.weight_decay:
        raise ValueError(
            f"optimizer='adam' takes no weight decay (weight_decay={o.weight_decay}); "
            "use adamw for decoupled weight decay"
        )


def validate(cfg: TrainConfig) -> None:
    """Config errors that need no process group (raised before anything starts)."""
    parse_recompute_layers(cfg.recompute_layers, cfg.model.num_layers)
    if cfg.stage not in STAGES:
        raise ValueError(f"stage={cfg.stage!r}: choose one of {STAGES}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={cfg.zero_stage}: DeepSpeed ZeRO stages are 0-3")
    if not cfg.distributed_timeout_minutes > 0:
        raise ValueError(
            f"distributed_timeout_minutes={cfg.distributed_timeout_minutes} must be > 0"
        )
    if cfg.max_consecutive_skips < 0:
        raise ValueError(f"max_consecutive_skips={cfg.max_consecutive_skips} must be >= 0")
    if cfg.exit_duration_in_mins is not None and not cfg.exit_duration_in_mins > 0:
        raise ValueError(f"exit_duration_in_mins={cfg.exit_duration_in_mins} must be > 0")
    if cfg.tensor_parallel < 1 or cfg.context_parallel < 1:
        raise ValueError(
            f"tensor_parallel={cfg.tensor_parallel} and context_parallel={cfg.context_parallel}"
            " must be >= 1"
        )
    if cfg.model.num_heads % (cfg.tensor_parallel * cfg.context_parallel):
        raise ValueError(
            f"num_heads={cfg.model.num_heads} is not divisible by tensor_parallel="
            f"{cfg.tensor_parallel} x context_parallel={cfg.context_parallel} (each rank "
            "attends with whole heads)"
        )
    if cfg.sequence_parallel and cfg.tensor_parallel == 1:
        raise ValueError("sequence_parallel needs tensor_parallel > 1")
    for name in ("micro_batch_size", "global_batch_size", "train_iters", "d_updates_per_iter"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1")
    _validate_optim(cfg.optim)
    _validate_apt_options(cfg)
    _validate_health(cfg)
    _validate_kernels(cfg)
    if not 0.0 <= cfg.cond_dropout < 1.0:
        raise ValueError(f"cond_dropout={cfg.cond_dropout} must lie in [0, 1)")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"ema_decay={cfg.ema_decay} must lie in [0, 1)")
    if cfg.stage == "consistency" and cfg.init_generator is None and cfg.data.path:
        raise ValueError(
            "the consistency stage distils a teacher: pass --init-generator (the diffusion weights)"
        )
