"""The memory planner's terms for the Wan2.1 family (:class:`~megatron_apt.config.memory.
FamilyMemory`; ``tools/plan_memory.py`` finds them through the family registry).

Nothing is built: parameter counts from the architecture, activations from an inventory of
the tensors :class:`~megatron_apt.models.wan.model.WanBlock` and
:class:`~megatron_apt.models.wan.model.WanDiT` keep for backward, read off ``model.py``
(``d`` width, ``f`` FFN width, ``nh`` heads, ``hd`` head width, ``m`` model dtype bytes;
"4d" is a fp32 tensor of width ``d``, which the fp32 islands keep whatever ``m`` is). Each
storage is counted once, however many ops save it (autograd packs views).

**Parameters per TP rank.** Split over TP (megatron's ``tensor_model_parallel``): the fused
QKV, the cross-attention's q and fused KV, fc1 (weights and biases), both out-projections and
fc2 (weights), and the four q/k RMSNorm weights (split with the heads: the norm runs across
heads with an all-reduced sum of squares). Replicated: the patch, text and time embeddings,
the shared time projection, the out-projection and fc2 biases, the per-block
``scale_shift_table``, the cross-attention LayerNorm and the output layer. TP must divide
``num_heads`` (whole heads per rank) and ``ffn_dim`` (megatron splits fc1's rows evenly):
TP in {1, 2, 4} for the 1.3B (12 heads, ffn 8960), {1, 2, 4, 8} for the 14B (40 heads,
ffn 13824).
The discriminator stores the whole backbone and its heads, and freezes the output layer and
the blocks after its last head (:meth:`WanDiT.unused_by_features`: the text tokens are not
updated by the blocks, so nothing of the last head's block is unused). The fp32 islands
(time embedder, modulation tables, cross-attention LayerNorm: 0.2 % of the 14B) are counted
in the model dtype, as ZeRO-3 stores them.

**Activations of one block, per visual token** (SEQ: the sequence-parallel region, divided
by TP under SP; PAR: the tensor-parallel region, always divided by TP):

* SEQ: the fp32 LayerNorm inputs (``x.float()``: a fp32 copy in bf16, the block input itself
  in fp32) and their mean/rstd (8 B) of the self-attention, cross-attention (with
  ``cross_attn_norm``) and FFN LayerNorms: ``3 x (4d + 8)``; the two modulated LayerNorm
  outputs (fp32, kept by ``* (1 + scale)``) ``2 x 4d``; the gated residuals' fp32 branch
  outputs (self-attention, FFN) ``2 x 4d``; the inputs of the QKV, cross-q and fc1 linears
  ``3 d m``.
* PAR: the fused QKV output ``3 d m`` (v is a view of it); the q/k RMSNorms' fp32 input and
  ``x * rsqrt`` (``2 x 4d`` each, three norms on visual tokens: self q, self k, cross q); the
  roped q and k ``2 d m``; the self-attention output ``d m`` (the out-projection keeps a view)
  and log-sum-exp ``nh 4``; the normed cross q ``d m``, the cross-attention output ``d m``
  and log-sum-exp ``nh 4``; fc1's output (GELU input) and GELU's output ``2 f m``.
* not split by TP: the RMSNorms' per-token ``rsqrt`` of the all-reduced sum (4 B each).

**Per text token and block** (PAR): the fused KV output ``2 d m``, the k RMSNorm ``2 x 4d``
and the normed k ``d m`` (+ 4 B rsqrt): cross-attention's K/V are per sample, over the text
tokens, not per visual token. **Per sample and block**: the fp32 modulation ``[6, d]`` and
the two ``1 + scale`` vectors (``8 x 4d``); in bf16 also the fp32 copies of the four RMSNorm
weights (``4 x 4d / TP``, once per block).

**Once per pass**: the patchified input (fp32, ``patch_dim 4``) on all visual tokens; the
umT5 input (``text_dim m``) and the text projection's hidden (``2 d m``) on all text tokens;
the projected text (``d m``, SEQ: shared by every block's KV linear); the time embedder (fp32)
and projection, per sample; the RoPE rotation (complex64 ``[N, hd/2]``: ``4 hd`` per visual
token, shared by every block and sample). The output layer keeps, on the gathered tokens, the
LayerNorm's fp32 input and stats, its output and the modulated input (``8d + 8 + d m``). Each
discriminator head keeps its LayerNorm output and stats (``d m + 8``) and k/v (``2 d m``,
split over TP) on the gathered tokens, plus the features it reads where no later block keeps
them (always under SP and in bf16, where the next block keeps a fp32 copy instead; the
deepest head's in any case), and per sample its query's projection, attention output and the
logit layer's inputs (a few ``d m``).

A recomputed block keeps only its visual input (``d m``, SEQ); text, modulation and RoPE are
kept once per pass anyway. ``WanDiT`` runs context-parallel (Ulysses; docs/wan.md), but this
inventory does not model CP yet (what each rank keeps of the all-to-all, the whole text per
rank): the planner refuses ``cp > 1`` for Wan rather than guess.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_apt.config.flops import default_head_layers, phase_flops
from megatron_apt.config.memory import FamilyMemory, MemoryPlanInput, _Layout, head_parameters
from megatron_apt.models.wan.config import WanConfig, count_parameters, forward_flops

# ------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------


def block_parameters(cfg: WanConfig) -> tuple[int, int]:
    """(split over TP, replicated) parameters of one block at TP=1."""
    d, f = cfg.hidden_size, cfg.ffn_dim
    self_attn = 3 * d * d + 3 * d + d * d + 2 * d  # qkv (w, b), out weight, q/k norm weights
    cross_attn = d * d + d + 2 * d * d + 2 * d + d * d + 2 * d  # q, kv (w, b), out w, norms
    ffn = d * f + f + f * d  # fc1 (w, b), fc2 weight
    replicated = 3 * d + 6 * d + (2 * d if cfg.cross_attn_norm else 0)  # 3 biases, table, LN
    return self_attn + cross_attn + ffn, replicated


def block_local(cfg: WanConfig, tp: int) -> int:
    """Parameters of one block on one TP rank."""
    split, replicated = block_parameters(cfg)
    return split // tp + replicated


def final_parameters(cfg: WanConfig) -> int:
    """The output layer: projection + its (shift, scale) table (replicated)."""
    d = cfg.hidden_size
    return d * cfg.out_patch_dim + cfg.out_patch_dim + 2 * d


def model_parameters(cfg: WanConfig, tp: int) -> tuple[int, int]:
    """(parameters on one TP rank, TP=1 total) of the :class:`WanDiT`."""
    total = count_parameters(cfg)
    split, _ = block_parameters(cfg)
    return total - cfg.num_layers * (split - split // tp), total


def discriminator_parameters(
    cfg: WanConfig, tp: int, head_layers: Sequence[int]
) -> tuple[int, int]:
    """(stored, trainable) parameters of D on one TP rank: the whole backbone and the heads;
    the output layer and the blocks after the last head are stored but frozen."""
    stored = model_parameters(cfg, tp)[0] + head_parameters(cfg.hidden_size, tp, len(head_layers))
    frozen = final_parameters(cfg) + (cfg.num_layers - max(head_layers)) * block_local(cfg, tp)
    return stored, stored - frozen


# ------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------


def visual_token_bytes(cfg: WanConfig, m: int) -> tuple[float, float, float]:
    """(SEQ, PAR, unsplit) bytes one block keeps per visual token (see the module docstring)."""
    d, f, nh = cfg.hidden_size, cfg.ffn_dim, cfg.num_heads
    norms = 3 if cfg.cross_attn_norm else 2  # fp32 LayerNorms with saved input and stats
    # without cross_attn_norm the cross-q linear keeps the residual stream itself (in 3 d m)
    seq = norms * (4 * d + 8) + 2 * 4 * d + 2 * 4 * d + 3 * d * m
    par = 3 * d * m + 3 * 2 * 4 * d + 2 * d * m + d * m + nh * 4 + d * m + d * m + nh * 4
    par += 2 * f * m
    return seq, par, 3 * 4


def text_token_bytes(cfg: WanConfig, m: int) -> tuple[float, float]:
    """(PAR, unsplit) bytes one block keeps per text token: KV output, k norm, normed k."""
    d = cfg.hidden_size
    return 2 * d * m + 2 * 4 * d + d * m, 4


def block_saved_bytes(
    cfg: WanConfig, n_visual: int, n_text: int, batch: int, lay: _Layout
) -> float:
    """Bytes one block keeps for backward on one rank (without recompute)."""
    seq, par, unsplit = visual_token_bytes(cfg, lay.m)
    t_par, t_unsplit = text_token_bytes(cfg, lay.m)
    per_sample = n_visual * (lay.seq(seq) + lay.par(par) + unsplit / lay.cp)
    per_sample += n_text * (lay.par(t_par) + t_unsplit / lay.cp)
    per_sample += 8 * 4 * cfg.hidden_size  # modulation [6, d] and two (1 + scale), fp32
    weights = 4 * 4 * cfg.hidden_size / lay.tp if lay.m != 4 else 0  # RMSNorm weight copies
    return batch * per_sample + weights


def block_input_bytes(cfg: WanConfig, n_visual: int, batch: int, lay: _Layout) -> float:
    """Bytes a recomputed block keeps: its visual input tokens (the text is shared)."""
    return batch * lay.seq(n_visual * cfg.hidden_size * lay.m)


def embed_bytes(cfg: WanConfig, n_visual: int, n_text: int, batch: int, lay: _Layout) -> float:
    """Bytes the embeddings keep once per pass (see the module docstring)."""
    d, m = cfg.hidden_size, lay.m
    per_sample = n_visual * cfg.patch_dim * 4 + n_text * (cfg.text_dim * m + 2 * d * m)
    per_sample += lay.seq(n_text * d * m)  # the projected text every block's KV linear keeps
    per_sample += cfg.freq_dim * 4 + 2 * d * 4 + 2 * d * m  # time embedder (fp32), projection
    rope = n_visual * cfg.head_dim * 4  # the rotation, complex64 [N, hd/2], for the whole batch
    return batch * per_sample + rope


def pass_activation_bytes(
    cfg: WanConfig,
    n_visual: int,
    n_text: int,
    batch: int,
    lay: _Layout,
    recompute: Sequence[int],
    blocks: int | None = None,
    output_layer: bool = True,
    heads: Sequence[int] = (),
) -> tuple[float, float]:
    """``(held, peak)`` of one pass with gradients (embeddings, ``blocks`` blocks, the output
    layer or D's heads), as :func:`megatron_apt.models.mmdit.memory.pass_activation_bytes`."""
    if lay.cp != 1:
        raise ValueError("the Wan memory inventory does not model context parallelism yet")
    d, m = cfg.hidden_size, lay.m
    blocks = cfg.num_layers if blocks is None else blocks
    held = embed_bytes(cfg, n_visual, n_text, batch, lay)
    full = block_saved_bytes(cfg, n_visual, n_text, batch, lay)
    peak = 0.0
    for i in range(1, blocks + 1):
        if i in recompute:
            peak = max(peak, held + full)  # backward of block i: earlier blocks still held
            held += block_input_bytes(cfg, n_visual, batch, lay)
        else:
            held += full
    if output_layer:  # on the gathered tokens: fp32 LN input + stats, LN out, modulated
        held += batch * (n_visual * (8 * d + 8 + d * m) + 4 * d)
    if heads:
        layers = set(heads)
        deepest = max(layers)
        shared = m == 4 and not lay.sp  # fp32, no SP: the next block keeps the features
        feats = sum(1 for k in layers if not shared or k == deepest)
        per_head = d * m + 8 + 2 * d * m / lay.tp  # LN output + stats, k/v
        held += batch * n_visual * (len(heads) * per_head + feats * d * m)
        # per sample: each head's query projection, attention output and log-sum-exp, the
        # concatenated head tokens, their LayerNorm (output, stats); per head its query
        held += batch * (len(heads) * (2 * d * m / lay.tp + cfg.num_heads * 4 / lay.tp))
        held += batch * (2 * len(heads) * d * m + 8) + len(heads) * (d * m + 8)
    return held, max(held, peak)


def backward_workspace(cfg: WanConfig, n_visual: int, batch: int, lay: _Layout) -> float:
    """Gradients alive on top of the saved tensors in a block's backward: the larger of the
    FFN's (fc1/GELU output gradients ``f m`` in the TP region, the residual stream's fp32
    gradients ``2 x 4d``, fc1's ``d x f`` weight gradient) and the self-attention's (dq, dk,
    dv and the fused QKV gradient ``6 d m`` in the TP region, the same ``2 x 4d``, the QKV
    weight gradient ``3 d x d``)."""
    d, f, m = cfg.hidden_size, cfg.ffn_dim, lay.m
    seq = lay.seq(2 * 4 * d * n_visual)
    ffn = batch * (lay.par(f * m * n_visual) + seq) + d * f * m / lay.tp
    attn = batch * (lay.par(6 * d * m * n_visual) + seq) + 3 * d * d * m / lay.tp
    return max(ffn, attn)


# ------------------------------------------------------------------------------------------
# The family's entry
# ------------------------------------------------------------------------------------------


def discriminator_config(cfg: WanConfig, head_layers: Sequence[int] | None = None) -> WanConfig:
    """The part of the model D runs: its blocks up to the last head (FLOPs)."""
    return cfg.replace(num_layers=max(head_layers or default_head_layers(cfg.num_layers)))


def wan_phase_flops(
    cfg: WanConfig,
    phase: str,
    n_visual: int,
    n_text: int,
    recompute: int = 0,
    head_layers: Sequence[int] | None = None,
) -> float:
    """:func:`megatron_apt.config.flops.phase_flops` with Wan's forward FLOPs."""
    return phase_flops(
        cfg, phase, n_visual, n_text, recompute, head_layers, forward_flops, discriminator_config
    )


def check(inp: MemoryPlanInput) -> None:
    """Wan's limits beyond the heads and FFN divisibility: CP is not modelled (yet)."""
    if inp.cp != 1:
        raise ValueError(
            f"cp={inp.cp}: the planner does not model the Wan family's context parallelism "
            "yet (the model runs it; the activation inventory is CP = 1 only); plan with cp=1"
        )


WAN_MEMORY = FamilyMemory(
    name="wan",
    model_parameters=model_parameters,
    discriminator_parameters=discriminator_parameters,
    pass_activation_bytes=pass_activation_bytes,
    backward_workspace=backward_workspace,
    largest_block=block_local,
    phase_flops=wan_phase_flops,
    check=check,
    vae=(4, 8, 8),
    text_len=512,
    notes=("the planner does not model Wan's context parallelism yet: CP = 1",),
)
