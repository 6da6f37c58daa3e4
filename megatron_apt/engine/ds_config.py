"""DeepSpeed config per role (generator / discriminator / single engine) from a TrainConfig.

What the paper fixes is set explicitly: RMSprop comes from us (client optimizer), no gradient
clipping (DeepSpeed defaults to 1.0), BF16 mixed precision. A user JSON given with
``--deepspeed-config-{g,d}`` is merged over it; it may tune ZeRO buckets or offload but not
change the batch arithmetic or clipping behind the recipe's back.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from megatron_apt.config.training import BatchPlan, TrainConfig

PROTECTED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
# owned by the recipe (and recorded in trainer_state.json): a user JSON may repeat, not change them
RECIPE_OWNED = {
    ("gradient_clipping",): "a recipe (optim.grad_clip; the paper's recipes clip nothing)",
    ("bf16", "enabled"): "--bf16",
    ("fp16", "enabled"): "(fp16 is not supported: use --bf16)",
    ("zero_optimization", "stage"): "--zero-stage",
}


def _get(conf: dict, path: tuple[str, ...]):
    for k in path:
        if not isinstance(conf, dict) or k not in conf:
            return None
        conf = conf[k]
    return conf


def check_user_config(user: dict, conf: dict, path: Path) -> None:
    """Refuse what a user DeepSpeed JSON must not do: switch ``--load`` to DeepSpeed's
    universal-checkpoint loader, which unpickles checkpoint files with
    ``torch.load(weights_only=False)`` (deepspeed 0.19.8, checkpoint/deepspeed_checkpoint.py
    lines 136, 199, 207, 219; runtime/engine.py line 4434): a pickled payload there runs code;
    and change what the recipe owns behind its back (then trainer_state.json would record
    values not in effect)."""
    if _get(user, ("checkpoint", "load_universal")):
        raise ValueError(
            f"{path}: checkpoint.load_universal routes --load through DeepSpeed's universal "
            "checkpoint loader, which unpickles files with torch.load(weights_only=False) (code "
            "in a checkpoint would run); remove it (checkpoints of this project load weights-only)"
        )
    for key, flag in RECIPE_OWNED.items():
        mine, theirs = _get(conf, key), _get(user, key)
        if theirs is None:
            continue
        if key == ("fp16", "enabled") and theirs:
            raise ValueError(f"{path}: fp16.enabled is not supported: use --bf16")
        if key != ("fp16", "enabled") and theirs != mine:
            raise ValueError(
                f"{path} sets {'.'.join(key)}={theirs!r}, the recipe has {mine!r}: set it with "
                f"{flag} instead, so that trainer_state.json records what is in effect"
            )


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_deepspeed_config(cfg: TrainConfig, plan: BatchPlan, override: str | None = None) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=5e7)
    conf = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation,
        "train_batch_size": plan.deepspeed_batch_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(cfg.bf16)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if override:
        path = Path(override)
        try:
            user = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read DeepSpeed config {path}: {e}") from e
        bad = {k: user[k] for k in PROTECTED if k in user and user[k] != conf[k]}
        if bad:
            raise ValueError(
                f"{path} sets {bad}, which contradicts the batch plan (micro "
                f"{plan.micro_batch_size} x accumulation {plan.accumulation} x DP "
                f"{plan.data_parallel}); use --micro-batch-size/--global-batch-size instead"
            )
        check_user_config(user, conf, path)
        if "optimizer" in user or "scheduler" in user:
            raise ValueError(
                f"{path}: optimizer/scheduler come from the recipe (RMSprop), "
                "remove them from the DeepSpeed JSON"
            )
        conf = _merge(conf, user)
    return conf
