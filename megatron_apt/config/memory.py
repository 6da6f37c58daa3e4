"""Analytic per-GPU memory and step-time plan of a training run (``tools/plan_memory.py``).

Nothing is built or allocated: weights come from :func:`count_parameters`, activations from
an inventory of the tensors each MMDiT block saves for backward, FLOPs from
:func:`forward_flops`. Bytes are per GPU (one rank). These are the MMDiT's terms
(:data:`MMDIT_MEMORY`); another family gives its own (:class:`FamilyMemory`; Wan2.1's:
``models/wan/memory.py``) through the family registry, and the rest below (static memory,
recompute, the APT phases, step time) holds for every family.

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

**Activations** (local layer spec, flash/SDPA attention that keeps no ``S x S`` matrix): per
token the bytes below, read off ``models/mmdit.py`` (``m`` = model dtype bytes, ``d`` hidden,
``f`` MLP width, ``nh`` heads); each tensor counted once even when several ops save it:

* every stream: block input ``d m`` (LayerNorm), LN output ``d m`` (modulate), modulated
  input ``d m`` (QKV linear), LN mean/rstd ``8``;
* RMS QK-norm: fp32 model: the QKV output ``3d 4`` (q/k views), ``x rsqrt(...)`` ``2d 4`` and
  rsqrt ``2 nh 4``; bf16 model: the fp32 copies of q and k ``2d 4``, ``x rsqrt`` ``2d 4``,
  rsqrt ``2 nh 4``;
* 3-D RoPE: nothing per token (autograd keeps only the cos/sin tables, which need no
  gradient);
* joint attention (both streams' tokens): q, k, v ``3d m``, output ``d m`` and log-sum-exp
  ``nh 4`` (kept by the kernel; the out-projections keep views of the same output; a kernel
  whose output layout needs a copy before the projection adds ``d m``, and so does context
  parallelism: the projections keep the output of the inverse all-to-all);
* full (not context-pre-only) stream after attention: out-projection ``d m`` (gate), the
  residual ``d m`` (LayerNorm 2) and its mean/rstd ``8``, LN output ``d m``, modulated input
  ``d m`` (fc1), fc1 output ``f m`` (GELU), GELU output ``f m`` (fc2), fc2 output ``d m``
  (gate).

Outside the blocks: patchified input (fp32, ``patch_dim 4``) and text input (``text_dim m``);
the output layer keeps its input, LN output and modulated input (``3d m``); each
discriminator head keeps its LN output and k/v (``3d m``) plus the deepest features ``d m``.
Under tensor parallelism the attention/MLP tensors (QKV, norms, RoPE, attention, fc1/GELU)
are divided by TP, the rest only with sequence parallelism; context parallelism divides all
of them by CP. A recomputed block keeps only its inputs (visual and text tokens); during the
backward one recomputed block holds its full set again.

The **backward workspace** is the gradients alive on top of the saved tensors in a block's MLP
backward (``f + 2d`` per visual token, model dtype, plus one ``d x f`` weight gradient). With
recompute the peak is taken when a recomputed block holds its full set again (earlier blocks
still held, later ones freed).
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

from megatron_apt.config.flops import (
    default_head_layers,
    phase_flops,
    visual_tokens,
)
from megatron_apt.config.model import MMDiTConfig, count_parameters
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
# Parameters
# ------------------------------------------------------------------------------------------


def _lin(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def tp_split_parameters_per_block(cfg: MMDiTConfig, pre_only: bool) -> int:
    """Parameters of one block held as tensor-parallel shards (the rest is replicated): the
    QKV and fc1 weights and biases, the out-projection and fc2 weights (their biases are
    replicated)."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    full = _lin(d, 3 * d) + d * d + _lin(d, f) + f * d
    return full + (_lin(d, 3 * d) if pre_only else full)


def _pre_only(cfg: MMDiTConfig, i: int) -> bool:
    """Whether block ``i`` (1-based) has a context-pre-only text stream."""
    return cfg.context_pre_only_last and i == cfg.num_layers


def _block_local(cfg: MMDiTConfig, i: int, tp: int) -> int:
    """Parameters of block ``i`` (1-based) on one TP rank."""
    total = count_parameters(cfg).per_block[i - 1]
    split = tp_split_parameters_per_block(cfg, _pre_only(cfg, i))
    return total - split + split // tp


def model_parameters(cfg: MMDiTConfig, tp: int) -> tuple[int, int]:
    """(parameters on one TP rank, TP=1 total) of the MMDiT."""
    pc = count_parameters(cfg)
    blocks = sum(_block_local(cfg, i, tp) for i in range(1, cfg.num_layers + 1))
    return pc.embed + blocks + pc.final, pc.total


def head_parameters(d: int, tp: int, nheads: int) -> int:
    """Parameters on one TP rank of D's ``nheads`` cross-attention heads of width ``d`` and
    the final LayerNorm + linear over their concatenated tokens (``models/discriminator.py``,
    any backbone family)."""
    head_split = _lin(d, d) + 2 * d * d + d * d  # q, kv (no bias), out weight
    head_repl = d + 2 * d + 2 * d + d  # query, two LayerNorms, out bias
    return nheads * (head_split // tp + head_repl) + 2 * d * nheads + _lin(d * nheads, 1)


def discriminator_parameters(
    cfg: MMDiTConfig, tp: int, head_layers: Sequence[int]
) -> tuple[int, int]:
    """(stored, trainable) parameters of D on one TP rank: backbone + cross-attention heads;
    the frozen part (output layer, blocks after the last head, that block's text
    out-projection and MLP) is stored but not trained."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    stored, _ = model_parameters(cfg, tp)
    stored += head_parameters(d, tp, len(head_layers))
    last = max(head_layers)
    frozen = count_parameters(cfg).final
    frozen += sum(_block_local(cfg, i, tp) for i in range(last + 1, cfg.num_layers + 1))
    if not _pre_only(cfg, last):  # text proj, fc1, fc2 of the last head's block
        frozen += (d * d + _lin(d, f) + f * d) // tp + 2 * d
    return stored, stored - frozen


# ------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------


def _stream_bytes(cfg: MMDiTConfig, m: int, pre_only: bool) -> tuple[float, float]:
    """(bytes per token in the sequence-parallel region, bytes per token in the tensor-parallel
    region) one stream of one block saves for backward, attention excluded."""
    d, f, nh = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_heads
    seq = 3 * d * m + 8  # block input, LN out, modulated (qkv input), LN mean/rstd
    tp = 0.0
    if cfg.qk_norm == "rms":
        if m == 4:
            tp += 3 * d * 4 + 2 * d * 4 + 2 * nh * 4  # qkv (q/k views), x*rsqrt, rsqrt
        else:
            tp += 2 * d * 4 + 2 * d * 4 + 2 * nh * 4  # fp32 q/k copies, x*rsqrt, rsqrt
    # RoPE keeps nothing per token: its products with the (gradient-free) cos/sin tables
    # save only the tables, one [N, head_dim] pair for all blocks.
    if not pre_only:
        seq += 5 * d * m + 8  # proj out, residual (+ LN2 stats), LN2 out, modulated, fc2 out
        tp += 2 * f * m  # fc1 out (GELU input), GELU out (fc2 input)
    return seq, tp


def _attention_bytes(cfg: MMDiTConfig, m: int, cp: int = 1) -> float:
    """Bytes per joint token kept by the attention (TP region): q, k, v, the output (which the
    out-projections of both streams save as views) and the log-sum-exp; under context
    parallelism the out-projections save the output after the inverse all-to-all, a second
    copy."""
    d, nh = cfg.hidden_size, cfg.num_heads
    return 3 * d * m + d * m + nh * 4 + (d * m if cp > 1 else 0)


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


def block_saved_bytes(
    cfg: MMDiTConfig, n_visual: int, n_text: int, batch: int, layout: _Layout, pre_only: bool
) -> float:
    """Bytes one block keeps for backward on one rank (without recompute)."""
    m = layout.m
    sv, tv = _stream_bytes(cfg, m, False)
    st, tt = _stream_bytes(cfg, m, pre_only)
    seq = n_visual * sv + n_text * st
    attn = _attention_bytes(cfg, m, layout.cp)
    par = n_visual * tv + n_text * tt + (n_visual + n_text) * attn
    return batch * (layout.seq(seq) + layout.par(par))


def block_input_bytes(cfg: MMDiTConfig, n_visual: int, n_text: int, batch: int, lay: _Layout):
    """Bytes a recomputed block keeps: its visual and text input tokens."""
    return batch * lay.seq((n_visual + n_text) * cfg.hidden_size * lay.m)


def pass_activation_bytes(
    cfg: MMDiTConfig,
    n_visual: int,
    n_text: int,
    batch: int,
    lay: _Layout,
    recompute: Sequence[int],
    blocks: int | None = None,
    output_layer: bool = True,
    heads: Sequence[int] = (),
) -> tuple[float, float]:
    """``(held, peak)`` of one model pass with gradients (embeddings, ``blocks`` blocks, the
    output layer or D's heads): the bytes kept from the forward for the backward, and the most
    that are alive during the backward, when a recomputed block holds its full set again while
    the tensors of everything after it are already freed."""
    d, m = cfg.hidden_size, lay.m
    blocks = cfg.num_layers if blocks is None else blocks
    held = batch * (n_visual * cfg.patch_dim * 4 + n_text * cfg.text_dim * m)  # embed inputs
    peak = 0.0
    for i in range(1, blocks + 1):
        full = block_saved_bytes(cfg, n_visual, n_text, batch, lay, _pre_only(cfg, i))
        if i in recompute:
            peak = max(peak, held + full)  # backward of block i: earlier blocks still held
            held += block_input_bytes(cfg, n_visual, n_text, batch, lay)
        else:
            held += full
    if output_layer:
        # LN input, LN out, modulated + stats, on this CP rank's tokens (gathered over TP)
        held += batch * n_visual * (3 * d * m + 8) / lay.cp
    if heads:
        # per head, on the gathered (full) visual tokens: the gathered features under SP, the
        # LN output and stats, k/v (split over TP); plus the deepest features, which no
        # further block keeps
        per_head = d * m + 8 + 2 * d * m / lay.tp + (d * m if lay.sp else 0)
        held += batch * n_visual * (len(heads) * per_head + (0 if lay.sp else d * m))
    return held, max(held, peak)


def backward_workspace(cfg: MMDiTConfig, n_visual: int, batch: int, lay: _Layout) -> float:
    """Gradients alive on top of the saved tensors in the backward of a block's MLP: the
    gradients of the fc1 and GELU outputs overlap by one ``f`` (each frees a saved ``f``
    tensor when its node finishes), plus the residual-stream gradient and the gate's input
    gradient (``2d``), per visual token; plus one weight gradient before it is accumulated
    into ``.grad`` (the largest, ``d x f``)."""
    d, f, m = cfg.hidden_size, cfg.ffn_hidden_size, lay.m
    per_token = lay.par(f * m * n_visual) + lay.seq(2 * d * m * n_visual)
    return batch * per_token + d * f * m / lay.tp


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
    its activation inventory and its FLOPs, with the signatures of this module's MMDiT
    functions (:data:`MMDIT_MEMORY`). Other families keep theirs next to their model
    (``models/wan/memory.py``; config/ must not import models/) and are found through the
    family registry: ``megatron_apt.models.families.family_of(cfg).memory``."""

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


MMDIT_MEMORY = FamilyMemory(
    name="mmdit",
    model_parameters=model_parameters,
    discriminator_parameters=discriminator_parameters,
    pass_activation_bytes=pass_activation_bytes,
    backward_workspace=backward_workspace,
    largest_block=lambda cfg, tp: max(count_parameters(cfg).per_block) / tp,
    phase_flops=phase_flops,
)


def _family(cfg: Any, family: FamilyMemory | None) -> FamilyMemory:
    if family is not None:
        return family
    if isinstance(cfg, MMDiTConfig):
        return MMDIT_MEMORY
    raise ValueError(
        f"no memory terms for a {type(cfg).__name__}: pass the family's, "
        "megatron_apt.models.families.family_of(cfg).memory"
    )


def plan_memory(inp: MemoryPlanInput, family: FamilyMemory | None = None) -> MemoryPlan:
    """The per-GPU memory and step-time plan of ``inp`` (see the module docstring); ``family``:
    the model family's terms (None: the MMDiT's, which an MMDiT config needs no more than)."""
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
