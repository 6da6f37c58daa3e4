"""Analytic per-GPU memory and step-time plan of a training run (``tools/plan_memory.py``).

Nothing is built or allocated. The model family gives its terms (:class:`FamilyMemory`,
found through the family registry: ``family_of(cfg).memory``): parameters per TP rank from
its architecture, activations from an inventory of the tensors its blocks save for backward,
its FLOPs (the MMDiT's: ``models/mmdit/memory.py``, Wan2.1's: ``models/wan/memory.py``).
The rest below (static memory, recompute, the APT phases, step time) holds for every family.
Bytes are per GPU (one rank).

**Static memory** (per trained network; ``DP`` below = the group ZeRO shards over, which is
DeepSpeed's data-parallel group: data parallel x context parallel, as in the trainer):

* weights: model dtype (2 B bf16 / 4 B fp32); tensor-parallel linears divided by TP; ZeRO-3
  divides them by DP (plus, as workspace, two gathered blocks: the one running and the
  prefetched one);
* gradients: model dtype, divided by DP at ZeRO >= 2; with bf16 DeepSpeed also keeps fp32
  gradients of the optimizer's partition (4 B/param, divided by DP at ZeRO >= 1);
* optimizer: RMSprop 1 fp32 state per parameter (AdamW 2), plus fp32 master weights with bf16;
  divided by DP at ZeRO >= 1;
* EMA of the trained generator: a fp32 copy, divided by DP at ZeRO-3 (``engine/ema.py``).

Frozen parameters (the discriminator's output layer and blocks after its last head) are
stored but get neither gradients nor optimizer states.

**Activations**: the family's pass inventory (held and peak bytes of one pass with
gradients) plus its backward workspace (gradients alive on top of the saved tensors in a
block's backward). A recomputed block keeps only its inputs; with recompute the peak is taken
when a recomputed block holds its full set again (earlier blocks still held, later ones freed).

APT: the D phase runs D on ``[real; fake; real + sigma eps]`` (3x the micro-batch) with G
without gradients; the G phase runs G and D (frozen, gradient to its input) on the micro-batch;
the activation term is the larger of the two phases.

**Step time** = FLOPs of one update / (GPUs x peak x utilization), forward = ``forward_flops``,
forward + backward = 3x, backward without weight gradients (frozen D in the G phase) = 1x,
recompute adds one forward of the recomputed blocks per backward. One APT update =
``d_updates`` D updates (G forward on B, D forward + backward on 3B) + one G update (G forward +
backward, D forward + input backward), each over the global batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_apt.config.flops import default_head_layers, visual_tokens
from megatron_apt.config.training import parse_recompute_layers

GIB = 2**30
H100_PEAK_TFLOPS = {"bf16": 989.4, "fp32": 494.7}  # dense; fp32 = TF32 tensor cores
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
OPTIMIZER_STATES = {"rmsprop": 1, "adamw": 2}


@dataclass(kw_only=True)
class MemoryPlanInput:
    """What a plan is made for. Latent sizes are in latent units (after the VAE)."""

    model: Any  # the config of a registered family (MMDiTConfig, WanConfig)
    stage: str = "apt"  # apt | diffusion | consistency
    frames: int = 1
    height: int = 128
    width: int = 128
    text_len: int = 256
    micro_batch: int = 1
    global_batch: int | None = None  # for the step time; None = micro x DP
    gpus: int = 1
    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 3
    dtype: str = "bf16"  # bf16 | fp32
    optimizer: str = "rmsprop"
    recompute: str | Sequence[int] | None = "none"
    ema: bool = True
    d_updates: int = 1
    head_layers: tuple[int, ...] | None = None
    utilization: float = 0.4
    peak_tflops: float | None = None  # per GPU; None = H100 dense for the dtype

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.cp)

    def validate(self) -> None:
        if self.stage not in ("apt", "diffusion", "consistency"):
            raise ValueError(f"stage={self.stage!r}: choose apt, diffusion or consistency")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {sorted(DTYPE_BYTES)}")
        if self.optimizer not in OPTIMIZER_STATES:
            raise ValueError(
                f"optimizer={self.optimizer!r}: choose one of {sorted(OPTIMIZER_STATES)}"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage}: DeepSpeed ZeRO stages are 0-3")
        for name in ("frames", "height", "width", "micro_batch", "gpus", "tp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.text_len < 0:
            raise ValueError(f"text_len={self.text_len} must be >= 0")
        if self.gpus % (self.tp * self.cp):
            raise ValueError(f"gpus={self.gpus} is not divisible by tp={self.tp} x cp={self.cp}")
        heads = self.model.num_heads
        if heads % (self.tp * self.cp):
            raise ValueError(
                f"num_heads={heads} is not divisible by tp={self.tp} x cp={self.cp} (each rank "
                f"holds whole heads: TP splits them, Ulysses CP too); TP x CP must be one of "
                f"{tp_cp_products(heads)}"
            )
        if self.model.ffn_hidden_size % self.tp:
            raise ValueError(
                f"ffn width {self.model.ffn_hidden_size} is not divisible by tp={self.tp} "
                f"(megatron splits fc1's rows evenly); TP must be one of {valid_tp(self.model)}"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tp > 1")
        if not 0.0 < self.utilization <= 1.0:
            raise ValueError(f"utilization={self.utilization} must lie in (0, 1]")
        pt, ph, pw = self.model.patch_size
        if self.frames % pt or self.height % ph or self.width % pw:
            raise ValueError(
                f"latent {self.frames}x{self.height}x{self.width} is not divisible by the patch "
                f"size {self.model.patch_size}"
            )


def tp_cp_products(num_heads: int) -> list[int]:
    """The TP x CP products a model with ``num_heads`` attention heads allows (its divisors:
    every rank holds whole heads)."""
    return [k for k in range(1, num_heads + 1) if num_heads % k == 0]


def valid_tp(cfg: Any) -> list[int]:
    """The TP sizes a model builds with: divisors of its head count and of its FFN width."""
    heads, ffn = cfg.num_heads, cfg.ffn_hidden_size
    return [k for k in tp_cp_products(heads) if ffn % k == 0]


def layout_rule(cfg: Any) -> str:
    """One line naming the TP / CP sizes ``cfg`` allows."""
    products = ", ".join(map(str, tp_cp_products(cfg.num_heads)))
    tps = ", ".join(map(str, valid_tp(cfg)))
    return (
        f"{cfg.num_heads} heads: TP x CP must divide them (TP x CP in {{{products}}}); TP must "
        f"also divide the FFN width {cfg.ffn_hidden_size} (TP in {{{tps}}})"
    )


@dataclass
class MemoryPlan:
    """Per-GPU bytes by component, and the step-time estimate."""

    inputs: dict
    components: dict[str, float] = field(default_factory=dict)
    activations_by_phase: dict[str, float] = field(default_factory=dict)
    visual_tokens: int = 0
    flops_per_update: float = 0.0
    step_time_s: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.components.values())

    def to_dict(self) -> dict:
        return {
            "inputs": self.inputs,
            "visual_tokens": self.visual_tokens,
            "bytes": dict(self.components),
            "total_bytes": self.total,
            "total_gib": self.total / GIB,
            "activations_by_phase_bytes": dict(self.activations_by_phase),
            "flops_per_update": self.flops_per_update,
            "step_time_s": self.step_time_s,
        }


# ------------------------------------------------------------------------------------------
# Parameters and activations: what every family's terms share
# ------------------------------------------------------------------------------------------


def _lin(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def head_parameters(d: int, tp: int, nheads: int) -> int:
    """Parameters on one TP rank of D's ``nheads`` cross-attention heads of width ``d`` and
    the final LayerNorm + linear over their concatenated tokens (``models/discriminator.py``,
    any backbone family)."""
    head_split = _lin(d, d) + 2 * d * d + d * d  # q, kv (no bias), out weight
    head_repl = d + 2 * d + 2 * d + d  # query, two LayerNorms, out bias
    return nheads * (head_split // tp + head_repl) + 2 * d * nheads + _lin(d * nheads, 1)


@dataclass(frozen=True)
class _Layout:
    m: int  # model dtype bytes
    tp: int
    cp: int
    sp: bool

    def seq(self, nbytes: float) -> float:  # sequence-parallel region
        return nbytes / (self.cp * (self.tp if self.sp else 1))

    def par(self, nbytes: float) -> float:  # tensor-parallel region
        return nbytes / (self.cp * self.tp)


# ------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------


def _static(n_stored: int, n_trained: int, inp: MemoryPlanInput, dp: int) -> dict[str, float]:
    m = DTYPE_BYTES[inp.dtype]
    z = inp.zero_stage
    weights = n_stored * m / (dp if z >= 3 else 1)
    grads = n_trained * m / (dp if z >= 2 else 1)
    if inp.dtype == "bf16":  # fp32 gradient accumulation (engine/ds_config.py grad_accum_dtype)
        # ZeRO-1 is then DeepSpeed's BF16_Optimizer, whose fp32 accumulation buffer holds the
        # whole model on every rank (deepspeed 0.19.8 runtime/bf16_optimizer.py line 191);
        # ZeRO-2/3 accumulate into this rank's fp32 partition
        grads += n_trained * 4 / (dp if z >= 2 else 1)
    states = OPTIMIZER_STATES[inp.optimizer] + (1 if inp.dtype == "bf16" else 0)  # + master
    optim = n_trained * 4 * states / (dp if z >= 1 else 1)
    return {"weights": weights, "grads": grads, "optimizer": optim}


@dataclass(frozen=True)
class FamilyMemory:
    """What the planner needs to know of one model family: its parameter counts per TP rank,
    its activation inventory and its FLOPs. Each family keeps its terms next to its model
    (``models/mmdit/memory.py``, ``models/wan/memory.py``; config/ must not import models/)
    and they are found through the family registry:
    ``megatron_apt.models.families.family_of(cfg).memory``."""

    name: str
    model_parameters: Callable[[Any, int], tuple[int, int]]  # (cfg, tp) -> (local, total)
    # (cfg, tp, head_layers) -> (stored, trainable) of D on one TP rank
    discriminator_parameters: Callable[[Any, int, Sequence[int]], tuple[int, int]]
    # (cfg, n_visual, n_text, batch, layout, recompute, blocks=None, output_layer=True,
    #  heads=()) -> (held, peak) of one pass with gradients
    pass_activation_bytes: Callable[..., tuple[float, float]]
    backward_workspace: Callable[[Any, int, int, _Layout], float]
    largest_block: Callable[[Any, int], float]  # (cfg, tp) -> parameters of a block on a rank
    # (cfg, phase, n_visual, n_text, recompute, head_layers) -> FLOPs per sample
    phase_flops: Callable[..., float]
    check: Callable[[MemoryPlanInput], None] = lambda inp: None  # family-specific limits
    vae: tuple[int, int, int] = (1, 8, 8)  # the family's VAE compression (t, h, w)
    text_len: int = 256  # its text encoder's tokens
    notes: tuple[str, ...] = ()  # printed in the header of a plan


def _family(cfg: Any, family: FamilyMemory | None) -> FamilyMemory:
    if family is not None:
        return family
    from megatron_apt.models.families import family_of  # config/ imports models/ lazily

    return family_of(cfg).memory


def plan_memory(inp: MemoryPlanInput, family: FamilyMemory | None = None) -> MemoryPlan:
    """The per-GPU memory and step-time plan of ``inp`` (see the module docstring); ``family``:
    the model family's terms (None: the registry's, ``family_of(inp.model).memory``)."""
    inp.validate()
    cfg = inp.model
    fam = _family(cfg, family)
    fam.check(inp)
    recompute = parse_recompute_layers(inp.recompute, cfg.num_layers)
    m = DTYPE_BYTES[inp.dtype]
    lay = _Layout(m=m, tp=inp.tp, cp=inp.cp, sp=inp.sequence_parallel)
    shards = max(1, inp.dp) * inp.cp  # ZeRO shards over DeepSpeed's DP x CP group
    n_vis = visual_tokens(cfg, inp.frames, inp.height, inp.width)
    n_txt = inp.text_len
    split = inp.cp * (inp.tp if inp.sequence_parallel else 1)
    if n_txt % split:
        n_txt += split - n_txt % split  # padded text tokens (as MMDiT.embed, WanDiT.embed)
    b = inp.micro_batch
    comp: dict[str, float] = {}
    g_local, _ = fam.model_parameters(cfg, inp.tp)
    g_static = _static(g_local, g_local, inp, shards)
    comp["g_weights"] = g_static["weights"]
    phases: dict[str, float] = {}
    g_pass = fam.pass_activation_bytes(cfg, n_vis, n_txt, b, lay, recompute)
    workspace = fam.backward_workspace
    if inp.stage == "apt":
        heads = tuple(inp.head_layers or default_head_layers(cfg.num_layers))
        d_stored, d_trained = fam.discriminator_parameters(cfg, inp.tp, heads)
        d_static = _static(d_stored, d_trained, inp, shards)
        comp["d_weights"] = d_static["weights"]
        if inp.ema:
            comp["g_ema"] = g_local * 4 / (shards if inp.zero_stage >= 3 else 1)
        comp["grads"] = g_static["grads"] + d_static["grads"]
        comp["optimizer"] = g_static["optimizer"] + d_static["optimizer"]
        last = max(heads)

        def d_pass(batch: int) -> tuple[float, float]:
            return fam.pass_activation_bytes(
                cfg, n_vis, n_txt, batch, lay, recompute, last, False, heads
            )

        d3 = d_pass(3 * b)
        d1 = d_pass(b)
        phases["d_phase"] = d3[1] + workspace(cfg, n_vis, 3 * b, lay)
        # G phase: D's backward first (G's activations all held), then G's own
        phases["g_phase"] = max(g_pass[0] + d1[1], g_pass[1]) + workspace(cfg, n_vis, b, lay)
    else:
        if inp.ema:
            comp["ema"] = g_local * 4 / (shards if inp.zero_stage >= 3 else 1)
        comp["grads"] = g_static["grads"]
        comp["optimizer"] = g_static["optimizer"]
        phases["train"] = g_pass[1] + workspace(cfg, n_vis, b, lay)
        if inp.stage == "consistency":  # teacher + EMA target, frozen, model dtype, no ZeRO
            comp["teacher_target"] = 2 * g_local * m
    comp["activations"] = max(phases.values())
    if inp.zero_stage == 3:  # two gathered blocks (running + prefetched)
        comp["zero3_gathered"] = 2 * fam.largest_block(cfg, inp.tp) * m
    plan = MemoryPlan(inputs=_inputs_dict(inp, recompute), components=comp)
    plan.inputs["family"] = fam.name
    plan.activations_by_phase = phases
    plan.visual_tokens = n_vis
    plan.flops_per_update = update_flops(inp, n_vis, n_txt, len(recompute), fam)
    peak = (inp.peak_tflops or H100_PEAK_TFLOPS[inp.dtype]) * 1e12
    plan.step_time_s = plan.flops_per_update / (inp.gpus * peak * inp.utilization)
    return plan


def update_flops(
    inp: MemoryPlanInput,
    n_vis: int,
    n_txt: int,
    n_recompute: int,
    family: FamilyMemory | None = None,
) -> float:
    """FLOPs of one optimizer update (APT: one G update and its ``d_updates`` D updates) over
    the global batch, recompute included (per-sample phases: :func:`phase_flops`)."""
    cfg = inp.model
    fam = _family(cfg, family)
    gb = inp.global_batch or inp.micro_batch * max(1, inp.dp)

    def per_sample(phase: str) -> float:
        return fam.phase_flops(cfg, phase, n_vis, n_txt, n_recompute, inp.head_layers)

    if inp.stage in ("diffusion", "consistency"):
        return gb * per_sample(inp.stage)
    return gb * (inp.d_updates * per_sample("apt_d") + per_sample("apt_g"))


def _inputs_dict(inp: MemoryPlanInput, recompute: tuple[int, ...]) -> dict:
    d = {
        f.name: getattr(inp, f.name)
        for f in dataclasses.fields(inp)
        if f.name not in ("model", "recompute")
    }
    d["recompute_blocks"] = len(recompute)
    d["dp"] = inp.dp
    return d
