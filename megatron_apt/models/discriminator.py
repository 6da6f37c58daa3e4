"""The APT discriminator (paper section 3.3): the diffusion MMDiT as backbone plus
cross-attention-only heads that turn visual tokens of several layers into one logit.

D̂(x, t, c): the backbone runs on the *clean* latent x at timestep t (one t per sample, drawn
by the caller from the shifted-uniform ensemble) and returns the visual tokens after layers
16, 26 and 36 of 36 (the same fractions of other depths). Each head has one learnable query
token that cross-attends to all the tokens of its layer and yields one token; the tokens are
concatenated over channels, layer-normalized and projected to a scalar logit.

Tensor parallel like the backbone: each head's q/kv projections are column-parallel (heads
split over TP) and its output projection row-parallel; the heads consume the gathered full
token sequence (identical on every TP rank), so their replicated parameters get complete
gradients through megatron's input/output mappings. Under context parallelism the backbone
gathers the tokens over the CP group and the heads run replicated on every CP rank
(:func:`~megatron_apt.parallel.context_parallel.replicated_over_cp` keeps the sum of their
gradients over CP equal to one full gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from megatron_apt.models.build_options import build_options
from megatron_apt.models.specs import ensure_tp_attributes, linear_config
from megatron_apt.parallel.context_parallel import replicated_over_cp
from megatron_apt.parallel.state import ParallelState

PAPER_HEAD_FRACTIONS = (16 / 36, 26 / 36, 36 / 36)


def default_head_layers(num_layers: int, fractions=PAPER_HEAD_FRACTIONS) -> tuple[int, ...]:
    """Layers (1-based) after which heads read the visual tokens: 16, 26, 36 for 36 layers,
    the same fractions (rounded, at least 1) for other depths; repeats are allowed."""
    return tuple(min(num_layers, max(1, round(f * num_layers))) for f in fractions)


@dataclass(kw_only=True)
class DiscriminatorConfig:
    head_layers: tuple[int, ...] | None = None  # None: default_head_layers(num_layers)
    head_num_heads: int | None = None  # attention heads of each logit head (backbone's)
    norm_eps: float = 1e-6


class CrossAttentionHead(nn.Module):
    """One learnable query token cross-attending to ``[B, N, h]`` tokens -> ``[B, h]``."""

    def __init__(self, hidden: int, num_heads: int, mcfg, ps: ParallelState, eps: float):
        super().__init__()
        if num_heads % ps.tp_size:
            raise ValueError(f"head_num_heads={num_heads} not divisible by TP={ps.tp_size}")
        self.heads_local, self.head_dim, self.eps = (
            num_heads // ps.tp_size,
            hidden // num_heads,
            eps,
        )
        init = nn.init.xavier_uniform_
        kw = dict(config=mcfg, init_method=init, bias=True, tp_group=ps.tp_group)
        self.query = nn.Parameter(torch.randn(hidden) * 0.02)
        self.norm_q = nn.LayerNorm(hidden, eps=eps)
        self.norm_kv = nn.LayerNorm(hidden, eps=eps)
        self.q = ColumnParallelLinear(hidden, hidden, gather_output=False, **kw)
        # No kv bias: a key bias shifts every logit of a row equally (softmax ignores it, so
        # its gradient is pure round-off that RMSprop would amplify) and a value bias is a
        # constant that the output bias already covers.
        self.kv = ColumnParallelLinear(
            hidden, 2 * hidden, gather_output=False, **{**kw, "bias": False}
        )
        self.out = RowParallelLinear(
            hidden, hidden, input_is_parallel=True, skip_bias_add=False, **kw
        )

    def forward(self, tokens_bnh: torch.Tensor) -> torch.Tensor:
        b, n, _ = tokens_bnh.shape
        q_in = self.norm_q(self.query).expand(1, b, -1)  # [1, b, h]
        q, _ = self.q(q_in)  # [1, b, h/tp]
        kv, _ = self.kv(self.norm_kv(tokens_bnh).transpose(0, 1))  # [N, b, 2h/tp]
        q = q.view(1, b, self.heads_local, self.head_dim).permute(1, 2, 0, 3)  # [b, nh, 1, hd]
        k, v = kv.view(n, b, self.heads_local, 2, self.head_dim).unbind(3)
        k, v = (t.permute(1, 2, 0, 3) for t in (k, v))  # [b, nh, N, hd]
        o = F.scaled_dot_product_attention(q, k, v)  # [b, nh, 1, hd]
        o = o.permute(2, 0, 1, 3).reshape(1, b, -1)  # [1, b, h/tp]
        out, _ = self.out(o)  # [1, b, h] (all-reduced over TP)
        return (self.query + out)[0]  # residual on the query token: [b, h]


class Discriminator(nn.Module):
    """D̂(x, t, c) -> logit ``[B]``; ``backbone`` is the velocity model of any family
    (:mod:`~megatron_apt.models.families`; the diffusion weights): it returns the visual tokens
    after given blocks (``return_layers``, ``features_only``) and names what those cannot
    depend on (``unused_by_features``)."""

    def __init__(self, backbone: nn.Module, cfg: DiscriminatorConfig | None = None):
        super().__init__()
        cfg = cfg or DiscriminatorConfig()
        mcfg_b = backbone.cfg
        self.backbone, self.cfg = backbone, cfg
        self.head_layers = tuple(cfg.head_layers or default_head_layers(mcfg_b.num_layers))
        for k in self.head_layers:
            if not 1 <= k <= mcfg_b.num_layers:
                raise ValueError(
                    f"head_layers={self.head_layers}: head layer {k} outside "
                    f"1..{mcfg_b.num_layers} (the backbone's num_layers)"
                )
        ps, d = backbone.ps, mcfg_b.hidden_size
        # Heads read gathered (full) tokens: build their linears without sequence parallel.
        plain = ParallelState(**{**ps.__dict__, "sequence_parallel": False})
        opts = build_options()  # a skeleton build (meta device) must not allocate on CUDA
        cpu_init = opts.use_cpu_initialization
        if cpu_init is None:
            cpu_init = backbone.patch_embed.weight.device.type == "cpu"
        mcfg = linear_config(  # the heads' linears only: no FFN, the backbone's head width
            num_layers=mcfg_b.num_layers, hidden_size=d, num_heads=mcfg_b.num_heads,
            ffn_hidden_size=4 * d, head_dim=mcfg_b.head_dim, ps=plain,
            params_dtype=backbone.patch_embed.weight.dtype, use_cpu_init=cpu_init,
            initialize=opts.initialize,
        )  # fmt: skip
        nh = cfg.head_num_heads or mcfg_b.num_heads
        self.heads = nn.ModuleList(
            CrossAttentionHead(d, nh, mcfg, plain, cfg.norm_eps) for _ in self.head_layers
        )
        if not opts.initialize:
            ensure_tp_attributes(self.heads)  # megatron sets them in its (skipped) init only
        self.norm = nn.LayerNorm(d * len(self.head_layers), eps=cfg.norm_eps)
        self.proj = nn.Linear(d * len(self.head_layers), 1)
        for new in (self.heads, self.norm, self.proj):  # the backbone keeps its own dtypes
            new.to(backbone.patch_embed.weight.dtype)  # (Wan's fp32 islands stay fp32)
        self._freeze_unused_backbone()

    def _freeze_unused_backbone(self) -> None:
        """Parameters that cannot influence the logit (the output layer, blocks after the last
        head, the text MLP of that block) are frozen so optimizers and ZeRO skip them; every
        parameter that does influence the logit stays trainable (the paper trains them all)."""
        for unused in self.backbone.unused_by_features(max(self.head_layers)):
            unused.requires_grad_(False)

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        pooled_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B]`` (float32) of clean latents ``[B, C, T, H, W]`` at timesteps ``[B]``;
        ``text_mask`` is passed through as it is: keep it on the host (``models/inputs.py``),
        and concatenate the masks of a ``[real; fake; perturbed]`` batch there too."""
        feats = self.backbone(
            latents,
            timesteps,
            text,
            text_mask,
            pooled_text,
            return_layers=self.head_layers,
            features_only=True,
        )
        # the heads run on the gathered tokens, identically on every context-parallel rank
        logit = replicated_over_cp(self._heads, self.backbone.ps, *feats)  # [B, 1]
        return logit[:, 0].float()

    def _heads(self, *feats: torch.Tensor) -> torch.Tensor:
        tokens = [head(f) for head, f in zip(self.heads, feats)]  # each [B, h]
        return self.proj(self.norm(torch.cat(tokens, dim=-1)))  # [B, 1]
