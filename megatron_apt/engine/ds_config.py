"""DeepSpeed config per role (generator / discriminator / single engine) from a TrainConfig.

What the paper fixes is set explicitly: RMSprop comes from us (client optimizer), no gradient
clipping (DeepSpeed defaults to 1.0), BF16 mixed precision with gradients accumulated over the
micro-batches of an update in fp32 (:func:`grad_accum_dtype`). A user JSON given with
``--deepspeed-config-{g,d}`` is merged over it; it may tune ZeRO buckets or offload the
optimizer (and, at ZeRO-3, the parameters) to CPU memory (:func:`check_offload`), but not change
the batch arithmetic, clipping, precision or gradient accumulation behind the recipe's back.
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
GRAD_ACCUM = ("data_types", "grad_accum_dtype")
# deprecated DeepSpeed spellings of offload (runtime/zero/config.py, deepspeed 0.19.8): refused by
# name so that check_offload sees every offload request under one key
DEPRECATED_OFFLOAD = {
    "cpu_offload": 'offload_optimizer: {"device": "cpu"}',
    "cpu_offload_param": 'offload_param: {"device": "cpu"}',
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


def grad_accum_dtype(cfg: TrainConfig, plan: BatchPlan) -> str | None:
    """The dtype DeepSpeed sums the micro-batch gradients of one update in: ``"fp32"``, or None
    (DeepSpeed's default, the model's dtype) for bf16 without ZeRO and one micro-batch per update.

    Without ``data_types.grad_accum_dtype`` DeepSpeed accumulates in the model's dtype
    (deepspeed 0.19.8 ``runtime/engine.py`` lines 1799-1810, ``get_data_types``): under bf16, 8
    (video recipe) to ~36 (image recipe) bf16 additions per update, each rounding the running
    sum to 8 bits of mantissa (docs/performance.md measures it). With ``"fp32"`` (same file):

    * ZeRO-0: refused by DeepSpeed (lines 2313-2323: bf16 weights with fp32 accumulation is an
      "unsupported mix" without ZeRO, ``NotImplementedError``); the bf16 wrapper it uses
      instead, ``FP16_UnfusedOptimizer``, sums in the bf16 ``param.grad`` and converts at the
      step (``runtime/fp16/unfused_optimizer.py`` line 222). So bf16 at ZeRO-0 is refused here
      with more than one micro-batch per update; with one there is nothing to accumulate.
    * ZeRO-1 (no optimizer offload): ``BF16_Optimizer`` (lines 2305-2310 -> 2363-2364 ->
      ``_configure_bf16_optimizer`` line 2628, ``grad_acc_dtype``): each backward adds the bf16
      gradients into a flat fp32 buffer of the full model on every rank
      (``runtime/bf16_optimizer.py`` lines 191 and 519-523; ``backward_prologue`` line 500
      clears the bf16 ones first). Its fp32 masters are linked to the parameters
      (``_hp_mapping``, line 344): ``MasterWeights``' ``fragment`` layout.
    * ZeRO-1 with optimizer offload, ZeRO-2: ``DeepSpeedZeroOptimizer`` (line 2703,
      ``gradient_accumulation_dtype``): each micro-batch's bf16 gradient is reduced over DP in
      its bucket and added into an fp32 buffer of this rank's partition
      (``runtime/zero/stage_1_and_2.py`` lines 1259-1266 ``_use_compact_grad_partition_buffer``,
      1268 its buffer, 1324-1326 and 1328-1345 the fp32 add) instead of the bf16
      ``grads_in_partition`` (lines 2192-2194) that ``param.grad`` points into.
    * ZeRO-3: ``DeepSpeedZeroOptimizer_Stage3`` (line 2782): the partitioned gradient buffer is
      allocated in this dtype (``runtime/zero/stage3.py`` lines 790-793) and each micro-batch's
      partition is added to it in this dtype (lines 2024-2036).
    """
    if not cfg.bf16 or cfg.zero_stage >= 1:
        return "fp32"
    if plan.accumulation > 1:
        raise ValueError(
            f"--bf16 --zero-stage 0 with {plan.accumulation} micro-batches per update: "
            "DeepSpeed 0.19.8 cannot accumulate bf16 gradients in fp32 without ZeRO "
            "(runtime/engine.py lines 2313-2323), and summing them in bf16 loses precision "
            "(docs/performance.md); use --zero-stage 1 (DeepSpeed's BF16_Optimizer: fp32 "
            "gradients and masters), or one micro-batch per update"
        )
    return None


def communication_dtype(cfg: TrainConfig) -> str | None:
    """The dtype of DeepSpeed's data-parallel gradient reduction: ``"fp32"`` for bf16 at ZeRO-1,
    None (DeepSpeed's default: the model's dtype, ``runtime/engine.py`` lines 1719-1730) else.

    At ZeRO-1 the engine all-reduces the update's fp32 sum once, at the boundary
    (``BF16_Optimizer.get_grads_for_reduction`` -> ``runtime/engine.py`` lines 3921-3932), and
    casts it to this dtype first (lines 3800-3801, ``allreduce_bucket``), even over one rank: in
    bf16 that rounds the fp32 sum to bf16 once more (docs/performance.md: 1.6e-3 relative error
    instead of 4e-10 to 4e-9 on one rank). fp32 doubles the bytes of that one all-reduce per update.
    At ZeRO-2/3 each micro-batch's bf16 gradient is reduce-scattered before its fp32 add, in
    bf16: on one rank exact, over several ranks one bf16 rounding of each micro-batch's sum
    over ranks (measured at DP 2: 3e-4 to 7e-4 relative, against 3e-3 to 6e-3 for bf16
    accumulation); fp32 there would double every micro-batch's gradient traffic, so it is left
    to a user JSON (``communication_data_type: "fp32"``)."""
    return "fp32" if cfg.bf16 and cfg.zero_stage == 1 else None


def check_grad_accum(user: dict, conf: dict, path: Path) -> None:
    """Refuse a user ``data_types.grad_accum_dtype`` other than the recipe's: bf16 would sum
    the micro-batches of an update in bf16 again, and fp32 at bf16 ZeRO-0 is what DeepSpeed
    refuses (:func:`grad_accum_dtype`)."""
    theirs, mine = _get(user, GRAD_ACCUM), _get(conf, GRAD_ACCUM)
    if theirs is not None and theirs != mine:
        raise ValueError(
            f"{path} sets data_types.grad_accum_dtype={theirs!r}, the recipe has {mine!r}: "
            "gradients are accumulated in fp32 under --bf16 (at ZeRO-0 with one micro-batch "
            "per update there is nothing to accumulate); remove the key"
        )


def _offload_device(zero: dict, key: str) -> str:
    device = (zero.get(key) or {}).get("device", "none")
    return "none" if device is None else str(device)


def check_offload(conf: dict, path: Path) -> None:
    """Allow ZeRO-Offload to CPU memory (``offload_optimizer`` at ZeRO 1-3, ``offload_param``
    at ZeRO-3) and let it take our client optimizer (RMSprop/Adam/AdamW stepping the fp32
    partition on the CPU); refuse what would be ignored or fail. ``conf`` is the merged config,
    changed in place.

    DeepSpeed 0.19.8 refuses a client optimizer under optimizer offload unless
    ``zero_force_ds_cpu_optimizer`` is false (``runtime/engine.py`` lines 2342-2346,
    ``_configure_optimizer``; the key defaults to true, ``runtime/constants.py`` line 42). It
    only decides that check, so it is set whenever the optimizer is offloaded."""
    zero = conf.get("zero_optimization") or {}
    for key, new in DEPRECATED_OFFLOAD.items():
        if key in zero:
            raise ValueError(f"{path}: zero_optimization.{key} is deprecated; use {new}")
    devices = {k: _offload_device(zero, k) for k in ("offload_optimizer", "offload_param")}
    for key, device in devices.items():
        if device not in ("none", "cpu"):
            raise ValueError(
                f"{path}: zero_optimization.{key}.device={device!r}: only 'cpu' (or 'none') is "
                "supported (NVMe offload needs DeepSpeed's async_io op and is untested here)"
            )
    stage = zero.get("stage", 0)
    if devices["offload_param"] == "cpu" and stage != 3:
        raise ValueError(
            f"{path}: zero_optimization.offload_param needs --zero-stage 3 (ZeRO-{stage} "
            "keeps whole parameters on every rank, DeepSpeed would ignore it)"
        )
    if devices["offload_optimizer"] != "cpu":
        return
    if stage == 0:
        raise ValueError(
            f"{path}: zero_optimization.offload_optimizer needs --zero-stage 1, 2 or 3 "
            "(without ZeRO DeepSpeed would ignore it)"
        )
    if conf.get("zero_force_ds_cpu_optimizer"):
        raise ValueError(
            f"{path}: zero_force_ds_cpu_optimizer=true refuses the recipe's client optimizer "
            "under optimizer offload (deepspeed 0.19.8 runtime/engine.py lines 2342-2346); "
            "remove it"
        )
    conf["zero_force_ds_cpu_optimizer"] = False


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
    accum = grad_accum_dtype(cfg, plan)
    if accum is not None:
        conf["data_types"] = {"grad_accum_dtype": accum}
    if comm := communication_dtype(cfg):
        conf["communication_data_type"] = comm
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
        check_grad_accum(user, conf, path)
        if "optimizer" in user or "scheduler" in user:
            raise ValueError(
                f"{path}: optimizer/scheduler come from the recipe (RMSprop), "
                "remove them from the DeepSpeed JSON"
            )
        conf = _merge(conf, user)
        check_offload(conf, path)
    return conf
