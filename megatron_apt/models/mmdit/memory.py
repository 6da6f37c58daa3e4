"""The memory planner's terms for the MMDiT family (:class:`~megatron_apt.config.memory.
FamilyMemory`; ``tools/plan_memory.py`` finds them through the family registry).

Nothing is built: parameter counts from the architecture (:func:`count_parameters`), split
over TP as the model splits them (fused QKV and fc1 weights and biases, out-projection and fc2
weights; the rest replicated), activations from an inventory of the tensors each
:class:`~megatron_apt.models.mmdit.model.MMDiTBlock` saves for backward, FLOPs from
:func:`forward_flops`.

**Activations** (local layer spec, flash/SDPA attention that keeps no ``S x S`` matrix): per
token the bytes below, read off ``model.py`` (``m`` = model dtype bytes, ``d`` hidden,
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
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_apt.config.flops import phase_flops
from megatron_apt.config.memory import FamilyMemory, _Layout, _lin, head_parameters
from megatron_apt.models.mmdit.config import MMDiTConfig, count_parameters, forward_flops

# ------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------


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
# The family's entry
# ------------------------------------------------------------------------------------------


def mmdit_phase_flops(
    cfg: MMDiTConfig,
    phase: str,
    n_visual: int,
    n_text: int,
    recompute: int = 0,
    head_layers: Sequence[int] | None = None,
) -> float:
    """:func:`megatron_apt.config.flops.phase_flops` with the MMDiT's forward FLOPs."""
    return phase_flops(cfg, phase, n_visual, n_text, recompute, head_layers, forward_flops)


MMDIT_MEMORY = FamilyMemory(
    name="mmdit",
    model_parameters=model_parameters,
    discriminator_parameters=discriminator_parameters,
    pass_activation_bytes=pass_activation_bytes,
    backward_workspace=backward_workspace,
    largest_block=lambda cfg, tp: max(count_parameters(cfg).per_block) / tp,
    phase_flops=mmdit_phase_flops,
)
