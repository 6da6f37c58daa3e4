"""The MMDiT velocity model on megatron-core tensor/sequence-parallel linears.

Dual-stream blocks (separate text and visual weights) with joint attention over the
concatenated ``[visual; text]`` tokens, adaLN-Zero modulation from the timestep embedding
(plus an optional pooled text vector), optional QK RMSNorm, 3D RoPE or SD3's cropped 2-D
sin-cos positions, and a "context pre-only" last block. Architecture only: kernels come from
the :class:`~megatron_apt.models.specs.LayerSpec`, process groups from the
:class:`~megatron_apt.parallel.state.ParallelState`.

Parallel layout inside the blocks (megatron's ``[s, b, h]``):

* sequence-parallel regions (norms, modulation, residuals): ``[s/tp, b, h]`` per stream;
* tensor-parallel region (attention): ``[s, b, heads/tp, hd]``; the fused QKV weight is laid
  out per head as ``[heads, (q, k, v), hd]`` so a contiguous TP split keeps whole heads.

Padded text tokens (``text_mask``, given on the host: :mod:`megatron_apt.models.inputs`) are
masked out as keys, and their query rows' attention outputs and q/k/v gradients are set to
exactly zero whatever the kernel leaves there (:mod:`megatron_apt.models.masks`).

Embeddings and the final layer run replicated on the full sequence outside the blocks, so
their gradients are complete on every TP rank. Tensors identical on all TP ranks whose
consumers see only part of the tokens or heads (modulation vectors, QK-norm weights, biases
of sequence-parallel row-linears) go through :func:`reduce_grad_over_tp`.

Activation recompute (:meth:`MMDiT.set_recompute`): chosen blocks keep only their inputs in
the forward and run again in the backward (``torch.utils.checkpoint`` non-reentrant, CPU/CUDA
RNG state restored). Non-reentrant, because in the APT generator phase the discriminator's
parameters are frozen and the gradient must still flow through its blocks to its input.
Under TP/SP the recomputed forward issues the same collectives in the same order on every
rank of the group. The blocks draw no random numbers (no dropout), so megatron's CUDA RNG
tracker (what ``tensor_parallel.checkpoint`` adds, reentrant only) has nothing to restore.
With Transformer Engine FP8, TE's own ``checkpoint`` is used so that the recomputed forward
reuses the forward's FP8 scaling state (not exercised on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_apt.config.fp8 import FP8_GEMM_ROWS
from megatron_apt.config.training import parse_recompute_layers
from megatron_apt.models.build_options import build_options, gathered
from megatron_apt.models.compile import run_compiled
from megatron_apt.models.embeddings import (
    apply_rotation,
    crop_sincos_2d,
    patchify,
    rope_3d,
    rope_rotation,
    sincos_2d_table,
    timestep_features,
    unpatchify,
)
from megatron_apt.models.inputs import TimestepRangeCheck, check_input_shapes
from megatron_apt.models.masks import guard_padded_rows, zero_padded_rows
from megatron_apt.models.mmdit.config import MMDiTConfig
from megatron_apt.models.specs import (
    KeyMask,
    LayerSpec,
    as_key_mask,
    ensure_tp_attributes,
    get_spec,
    linear_config,
    local_spec,
)
from megatron_apt.parallel.context_parallel import (
    cp_key_mask,
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
    cfg: MMDiTConfig,
    ps: ParallelState,
    params_dtype: torch.dtype,
    use_cpu_init: bool,
    initialize: bool = True,
) -> TransformerConfig:
    """The megatron-core config that its parallel linears read (:func:`specs.linear_config`)."""
    return linear_config(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
        ffn_hidden_size=cfg.ffn_hidden_size, head_dim=cfg.head_dim, ps=ps,
        params_dtype=params_dtype, use_cpu_init=use_cpu_init, initialize=initialize,
    )  # fmt: skip


def _cuda_rng_tracker_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return bool(get_cuda_rng_tracker().is_initialized())


def modulate(x_sbh: torch.Tensor, shift_bh: torch.Tensor, scale_bh: torch.Tensor) -> torch.Tensor:
    """``x (1 + scale) + shift`` in one pass over ``x`` (``addcmul``)."""
    return torch.addcmul(shift_bh[None], x_sbh, 1 + scale_bh[None])


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine parameters (adaLN supplies scale and shift)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learnable weight, computed in fp32."""

    def __init__(self, dim: int, eps: float, ps: ParallelState):
        super().__init__()
        self.eps, self.ps = eps, ps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One weight shared by all heads, each TP rank normalizing only its heads: the
        # weight's gradient is a per-rank partial sum.
        w = reduce_grad_over_tp(self.weight, self.ps)
        return F.rms_norm(x.float(), (x.shape[-1],), w.float(), self.eps).to(x.dtype)


class StreamLayer(nn.Module):
    """One stream's (text or visual) weights in a dual-stream block.

    ``pre_only``: the stream only contributes keys/values/queries to the joint attention (the
    text stream of the last block); its modulation is adaLN-continuous (scale, shift).
    """

    def __init__(
        self,
        cfg: MMDiTConfig,
        spec: LayerSpec,
        mcfg: TransformerConfig,
        ps: ParallelState,
        pre_only: bool,
    ):
        super().__init__()
        d, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.pre_only, self.ps, self.eps = pre_only, ps, cfg.norm_eps
        self.num_heads_local = cfg.num_heads // ps.tp_size
        init = nn.init.xavier_uniform_
        col = dict(
            config=mcfg,
            init_method=init,
            bias=True,
            gather_output=False,
            skip_bias_add=False,
            is_expert=False,
            tp_group=ps.tp_group,
        )
        row = dict(
            config=mcfg,
            init_method=init,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_group=ps.tp_group,
        )
        # adaLN: (shift, scale, gate) x (attn, mlp), or (scale, shift) when pre_only
        self.adaln = nn.Linear(d, (2 if pre_only else 6) * d)
        self.qkv = spec.column_linear(d, 3 * d, **col)  # [heads, (q,k,v), hd] rows
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, ps) if cfg.qk_norm == "rms" else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, ps) if cfg.qk_norm == "rms" else None
        if not pre_only:
            self.proj = spec.row_linear(d, d, **row)
            self.fc1 = spec.column_linear(d, f, **col)
            self.fc2 = spec.row_linear(f, d, **row)

    def modulation(self, cond_bh: torch.Tensor) -> list[torch.Tensor]:
        mod = self.adaln(F.silu(cond_bh))  # [b, 6h] or [b, 2h]
        if self.ps.sequence_parallel:  # consumed by s/tp tokens only: partial gradient
            mod = reduce_grad_over_tp(mod, self.ps)
        return list(mod.chunk(2 if self.pre_only else 6, dim=-1))

    def qkv_heads(self, x_sbh: torch.Tensor, shift, scale):
        """Modulated LN -> QKV. Returns q, k, v ``[s, b, heads/tp, hd]`` (full sequence)."""
        h = modulate(layer_norm(x_sbh, self.eps), shift, scale)  # [s/tp, b, h]
        qkv, _ = self.qkv(h)  # [s, b, 3h/tp] (SP: all-gathered inside)
        s, b = qkv.shape[:2]
        q, k, v = qkv.view(s, b, self.num_heads_local, 3, -1).unbind(3)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def row_out(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out, bias = layer(x)  # [s/tp, b, h] (SP: reduce-scattered), bias added here
        if bias is not None:
            if self.ps.sequence_parallel:
                bias = reduce_grad_over_tp(bias, self.ps)
            out = out + bias
        return out

    def finish(self, x_sbh, attn_sbh, gate_msa, shift_mlp, scale_mlp, gate_mlp):
        """Residual attention output, then the modulated MLP. ``attn_sbh``: ``[s, b, h/tp]``."""
        x = torch.addcmul(x_sbh, gate_msa[None], self.row_out(self.proj, attn_sbh))
        h = modulate(layer_norm(x, self.eps), shift_mlp, scale_mlp)
        h, _ = self.fc1(h)  # [s, b, f/tp]
        h = F.gelu(h, approximate="tanh")
        return torch.addcmul(x, gate_mlp[None], self.row_out(self.fc2, h))


class MMDiTBlock(nn.Module):
    """A dual-stream block with joint attention."""

    def __init__(
        self,
        cfg: MMDiTConfig,
        spec: LayerSpec,
        mcfg: TransformerConfig,
        ps: ParallelState,
        context_pre_only: bool,
    ):
        super().__init__()
        if cfg.num_heads % (ps.tp_size * ps.cp_size):
            raise ValueError(
                f"num_heads={cfg.num_heads} is not divisible by tensor_parallel_size={ps.tp_size}"
                f" x context_parallel_size={ps.cp_size}"
            )
        self.context_pre_only, self.ps = context_pre_only, ps
        self.visual = StreamLayer(cfg, spec, mcfg, ps, pre_only=False)
        self.text = StreamLayer(cfg, spec, mcfg, ps, pre_only=context_pre_only)
        # under CP each rank attends with its 1/cp of the heads over the whole sequence
        self.attention = spec.attention(cfg.num_heads // (ps.tp_size * ps.cp_size), cfg.head_dim)

    def forward(self, x, c, cond, rope=None, key_mask=None):
        """x: visual ``[N(/tp), b, h]``; c: text ``[L(/tp), b, h]``; cond: ``[b, h]``;
        rope: the rotation of the visual tokens (:func:`rope_rotation`, ``[N, 1, 1, hd/2]``
        complex); key_mask: ``[b, N+L]`` bool (a :class:`KeyMask` or a tensor) or None.
        Returns (x, c) with c None after a context-pre-only block."""
        key_mask = as_key_mask(key_mask)
        mx = self.visual.modulation(cond)
        mc = self.text.modulation(cond)
        qx, kx, vx = self.visual.qkv_heads(x, mx[0], mx[1])  # [N, b, nh/tp, hd]
        if self.context_pre_only:
            qc, kc, vc = self.text.qkv_heads(c, mc[1], mc[0])  # continuous: (scale, shift)
        else:
            qc, kc, vc = self.text.qkv_heads(c, mc[0], mc[1])  # [L, b, nh/tp, hd]
        if rope is not None:
            qx, kx = apply_rotation(qx, rope), apply_rotation(kx, rope)
        n = qx.shape[0]
        q, k, v = torch.cat([qx, qc]), torch.cat([kx, kc]), torch.cat([vx, vc])
        if self.ps.cp_size > 1:  # Ulysses: [S/cp, b, 3, nh/tp, hd] -> [S, b, 3, nh/tp/cp, hd]
            q, k, v = sequence_to_heads(torch.stack([q, k, v], dim=2), self.ps, 3).unbind(2)
        if key_mask is not None:  # padded rows: no stale kernel memory in any gradient
            q, k, v = guard_padded_rows(q, k, v, key_mask.valid_rows)  # (models/masks.py)
        out = self.attention(q, k, v, key_mask)  # [N+L, b, h/tp] (CP: [S, b, h/tp/cp])
        if key_mask is not None:  # padded query rows exactly zero, whatever the kernel
            out = zero_padded_rows(out, key_mask.valid_rows)
        if self.ps.cp_size > 1:
            s, b = out.shape[:2]
            out = heads_to_sequence(out.view(s, b, -1, q.shape[-1]), self.ps, 2).flatten(2)
        x = self.visual.finish(x, out[:n], mx[2], mx[3], mx[4], mx[5])
        if self.context_pre_only:
            return x, None
        c = self.text.finish(c, out[n:], mc[2], mc[3], mc[4], mc[5])
        return x, c


class TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class MMDiT(nn.Module):
    """MMDiT velocity model ``v(x_t, t, text)``.

    Args:
        cfg: architecture.
        ps: process groups; ``None`` builds a single-process (TP=1) model.
        spec: kernels: a :class:`LayerSpec` or its name (``local``, ``te``, ``te-fp8``,
            ``te-flash``, ``auto``; see :func:`get_spec`); ``None`` is ``local``.
        params_dtype: dtype of the parameters.
        use_cpu_initialization: build and initialize weights on CPU, then the caller moves
            the model (default: unless megatron's CUDA RNG tracker has been seeded by
            ``initialize_parallel(seed=...)`` on a GPU). CPU initialization makes TP=N weights
            equal to slices of the TP=1 ones.
    """

    def __init__(
        self,
        cfg: MMDiTConfig,
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
        if use_cpu_initialization is None:  # GPU init needs megatron's seeded RNG tracker
            use_cpu_initialization = not _cuda_rng_tracker_ready()
        mcfg = megatron_config(
            cfg, ps, params_dtype, use_cpu_initialization, initialize=opts.initialize
        )
        d = cfg.hidden_size
        self.patch_embed = nn.Linear(cfg.patch_dim, d)
        self.text_embed = nn.Linear(cfg.text_dim, d)
        self.time_embed = TimestepMLP(cfg.timestep_freq_dim, d)
        self.pooled_embed = TimestepMLP(cfg.pooled_text_dim, d) if cfg.pooled_text_dim else None
        self.blocks = nn.ModuleList(
            MMDiTBlock(
                cfg,
                spec,
                mcfg,
                ps,
                context_pre_only=cfg.context_pre_only_last and i == cfg.num_layers - 1,
            )
            for i in range(cfg.num_layers)
        )
        self.final_adaln = nn.Linear(d, 2 * d)  # (scale, shift)
        self.final_proj = nn.Linear(d, cfg.out_patch_dim)
        if cfg.pos_embed == "sincos2d":
            table = sincos_2d_table(d, cfg.pos_embed_max_size, cfg.pos_embed_base_size)
            self.register_buffer("pos_table", table, persistent=False)
        if opts.initialize:
            self._init_replicated()
        else:
            ensure_tp_attributes(self)  # megatron sets them in its (skipped) init only
        self.to(dtype=params_dtype)
        self.recompute_layers: tuple[int, ...] = ()
        self._timestep_range = TimestepRangeCheck()  # see models/inputs.py

    def set_recompute(self, layers: str | int | Sequence[int] | None) -> tuple[int, ...]:
        """Recompute the given blocks in backward instead of keeping their activations.

        ``layers``: ``None``/``"none"``, ``"all"``, or 1-based block numbers (``"1,3"``,
        ``"1-4"``, or a sequence of ints), as :func:`parse_recompute_layers`. Returns the
        chosen block numbers. A recomputed block keeps only its inputs (visual and text tokens,
        conditioning) during the forward and runs its forward again in the backward; outputs and
        gradients are unchanged. Has no effect under ``torch.no_grad``.
        """
        self.recompute_layers = parse_recompute_layers(layers, self.cfg.num_layers)
        return self.recompute_layers

    def _run_block(self, i: int, block: MMDiTBlock, x, c, cond, rope, key_mask):
        """Block ``i`` (1-based), recomputed in backward when it was chosen (compiled after
        :func:`megatron_apt.models.compile.compile_blocks`)."""
        args = (i, block, x, c, cond, rope, key_mask)
        return run_compiled(self, lambda: self._run_block_impl(*args))

    def _run_block_impl(self, i: int, block: MMDiTBlock, x, c, cond, rope, key_mask):
        if i not in self.recompute_layers or not torch.is_grad_enabled():
            return block(x, c, cond, rope, key_mask)
        if self.spec.uses_te and self.spec.fp8:  # FP8 scaling state of the recomputed forward
            import transformer_engine.pytorch as te

            return te.checkpoint(
                block,
                x,
                c,
                cond,
                rope,
                key_mask,
                distribute_saved_activations=False,
                tp_group=self.ps.tp_group,
                use_reentrant=False,
            )
        return checkpoint(block, x, c, cond, rope, key_mask, use_reentrant=False)

    # ---------------------------------------------------------------------------------
    def _init_replicated(self) -> None:
        """DiT's init for the replicated layers (megatron's linears are initialized by their
        ``init_method``); adaLN modulation and the output layer start at zero (adaLN-Zero).
        Under ZeRO-3 partitioned construction the submodules are already split: they are
        gathered (rank 0's values kept) for this."""
        replicated = [self.patch_embed, self.text_embed, self.time_embed, self.pooled_embed]
        replicated += [self.final_adaln, self.final_proj]
        replicated += [s.adaln for b in self.blocks for s in (b.visual, b.text)]
        params = [p for m in replicated if m is not None for p in m.parameters()]
        with gathered(params, modify=True):
            self._init_replicated_weights()

    def _init_replicated_weights(self) -> None:
        for m in (self.patch_embed, self.text_embed):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        for mlp in (self.time_embed, self.pooled_embed):
            if mlp is not None:
                for lin in (mlp.linear_1, mlp.linear_2):
                    nn.init.normal_(lin.weight, std=self.cfg.init_std)
                    nn.init.zeros_(lin.bias)
        zero = [self.final_adaln, self.final_proj]
        zero += [s.adaln for b in self.blocks for s in (b.visual, b.text)]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def grid(self, latents_shape: torch.Size) -> tuple[int, int, int]:
        _, _, t, h, w = latents_shape
        pt, ph, pw = self.cfg.patch_size
        return t // pt, h // ph, w // pw

    def _check_inputs(self, latents, timesteps, text, text_mask, pooled_text):
        check_input_shapes(self.cfg, latents, timesteps, text, text_mask, pooled_text)
        self._timestep_range(timesteps, self.cfg.timestep_scale)  # once on the device

    def embed(self, latents, timesteps, text, text_mask, pooled_text):
        """Replicated embeddings: visual ``[B, N/cp, h]`` and text ``[B, L/cp, h]`` (this CP
        rank's chunks; text padded with masked tokens to a multiple of the ranks that split
        it), the key mask of the joint sequence as attention sees it, and ``cond [B, h]``."""
        cfg, ps = self.cfg, self.ps
        split = ps.cp_size * (ps.tp_size if ps.sequence_parallel else 1)
        tokens = patchify(latents, cfg.patch_size)  # [B, N, patch_dim]
        if self.spec.fp8 and (tokens.shape[1] // split * tokens.shape[0]) % FP8_GEMM_ROWS:
            raise ValueError(
                f"{self.spec.name}: {tokens.shape[1]} visual tokens / {split} ranks x batch "
                f"{tokens.shape[0]} = {tokens.shape[1] // split * tokens.shape[0]} rows per "
                f"rank, not divisible by {FP8_GEMM_ROWS} as Transformer Engine's FP8 GEMMs "
                "need: change the latent size, the batch or the parallel layout, or use the "
                "BF16 spec 'te'"
            )
        if tokens.shape[1] % split:
            raise ValueError(
                f"{tokens.shape[1]} visual tokens (grid {self.grid(latents.shape)}) are not "
                f"divisible by {split} = context_parallel_size {ps.cp_size}"
                + (
                    f" x tensor_parallel_size {ps.tp_size} (sequence parallel)"
                    if split > ps.cp_size
                    else ""
                )
                + ", which split the tokens evenly"
            )
        n = tokens.shape[1]
        tokens = split_for_cp(tokens, ps, dim=1)
        # fp32 input projection: small perturbations of the input (the discriminator's
        # approximated R1 uses sigma = 0.01) survive it even when the weights are bf16.
        w, b = self.patch_embed.weight, self.patch_embed.bias
        x = F.linear(tokens.float(), w.float(), b.float()).to(w.dtype)
        gt, gh, gw = self.grid(latents.shape)
        if cfg.pos_embed == "sincos2d":
            pos = crop_sincos_2d(self.pos_table, gh, gw).repeat(gt, 1)
            x = x + split_for_cp(pos, ps, dim=0).to(x.dtype)[None]
        c = self.text_embed(text.to(x.dtype))
        # FP8: every rank's text rows a multiple of 8 as well (77 or 226 T5 tokens would not be)
        align = split * FP8_GEMM_ROWS if self.spec.fp8 else split
        if c.shape[1] % align:  # pad text with masked tokens
            pad = align - c.shape[1] % align
            c = F.pad(c, (0, 0, 0, pad))
            if text_mask is None:  # made on the host (models/inputs.py: no device reads)
                text_mask = torch.ones(text.shape[:2], dtype=torch.bool)
            text_mask = F.pad(text_mask, (0, pad), value=False)
        c = split_for_cp(c, ps, dim=1)
        key_mask = None
        # read on the host for a host mask (the contract); a device mask costs a sync here
        if text_mask is not None and not bool(text_mask.all()):
            text_mask = text_mask.bool()  # built where the mask lives, then moved once
            if ps.cp_size > 1:  # the order of the all-to-all's sequence: [x_0; c_0; x_1; ...]
                key_mask = cp_key_mask(n, text_mask, ps)
            else:
                vis = text_mask.new_ones(text_mask.shape[0], x.shape[1])  # [B, N]
                key_mask = torch.cat([vis, text_mask], dim=1)  # [B, N+L]
            # one object for every layer: the kernels' mask analysis runs once, on the host
            key_mask = KeyMask(key_mask, device=x.device)
        timesteps = to_device(timesteps, x.device)
        t_feat = timestep_features(timesteps * cfg.timestep_scale, cfg.timestep_freq_dim)
        cond = self.time_embed(t_feat.to(x.dtype))
        if self.pooled_embed is not None:
            cond = cond + self.pooled_embed(pooled_text.to(x.dtype))
        return x, c, key_mask, cond

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
        """Velocity ``v = z - x`` at ``x_t``.

        Args:
            latents: ``[B, C, T, H, W]`` noisy latents x_t.
            timesteps: ``[B]`` on [0, 1] (0 = data, 1 = noise); scaled by
                ``cfg.timestep_scale`` inside. The range is checked on every call with host
                timesteps and on the first call with device ones (one synchronization).
            text: ``[B, L, text_dim]`` text-encoder token embeddings.
            text_mask: ``[B, L]`` bool, True for real tokens; None = all real. On the host
                (a CPU tensor) even when the model runs on CUDA: then the forward makes no host
                synchronization (``models/inputs.py``); a mask on the device works, with one
                to four synchronizations per forward.
            pooled_text: ``[B, pooled_text_dim]`` when the config has a pooled projection.
            return_layers: 1-based block indices whose visual tokens to return as well.
            features_only: return only the features of ``return_layers``, skipping the blocks
                after the last one asked for and the output layer (the discriminator).

        Returns:
            ``[B, C_out, T, H, W]`` velocity, or ``(velocity, feats)`` when ``return_layers``
            is non-empty, ``feats`` a list of ``[B, N, h]`` full (gathered) visual tokens;
            only ``feats`` with ``features_only``.
        """
        self._check_inputs(latents, timesteps, text, text_mask, pooled_text)
        if features_only and not return_layers:
            raise ValueError("features_only=True needs return_layers")
        for k in return_layers:
            if not 1 <= k <= self.cfg.num_layers:
                raise ValueError(f"return_layers entry {k} outside 1..{self.cfg.num_layers}")
        ps, grid = self.ps, self.grid(latents.shape)
        # FP8 amaxes reduced over TP x DP x CP, as megatron does (ParallelState.amax_group)
        with self.spec.autocast(ps.amax_group):
            x, c, key_mask, cond = self.embed(latents, timesteps, text, text_mask, pooled_text)
            rope = None
            if self.cfg.pos_embed == "rope3d":
                cos_sin = rope_3d(grid, self.cfg.rope_axes_dim, self.cfg.rope_theta, x.device)
                # one complex rotation of this rank's tokens, shared by every block
                rope = rope_rotation(*(split_for_cp(t, ps, dim=0) for t in cos_sin))
            x = scatter_to_sequence_parallel(x.transpose(0, 1), ps)  # [N/cp/tp, B, h]
            c = scatter_to_sequence_parallel(c.transpose(0, 1), ps)  # [L/cp/tp, B, h]
            feats = {}
            last = max(return_layers) if features_only else self.cfg.num_layers
            for i, block in enumerate(self.blocks[:last], start=1):
                x, c = self._run_block(i, block, x, c, cond, rope, key_mask)
                if i in return_layers:
                    full = gather_from_cp(gather_from_sequence_parallel(x, ps), ps)
                    feats[i] = full.transpose(0, 1)  # [B, N, h]
            if features_only:
                return [feats[k] for k in return_layers]
            x = gather_from_sequence_parallel(x, ps)  # [N/cp, B, h]
            scale, shift = self.final_adaln(F.silu(cond)).chunk(2, dim=-1)
            x = modulate(layer_norm(x, self.cfg.norm_eps), shift, scale)
            out = gather_from_cp(self.final_proj(x), ps).transpose(0, 1)  # [B, N, pt*ph*pw*C]
        v = unpatchify(out, self.cfg.patch_size, grid, self.cfg.out_channels)
        if return_layers:
            return v, [feats[k] for k in return_layers]
        return v

    # ---------------------------------------------------------------------------------
    def fp32_island_parameters(self) -> list[nn.Parameter]:
        """None: the MMDiT keeps no parameters in fp32 in a bf16 model (Wan does)."""
        return []

    def unused_by_features(self, last_layer: int) -> list[nn.Module]:
        """The modules that cannot influence the visual tokens returned after block
        ``last_layer`` (``features_only``): the output layer, the later blocks, and the text
        MLP of that block (its text stream is not read again). The discriminator freezes them."""
        unused = [self.final_adaln, self.final_proj, *self.blocks[last_layer:]]
        block = self.blocks[last_layer - 1]
        if not block.context_pre_only:
            unused += [block.text.proj, block.text.fc1, block.text.fc2]
        return unused

    def num_parameters(self, full: bool = True) -> int:
        """Parameters of this rank, or of the whole (TP-unsplit) model when ``full``."""
        n = 0
        for p in self.parameters():
            split = self.ps.tp_size if full and getattr(p, "tensor_model_parallel", False) else 1
            n += p.numel() * split
        return n
