"""The Wan2.1 DiT on megatron-core tensor/sequence-parallel linears.

Follows diffusers 0.42.1 ``WanTransformer3DModel`` (models/transformers/transformer_wan.py,
cited as ``tw:<line>``). Not an MMDiT: each block is

1. self-attention over the visual tokens: fp32 LayerNorm modulated by (shift, scale), fused
   QKV, RMSNorm of q and of k over *all* heads, 3D RoPE, gated residual in fp32 (tw:487-490);
2. cross-attention to the text tokens: an affine fp32 LayerNorm (``cross_attn_norm``), q from
   the visual tokens, fused KV from the text, the same across-heads RMSNorm, a plain residual
   in the model's dtype (tw:492-495);
3. a GELU-tanh FFN on the modulated fp32 LayerNorm, gated residual in fp32 (tw:497-502);

the six modulation vectors being a per-block learned ``scale_shift_table`` plus one shared
projection of the time embedding, added in fp32 (tw:482-485). The time embedder runs in fp32
and its output is cast to the model's dtype before the shared projection and the output
layer (tw:341-345); the output layer's (shift, scale) are its own table plus the time
embedding itself, not its projection (tw:714, tw:723).

Parallel layout (megatron's ``[s, b, h]``), as the MMDiT: norms, modulation and residuals in
the sequence-parallel region ``[s/tp, b, h]``; attention in the tensor-parallel region
``[s, b, heads/tp, hd]`` with whole heads per rank (QKV laid out ``[heads, (q, k, v), hd]``,
KV ``[heads, (k, v), hd]``). The across-heads RMSNorm sums squares over the rank's heads and
all-reduces the sum over TP (forward and backward); its weight is split over TP with the heads.
The text tokens are split over the sequence like the visual ones and gathered by each block's
KV linear. Padded text tokens (``text_mask`` False) are masked out as keys of the
cross-attention; note that diffusers' Wan (and the original Wan code) attends to the
zero-padded umT5 tokens, so the pretrained behaviour is ``text_mask=None`` on the padded text.

Context parallelism (Ulysses, as the MMDiT: :mod:`megatron_apt.parallel.context_parallel`):
each CP rank holds a contiguous ``1/cp`` of the visual tokens (``[N/cp(/tp), b, h]``); the text
is not split over CP (every CP rank embeds the whole text; under SP it is split over TP as
without CP). Self-attention: QKV, the across-heads RMSNorm and RoPE run on the rank's tokens
with all of its TP-local heads (the RMSNorm's sum over heads is then the same as at CP=1, and
each token is rotated by the angles of its own global position: the RoPE table is sliced to
the rank's tokens); an all-to-all trades the sequence split for a head split
(``[N/cp, b, heads/tp, hd] -> [N, b, heads/tp/cp, hd]``), attention runs over the whole
sequence, the inverse all-to-all restores the split. Cross-attention needs no all-to-all: the
rank's visual queries attend to the whole text. The output layer runs on the rank's tokens;
the velocity and the returned layers are gathered over CP (backward: this rank's slice).
Parameters get this rank's share of their gradient, summed by the ``dp x cp`` reduction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_apt.config.fp8 import FP8_GEMM_ROWS
from megatron_apt.config.training import parse_recompute_layers
from megatron_apt.models.build_options import build_options, gathered, is_partitioned
from megatron_apt.models.compile import run_compiled
from megatron_apt.models.embeddings import (
    apply_rotation,
    patchify,
    rope_3d,
    rope_rotation,
    timestep_features,
    unpatchify,
)
from megatron_apt.models.inputs import TimestepRangeCheck, check_input_shapes
from megatron_apt.models.specs import (
    LayerSpec,
    SDPAttention,
    ensure_tp_attributes,
    get_spec,
    linear_config,
    local_spec,
)
from megatron_apt.models.wan.config import WanConfig
from megatron_apt.parallel.context_parallel import (
    gather_from_cp,
    heads_to_sequence,
    sequence_to_heads,
    split_for_cp,
)
from megatron_apt.parallel.state import ParallelState, single_process_state
from megatron_apt.parallel.tensor_parallel import (
    gather_from_sequence_parallel,
    reduce_grad_over_tp,
    scatter_to_sequence_parallel,
)
from megatron_apt.utils.transfer import to_device


def megatron_config(
    cfg: WanConfig, ps: ParallelState, params_dtype: torch.dtype, use_cpu_init: bool, init: bool
) -> TransformerConfig:
    """The megatron-core config its parallel linears read (:func:`specs.linear_config`)."""
    return linear_config(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
        ffn_hidden_size=cfg.ffn_dim, head_dim=cfg.head_dim, ps=ps, params_dtype=params_dtype,
        use_cpu_init=use_cpu_init, initialize=init,
    )  # fmt: skip


def fp32_layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """diffusers' ``FP32LayerNorm`` (models/normalization.py:84-93): computed in fp32,
    returned in fp32 (the caller casts where diffusers does)."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


def sum_over_tp(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """All-reduce (sum) over TP in the forward AND the backward: each rank's partial sum feeds
    computation on that rank's heads only, so the gradient is a partial sum as well."""
    if ps.tp_size == 1:
        return x
    x = mappings.copy_to_tensor_model_parallel_region(x, group=ps.tp_group)  # bwd: all-reduce
    return mappings.reduce_from_tensor_model_parallel_region(x, group=ps.tp_group)  # fwd


class AcrossHeadsRMSNorm(nn.Module):
    """RMSNorm over all heads' channels (``torch.nn.RMSNorm(heads * hd)`` of diffusers'
    ``norm_q`` / ``norm_k``, tw:208-209) on this rank's heads ``[s, b, heads/tp, hd]``: the
    sum of squares is all-reduced over TP; the weight ``[heads/tp * hd]`` is split over TP
    with the heads. Computed in fp32, returned in the input's dtype."""

    def __init__(self, cfg: WanConfig, ps: ParallelState):
        super().__init__()
        self.eps, self.ps, self.dim = cfg.eps, ps, cfg.hidden_size
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size // ps.tp_size))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x_sbnd: torch.Tensor) -> torch.Tensor:
        xf = x_sbnd.flatten(2).float()  # [s, b, h/tp]
        ss = sum_over_tp(xf.square().sum(-1, keepdim=True), self.ps)  # [s, b, 1]
        out = xf * torch.rsqrt(ss / self.dim + self.eps) * self.weight.float()
        return out.to(x_sbnd.dtype).view_as(x_sbnd)


class FP32LayerNorm(nn.Module):
    """Affine LayerNorm in fp32 (the cross-attention's ``norm2``, tw:454); under sequence
    parallelism its parameters see s/tp tokens: gradients summed over TP."""

    def __init__(self, dim: int, eps: float, ps: ParallelState):
        super().__init__()
        self.eps, self.ps = eps, ps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.ps.sequence_parallel:
            w, b = reduce_grad_over_tp(w, self.ps), reduce_grad_over_tp(b, self.ps)
        return fp32_layer_norm(x, self.eps, w, b)


class WanAttention(nn.Module):
    """Self- (``cross=False``: fused QKV on the visual tokens) or cross-attention (q from the
    visual tokens, fused KV from the text), with the across-heads q/k RMSNorm. Under context
    parallelism the self-attention's core sees ``heads/tp/cp`` heads over the whole sequence
    (Ulysses all-to-all); the cross-attention's queries are the rank's tokens, its keys the
    whole text, with ``heads/tp`` heads."""

    def __init__(self, cfg, spec: LayerSpec, mcfg, ps: ParallelState, cross: bool):
        super().__init__()
        d = cfg.hidden_size
        self.cross, self.ps, self.hd = cross, ps, cfg.head_dim
        self.heads_local = cfg.num_heads // ps.tp_size
        col = dict(config=mcfg, init_method=nn.init.xavier_uniform_, bias=True,
                   gather_output=False, skip_bias_add=False, is_expert=False,
                   tp_group=ps.tp_group)  # fmt: skip
        if cross:
            self.q = spec.column_linear(d, d, **col)
            self.kv = spec.column_linear(d, 2 * d, **col)  # [heads, (k, v), hd] rows
        else:
            self.qkv = spec.column_linear(d, 3 * d, **col)  # [heads, (q, k, v), hd] rows
        self.q_norm = AcrossHeadsRMSNorm(cfg, ps)
        self.k_norm = AcrossHeadsRMSNorm(cfg, ps)
        self.proj = spec.row_linear(
            d, d, config=mcfg, init_method=nn.init.xavier_uniform_, bias=True,
            input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_group=ps.tp_group,
        )  # fmt: skip
        # self-attention under CP: 1/cp of this rank's heads over the whole visual sequence
        core_heads = self.heads_local if cross else self.heads_local // ps.cp_size
        self.core = spec.attention(core_heads, cfg.head_dim)
        # TE's padding mask and flash-attn's varlen path take the key mask as the query mask
        # (joint self-attention): a masked cross-attention runs on SDPA.
        self.masked_core = (
            self.core
            if isinstance(self.core, SDPAttention)
            else SDPAttention(self.heads_local, cfg.head_dim)
        )

    def heads(self, t: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """``[s, b, n*h/tp]`` per-head fused rows -> n tensors ``[s, b, heads/tp, hd]``."""
        s, b = t.shape[:2]
        return t.view(s, b, self.heads_local, n, self.hd).unbind(3)

    def forward(self, x_sbh, context_sbh=None, rope=None, key_mask=None) -> torch.Tensor:
        """x: this rank's visual tokens ``[s(/tp), b, h]`` (s = N/cp); context: text ``[L(/tp),
        b, h]`` (cross); rope: the rotation of this rank's visual tokens ``[s, 1, 1, hd/2]``
        (self); key_mask: ``[b, L]`` bool on the device or None (cross).
        Returns ``[s(/tp), b, h]`` (SP: reduce-scattered), bias included."""
        if self.cross:
            (q,) = self.heads(self.q(x_sbh)[0], 1)  # [s, b, nh/tp, hd]
            k, v = self.heads(self.kv(context_sbh)[0], 2)  # [L, b, nh/tp, hd]
        else:
            q, k, v = self.heads(self.qkv(x_sbh)[0], 3)
        # on the rank's tokens with all its TP heads: the sum over heads is CP=1's
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # the rank's own global positions (sliced table)
            q, k = apply_rotation(q, rope), apply_rotation(k, rope)
        ulysses = not self.cross and self.ps.cp_size > 1
        if ulysses:  # [s, b, 3, nh/tp, hd] -> [N, b, 3, nh/tp/cp, hd]
            q, k, v = sequence_to_heads(torch.stack([q, k, v], dim=2), self.ps, 3).unbind(2)
        core = self.core if key_mask is None else self.masked_core
        out = core(q, k, v, key_mask)  # [s, b, h/tp] (self under CP: [N, b, h/tp/cp])
        if ulysses:
            n, b = out.shape[:2]
            out = heads_to_sequence(out.view(n, b, -1, self.hd), self.ps, 2).flatten(2)
        out, bias = self.proj(out)  # [s/tp, b, h] (SP: reduce-scattered), bias added here
        if self.ps.sequence_parallel:
            bias = reduce_grad_over_tp(bias, self.ps)
        return out + bias


class WanBlock(nn.Module):
    """Self-attention, cross-attention, FFN; modulation from ``scale_shift_table`` + the
    shared time projection (diffusers' ``WanTransformerBlock``, tw:419-504)."""

    def __init__(self, cfg: WanConfig, spec: LayerSpec, mcfg, ps: ParallelState):
        super().__init__()
        if cfg.num_heads % (ps.tp_size * ps.cp_size):
            raise ValueError(
                f"num_heads={cfg.num_heads} is not divisible by tensor_parallel_size={ps.tp_size}"
                f" x context_parallel_size={ps.cp_size} (each rank attends with whole heads)"
            )
        d, f = cfg.hidden_size, cfg.ffn_dim
        self.eps, self.ps = cfg.eps, ps
        self.self_attn = WanAttention(cfg, spec, mcfg, ps, cross=False)
        self.cross_norm = FP32LayerNorm(d, cfg.eps, ps) if cfg.cross_attn_norm else None
        self.cross_attn = WanAttention(cfg, spec, mcfg, ps, cross=True)
        self.fc1 = spec.column_linear(
            d, f, config=mcfg, init_method=nn.init.xavier_uniform_, bias=True,
            gather_output=False, skip_bias_add=False, is_expert=False, tp_group=ps.tp_group,
        )  # fmt: skip
        self.fc2 = spec.row_linear(
            f, d, config=mcfg, init_method=nn.init.xavier_uniform_, bias=True,
            input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_group=ps.tp_group,
        )  # fmt: skip
        # (shift, scale, gate) of the self-attention, then of the FFN; kept in fp32 (tw:549)
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)

    def modulation(self, tproj_b6h: torch.Tensor) -> list[torch.Tensor]:
        mod = self.scale_shift_table.float() + tproj_b6h.float()  # [b, 6, h] fp32 (tw:483-485)
        if self.ps.sequence_parallel:  # consumed by s/tp tokens only: partial gradient
            mod = reduce_grad_over_tp(mod, self.ps)
        return list(mod.unbind(1))  # 6 x [b, h]

    def forward(self, x, c, tproj, rope=None, key_mask=None):
        """x: visual ``[N/cp(/tp), b, h]``; c: the whole text ``[L(/tp), b, h]``; tproj:
        ``[b, 6, h]``; rope: ``[N/cp, 1, 1, hd/2]`` complex (this rank's tokens); key_mask:
        ``[b, L]`` bool or None."""
        shift, scale, gate, c_shift, c_scale, c_gate = self.modulation(tproj)
        dt = x.dtype
        h = (fp32_layer_norm(x, self.eps) * (1 + scale) + shift).to(dt)  # tw:488
        x = (x.float() + self.self_attn(h, rope=rope).float() * gate).to(dt)  # tw:490
        h = x if self.cross_norm is None else self.cross_norm(x).to(dt)  # tw:493
        x = x + self.cross_attn(h, c, key_mask=key_mask)  # tw:495, in the model's dtype
        h = (fp32_layer_norm(x, self.eps) * (1 + c_scale) + c_shift).to(dt)  # tw:498
        h = F.gelu(self.fc1(h)[0], approximate="tanh")  # [s, b, f/tp]
        out, bias = self.fc2(h)  # [s/tp, b, h]
        if self.ps.sequence_parallel:
            bias = reduce_grad_over_tp(bias, self.ps)
        return (x.float() + (out + bias).float() * c_gate).to(dt)  # tw:502


class MLP2(nn.Module):
    """``linear_2(act(linear_1(x)))`` with diffusers' key names (time / text embedders)."""

    def __init__(self, in_dim: int, hidden: int, act: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_1(x)
        h = F.silu(h) if self.act == "silu" else F.gelu(h, approximate="tanh")
        return self.linear_2(h)


def rank_rope(cfg: WanConfig, grid, ps: ParallelState, device) -> torch.Tensor:
    """The 3D RoPE rotation of this CP rank's visual tokens, ``[N/cp, 1, 1, hd/2]``: the
    table of the whole grid sliced to the rank's contiguous chunk, so that each token is
    rotated by the angles of its own global position."""
    cos_sin = rope_3d(grid, cfg.rope_axes_dim, cfg.rope_theta, device)
    return rope_rotation(*(split_for_cp(t, ps, dim=0) for t in cos_sin))


def _text_key_mask(text_mask, pad: int, device) -> torch.Tensor | None:
    """``[b, L + pad]`` bool on ``device``, or None when every token is real. Refuses a sample
    without any real token (its cross-attention would have no key: NaN). Reads the mask on
    the host when it is given there (the MMDiT's contract: no synchronization)."""
    if text_mask is None:
        return None
    text_mask = text_mask.bool()
    has_text = text_mask.any(dim=1)
    if not bool(has_text.all()):
        empty = (~has_text).nonzero().flatten().tolist()
        raise ValueError(f"text_mask: samples {empty} have no real text token")
    if not pad and bool(text_mask.all()):
        return None
    return to_device(F.pad(text_mask, (0, pad), value=False), device)


class WanDiT(nn.Module):
    """Wan2.1 velocity model ``v(x_t, t, text)``.

    Args:
        cfg: architecture (:class:`WanConfig`).
        ps: process groups; ``None`` builds a single-process (TP=1) model.
        spec: kernels: a :class:`LayerSpec` or its name (see :func:`get_spec`); ``None`` is
            ``local``.
        params_dtype: dtype of the parameters; the time embedder, the modulation tables and
            the cross-attention LayerNorm stay fp32 (diffusers' ``_keep_in_fp32_modules``,
            tw:549).
        use_cpu_initialization: as :class:`~megatron_apt.models.mmdit.model.MMDiT`.
    """

    def __init__(
        self,
        cfg: WanConfig,
        ps: ParallelState | None = None,
        spec: LayerSpec | str | None = None,
        params_dtype: torch.dtype = torch.float32,
        use_cpu_initialization: bool | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.ps = ps = ps or single_process_state()
        if isinstance(spec, str):
            spec = get_spec(spec)
        self.spec = spec = spec or local_spec()
        opts = build_options()
        if opts.use_cpu_initialization is not None:
            use_cpu_initialization = opts.use_cpu_initialization
        if use_cpu_initialization is None:
            from megatron_apt.models.mmdit.model import _cuda_rng_tracker_ready

            use_cpu_initialization = not _cuda_rng_tracker_ready()
        mcfg = megatron_config(cfg, ps, params_dtype, use_cpu_initialization, opts.initialize)
        d = cfg.hidden_size
        self.patch_embed = nn.Linear(cfg.patch_dim, d)  # diffusers: Conv3d, stride = kernel
        self.text_embed = MLP2(cfg.text_dim, d, "gelu_tanh")  # PixArtAlphaTextProjection
        self.time_embed = MLP2(cfg.freq_dim, d, "silu")  # TimestepEmbedding (fp32)
        self.time_proj = nn.Linear(d, 6 * d)  # shared by every block (tw:323)
        self.blocks = nn.ModuleList(WanBlock(cfg, spec, mcfg, ps) for _ in range(cfg.num_layers))
        self.final_proj = nn.Linear(d, cfg.out_patch_dim)
        self.final_scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)  # (shift, scale)
        if opts.initialize:
            self._init_replicated()
        else:
            ensure_tp_attributes(self)
        self.to(dtype=params_dtype)
        self.keep_fp32_islands()
        self.recompute_layers: tuple[int, ...] = ()
        self._timestep_range = TimestepRangeCheck()

    def fp32_island_parameters(self) -> list[nn.Parameter]:
        """The parameters diffusers keeps in fp32 whatever the model's dtype (tw:549): the
        time embedder, the modulation tables and the cross-attention LayerNorms."""
        params = list(self.time_embed.parameters()) + [self.final_scale_shift_table]
        for b in self.blocks:
            params.append(b.scale_shift_table)
            params += list(b.cross_norm.parameters()) if b.cross_norm is not None else []
        return params

    def keep_fp32_islands(self) -> None:
        """:meth:`fp32_island_parameters` to fp32 after a build in another dtype. A cast of
        the whole model rounds them: ``load_mmdit`` keeps their values aside instead. Not for
        ZeRO-3 partitioned parameters (their storage is DeepSpeed's), nor under a DeepSpeed
        bf16 engine (it casts the module to bf16): those compute in fp32 from their stored
        dtype."""
        for p in self.fp32_island_parameters():
            if not is_partitioned(p):
                p.data = p.data.float()

    @torch.no_grad()
    def _init_replicated(self) -> None:
        """Wan's init (xavier linears, N(0, 0.02) text and time embedders, a zero output
        projection; diffusers' ``randn / sqrt(dim)`` tables); megatron's linears are
        initialized by their ``init_method``. Gathered first under ZeRO-3 construction."""
        mods = [self.patch_embed, self.text_embed, self.time_embed, self.time_proj]
        mods += [self.final_proj]
        params = [p for m in mods for p in m.parameters()]
        with gathered(params, modify=True):
            nn.init.xavier_uniform_(self.patch_embed.weight)
            nn.init.xavier_uniform_(self.time_proj.weight)
            for lin in (self.patch_embed, self.time_proj):
                nn.init.zeros_(lin.bias)
            for mlp in (self.text_embed, self.time_embed):
                for lin in (mlp.linear_1, mlp.linear_2):
                    nn.init.normal_(lin.weight, std=self.cfg.init_std)
                    nn.init.zeros_(lin.bias)
            nn.init.zeros_(self.final_proj.weight)
            nn.init.zeros_(self.final_proj.bias)

    def set_recompute(self, layers: str | int | Sequence[int] | None) -> tuple[int, ...]:
        """Recompute the given blocks in backward (as :meth:`MMDiT.set_recompute`)."""
        self.recompute_layers = parse_recompute_layers(layers, self.cfg.num_layers)
        return self.recompute_layers

    def _run_block(self, i: int, block: WanBlock, *args):
        return run_compiled(self, lambda: self._run_block_impl(i, block, *args))

    def _run_block_impl(self, i: int, block: WanBlock, *args):
        if i not in self.recompute_layers or not torch.is_grad_enabled():
            return block(*args)
        if self.spec.uses_te and self.spec.fp8:  # FP8 scaling state of the recomputed forward
            import transformer_engine.pytorch as te

            return te.checkpoint(
                block, *args, distribute_saved_activations=False, tp_group=self.ps.tp_group,
                use_reentrant=False,
            )  # fmt: skip
        return checkpoint(block, *args, use_reentrant=False)

    def grid(self, latents_shape: torch.Size) -> tuple[int, int, int]:
        _, _, t, h, w = latents_shape
        pt, ph, pw = self.cfg.patch_size
        return t // pt, h // ph, w // pw

    def _check_inputs(self, latents, timesteps, text, text_mask, pooled_text) -> None:
        check_input_shapes(self.cfg, latents, timesteps, text, text_mask, pooled_text)
        grid = self.grid(latents.shape)
        if max(grid) > self.cfg.rope_max_seq_len:
            raise ValueError(
                f"latent grid {grid} (after patchify) exceeds rope_max_seq_len="
                f"{self.cfg.rope_max_seq_len} positions per axis (diffusers' RoPE table)"
            )
        self._timestep_range(timesteps, self.cfg.timestep_scale)

    def embed(self, latents, timesteps, text, text_mask):
        """Embeddings: this CP rank's visual tokens ``[B, N/cp, h]``, the whole text
        ``[B, L', h]`` (padded with masked tokens to a multiple of the TP ranks that split it
        under SP; not split over CP), the text key mask, the time embedding ``temb [B, h]``
        and its projection ``tproj [B, 6, h]``."""
        cfg, ps = self.cfg, self.ps
        tp_split = ps.tp_size if ps.sequence_parallel else 1
        split = ps.cp_size * tp_split
        tokens = patchify(latents, cfg.patch_size)  # [B, N, patch_dim]
        rows = tokens.shape[1] // split * tokens.shape[0]
        if tokens.shape[1] % split or (self.spec.fp8 and rows % FP8_GEMM_ROWS):
            ranks = []
            if ps.cp_size > 1:
                ranks.append(f"context_parallel_size {ps.cp_size}")
            if tp_split > 1:
                ranks.append(f"tensor_parallel_size {ps.tp_size} (sequence parallel)")
            raise ValueError(
                f"{tokens.shape[1]} visual tokens (grid {self.grid(latents.shape)}) x batch "
                f"{tokens.shape[0]} do not split into {split} ranks"
                + (f" = {' x '.join(ranks)}" if ranks else "")
                + (f" with a multiple of {FP8_GEMM_ROWS} rows each (FP8)" if self.spec.fp8 else "")
            )
        tokens = split_for_cp(tokens, ps, dim=1)  # [B, N/cp, patch_dim]
        # fp32 input projection (as the MMDiT: small input perturbations survive bf16 weights)
        w, b = self.patch_embed.weight, self.patch_embed.bias
        x = F.linear(tokens.float(), w.float(), b.float()).to(w.dtype)
        c = self.text_embed(text.to(x.dtype))  # [B, L, h]
        align = tp_split * FP8_GEMM_ROWS if self.spec.fp8 else tp_split
        pad = -c.shape[1] % align
        if pad:
            c = F.pad(c, (0, 0, 0, pad))
            if text_mask is None:
                text_mask = torch.ones(text.shape[:2], dtype=torch.bool)
        key_mask = _text_key_mask(text_mask, pad, x.device)
        timesteps = to_device(timesteps, x.device)
        t_feat = timestep_features(timesteps * cfg.timestep_scale, cfg.freq_dim)  # fp32
        lin1 = self.time_embed.linear_1
        temb = self.time_embed(t_feat.to(lin1.weight.dtype)).to(x.dtype)  # tw:341-344
        tproj = self.time_proj(F.silu(temb)).unflatten(1, (6, -1))  # [B, 6, h] (tw:345, :691)
        return x, c, key_mask, temb, tproj

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        pooled_text: torch.Tensor | None = None,
        return_layers: tuple[int, ...] | list[int] = (),
        features_only: bool = False,
    ):
        """Velocity at ``x_t``, with the MMDiT's calling convention.

        Args:
            latents: ``[B, C, T, H, W]``.
            timesteps: ``[B]`` on [0, 1], scaled by ``cfg.timestep_scale`` inside (diffusers'
                Wan takes ``t * 1000`` directly; one timestep per sample, no
                ``expand_timesteps``).
            text: ``[B, L, text_dim]`` umT5 token embeddings.
            text_mask: ``[B, L]`` bool (True = real token), on the host; None = all real.
            pooled_text: must be None (Wan has no pooled text).
            return_layers, features_only: as :meth:`MMDiT.forward`.
        """
        self._check_inputs(latents, timesteps, text, text_mask, pooled_text)
        if features_only and not return_layers:
            raise ValueError("features_only=True needs return_layers")
        for k in return_layers:
            if not 1 <= k <= self.cfg.num_layers:
                raise ValueError(f"return_layers entry {k} outside 1..{self.cfg.num_layers}")
        ps, grid = self.ps, self.grid(latents.shape)
        with self.spec.autocast(ps.amax_group):
            x, c, key_mask, temb, tproj = self.embed(latents, timesteps, text, text_mask)
            rope = rank_rope(self.cfg, grid, ps, x.device)  # [N/cp, 1, 1, hd/2]
            x = scatter_to_sequence_parallel(x.transpose(0, 1), ps)  # [N/cp/tp, B, h]
            # contiguous once: every block's KV linear then keeps this one tensor (F.linear
            # copies a transposed view for each block; SP's scatter already copied it)
            c = scatter_to_sequence_parallel(c.transpose(0, 1), ps).contiguous()  # [L/tp, B, h]
            feats = {}
            last = max(return_layers) if features_only else self.cfg.num_layers
            for i, block in enumerate(self.blocks[:last], start=1):
                x = self._run_block(i, block, x, c, tproj, rope, key_mask)
                if i in return_layers:
                    full = gather_from_cp(gather_from_sequence_parallel(x, ps), ps)
                    feats[i] = full.transpose(0, 1)  # [B, N, h]
            if features_only:
                return [feats[k] for k in return_layers]
            x = gather_from_sequence_parallel(x, ps)  # [N/cp, B, h]
            table = self.final_scale_shift_table.float()
            shift, scale = (table[None] + temb.float()[:, None]).unbind(1)  # tw:714
            h = (fp32_layer_norm(x, self.cfg.eps) * (1 + scale) + shift).to(x.dtype)  # tw:723
            out = gather_from_cp(self.final_proj(h), ps).transpose(0, 1)  # [B, N, pt*ph*pw*C]
        v = unpatchify(out, self.cfg.patch_size, grid, self.cfg.out_channels)
        if return_layers:
            return v, [feats[k] for k in return_layers]
        return v

    def unused_by_features(self, last_layer: int) -> list[nn.Module | nn.Parameter]:
        """What cannot influence the visual tokens returned after block ``last_layer``
        (``features_only``): the output layer and its table, and the later blocks (Wan's text
        tokens are the same in every block, so nothing of block ``last_layer`` is unused)."""
        return [self.final_proj, self.final_scale_shift_table, *self.blocks[last_layer:]]

    def num_parameters(self, full: bool = True) -> int:
        """Parameters of this rank, or of the whole (TP-unsplit) model when ``full``."""
        n = 0
        for p in self.parameters():
            split = self.ps.tp_size if full and getattr(p, "tensor_model_parallel", False) else 1
            n += p.numel() * split
        return n
