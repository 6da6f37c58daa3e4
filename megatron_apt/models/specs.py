"""Layer specs: which kernels build the MMDiT (the model file holds the architecture only).

* ``local``: megatron-core ``ColumnParallelLinear``/``RowParallelLinear`` and torch
  ``scaled_dot_product_attention``. Runs everywhere (CPU with gloo included).
* ``te``: Transformer Engine linears through megatron-core's TE wrappers and TE's fused
  attention; BF16, or FP8 with ``fp8=True`` (TE's ``autocast``, ``fp8_autocast`` before TE
  2.9, with delayed scaling, amaxes reduced over the group the model passes: TP x DP x CP,
  megatron's amax reduction group).
* ``te-flash``: TE linears with flash-attn as the attention core.

Transformer Engine and flash-attn are imported only when their spec is requested, so a CPU
install never touches them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_size
from torch import nn

from megatron_apt.utils.transfer import to_device


class SDPAttention(nn.Module):
    """Joint attention core on torch SDPA. q, k, v: ``[S, b, heads, hd]``; ``key_mask``:
    ``[b, S]`` bool (True = attend) or None. Returns ``[S, b, heads * hd]``."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim

    def forward(self, q, k, v, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        s, b = q.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, S, hd]
        key_mask = as_key_mask(key_mask)
        mask = None if key_mask is None else key_mask.mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [b, h, S, hd]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.num_heads * self.head_dim)


def _right_padded_lengths(key_mask: torch.Tensor) -> torch.Tensor | None:
    """Per-sample key counts when every mask row is a prefix of Trues (the valid keys first,
    as the per-sequence lengths of TE and flash-attn describe them), else None. Reads the
    mask's values: free for a host mask, a host synchronization for a device mask."""
    holes = key_mask[:, 1:] & ~key_mask[:, :-1]  # [b, S-1]: a valid key after a padded one
    return None if bool(holes.any()) else key_mask.sum(dim=1)


@dataclass(frozen=True)
class VarlenKeys:
    """A right-padded key mask as the varlen kernels take it (tensors on the compute device)."""

    lengths: torch.Tensor  # [b] valid keys per sample
    cu_seqlens: torch.Tensor  # [b + 1] int32, cumulative
    max_len: int
    index: torch.Tensor  # [sum(lengths)] positions of the valid keys in the flattened [b * S]


class KeyMask:
    """A ``[b, S]`` key mask of the joint sequence (True = attend) with what the attention
    kernels derive from it, made once per forward and shared by every layer (recomputed
    blocks included).

    ``mask`` may live on the host (a CPU tensor; the model's contract for ``text_mask``, see
    :mod:`megatron_apt.models.masks`) or on the compute ``device`` (default: the mask's).
    :attr:`mask` and :attr:`valid_rows` are on ``device``; :meth:`varlen` reads the host copy
    when there is one, so that it needs no host synchronization; from a device mask it makes
    three (``any``, ``max``, ``nonzero``), once per forward rather than once per layer."""

    def __init__(self, mask: torch.Tensor, device: torch.device | str | None = None):
        mask = mask.bool()
        self.device = mask.device if device is None else torch.device(device)
        self.host = mask if mask.device.type == "cpu" else None
        self.mask = to_device(mask, self.device)  # [b, S]
        # joint self-attention: the key mask is the query mask too
        self.valid_rows = self.mask.t()  # [S, b]
        self._varlen: VarlenKeys | None | bool = False  # False: not computed yet

    def varlen(self) -> VarlenKeys | None:
        """The varlen form when every row is a prefix of Trues, else None (then use SDPA)."""
        if self._varlen is False:
            src = self.host if self.host is not None else self.mask
            lengths = _right_padded_lengths(src)
            if lengths is None:
                self._varlen = None
            else:
                cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))  # [b + 1]
                index = torch.nonzero(src.reshape(-1)).squeeze(1)  # [sum(lengths)]
                self._varlen = VarlenKeys(
                    lengths=to_device(lengths, self.device),
                    cu_seqlens=to_device(cu, self.device),
                    max_len=int(lengths.max()),
                    index=to_device(index, self.device),
                )
        return self._varlen


def as_key_mask(key_mask: torch.Tensor | KeyMask | None) -> KeyMask | None:
    if key_mask is None or isinstance(key_mask, KeyMask):
        return key_mask
    return KeyMask(key_mask)


def check_flash_dtype(dtype: torch.dtype) -> None:
    """flash-attn 2.8 runs fp16/bf16 only (its C++ entry checks ``q_dtype == at::kHalf ||
    q_dtype == at::kBFloat16``: "FlashAttention only support fp16 and bf16 data type"); say
    what to change instead of letting the kernel fail mid-step."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"flash-attn runs fp16/bf16 only, the model computes in {dtype}: train with --bf16 "
            "(generate with --dtype bf16), or use the 'te' / 'local' layer spec"
        )


class FlashAttention(nn.Module):
    """flash-attn core (fp16/bf16 on CUDA). Without a mask: ``flash_attn_func``; with a
    right-padded key mask (text padding at the end of the joint sequence): the varlen kernel
    over the valid keys; any other mask falls back to SDPA."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        import flash_attn  # noqa: F401  (fail at build time, not at the first step)

        self.num_heads, self.head_dim = num_heads, head_dim
        self.fallback = SDPAttention(num_heads, head_dim)

    def forward(self, q, k, v, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        check_flash_dtype(q.dtype)

        s, b = q.shape[:2]
        q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))  # [b, S, h, hd]
        if key_mask is None:
            out = flash_attn_func(q, k, v)
            return out.transpose(0, 1).reshape(s, b, -1)
        key_mask = as_key_mask(key_mask)
        keys = key_mask.varlen()  # computed once per forward, shared by the layers
        if keys is None:
            return self.fallback(*(t.transpose(0, 1) for t in (q, k, v)), key_mask)
        cu_q = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
        out = flash_attn_varlen_func(
            q.reshape(b * s, *q.shape[2:]),
            k.reshape(b * s, *k.shape[2:]).index_select(0, keys.index),  # no host sync
            v.reshape(b * s, *v.shape[2:]).index_select(0, keys.index),
            cu_q,
            keys.cu_seqlens,
            s,
            keys.max_len,
        )
        return out.reshape(b, s, -1).transpose(0, 1)


class TEAttention(nn.Module):
    """Transformer Engine ``DotProductAttention`` (fused/flash kernels chosen by TE). With a
    padding mask TE treats padded tokens as padded queries too and leaves their output and
    dq/dk/dv rows unwritten in ``sbhd``; the block zeroes them (``models/masks.py``)."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        import transformer_engine.pytorch as te

        self.num_heads, self.head_dim = num_heads, head_dim
        self.core = te.DotProductAttention(
            num_heads,
            head_dim,
            attention_dropout=0.0,
            qkv_format="sbhd",
            attn_mask_type="padding",
            tp_size=1,
        )
        self.core_nomask = te.DotProductAttention(
            num_heads,
            head_dim,
            attention_dropout=0.0,
            qkv_format="sbhd",
            attn_mask_type="no_mask",
            tp_size=1,
        )
        self.fallback = SDPAttention(num_heads, head_dim)

    def forward(self, q, k, v, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if key_mask is None:
            return self.core_nomask(q, k, v)
        # TE turns a padding mask into cumulative sequence lengths, i.e. it counts the valid
        # keys and takes them to come first (transformer_engine/pytorch/attention/
        # dot_product_attention/utils.py ``get_cu_seqlens``: ``mask.logical_not().sum(dim=1)``
        # then ``cumsum``). Under context parallelism the key order is [x_0; c_0; x_1; c_1]
        # with padded text in each c_i: holes TE would misread. Such masks go to SDPA.
        key_mask = as_key_mask(key_mask)
        if key_mask.varlen() is None:  # once per forward (KeyMask), not per layer
            return self.fallback(q, k, v, key_mask)
        te_mask = ~key_mask.mask[:, None, None, :]  # TE: True = masked out
        return self.core(q, k, v, attention_mask=te_mask)


class _SingleRankGemm:
    """Mixin for megatron-core's parallel linears: with a tensor-parallel group of one rank the
    GEMM is ``F.linear`` (bias fused into ``addmm``) instead of megatron's autograd function,
    which at TP=1 computes the same ``x W^T + b`` with the bias added in a separate pass over
    the output. Everything else (parameters, initialization, TP metadata, state dict, the
    mappings and ``skip_bias_add`` of ``forward``) is megatron's; with TP > 1 nothing changes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._single_rank = get_pg_size(self.tp_group) == 1  # megatron's own count

    def _forward_impl(self, input, weight, bias=None, *args, **kwargs):
        if self._single_rank:
            return F.linear(input, weight, bias)
        return super()._forward_impl(input, weight, bias, *args, **kwargs)


def ensure_tp_attributes(module: nn.Module) -> None:
    """Give the weights of megatron's parallel linears their tensor-parallel attributes
    (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``) where megatron did
    not: it sets them inside its init functions only, which ``perform_initialization=False``
    skips (megatron-core 0.16.1, tensor_parallel/layers.py:855-884), and TP reductions,
    conversion and export read them."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for m in module.modules():
        dim = (
            0
            if isinstance(m, ColumnParallelLinear)
            else 1
            if isinstance(m, RowParallelLinear)
            else None
        )
        w = getattr(m, "weight", None) if dim is not None else None
        if w is not None and not hasattr(w, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(w, True, dim, 1)


class LocalColumnParallelLinear(_SingleRankGemm, ColumnParallelLinear):
    """megatron-core ``ColumnParallelLinear`` (see :class:`_SingleRankGemm`)."""


class LocalRowParallelLinear(_SingleRankGemm, RowParallelLinear):
    """megatron-core ``RowParallelLinear`` (see :class:`_SingleRankGemm`)."""


@dataclass(frozen=True)
class LayerSpec:
    """The kernels of one MMDiT build. Linears follow megatron-core's calling convention:
    ``out, bias = linear(x_sbh)``."""

    name: str
    column_linear: Callable[..., nn.Module]
    row_linear: Callable[..., nn.Module]
    attention: Callable[[int, int], nn.Module]
    uses_te: bool = False
    fp8: bool = False
    fp8_recipe_kwargs: dict[str, Any] = field(default_factory=dict)

    def autocast(self, amax_group=None) -> contextlib.AbstractContextManager:
        """The context to run the model's forward in: TE's FP8 autocast with delayed scaling
        and amaxes reduced over ``amax_group`` (:attr:`ParallelState.amax_group`, TP x DP x
        CP as megatron), or nothing."""
        if not (self.uses_te and self.fp8):
            return contextlib.nullcontext()
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import DelayedScaling, Format

        kwargs = {"fp8_format": Format.HYBRID, "amax_history_len": 1024, "amax_compute_algo": "max"}
        kwargs.update(self.fp8_recipe_kwargs)
        return te_autocast(te, DelayedScaling(**kwargs), amax_group)


def te_autocast(te, recipe, amax_group) -> contextlib.AbstractContextManager:
    """TE's quantization autocast under the name each TE version has.

    TE >= 2.9: ``te.autocast(enabled=True, calibrating=False, recipe=None,
    amax_reduction_group=None, _graph=False)`` (transformer_engine/pytorch/quantization.py:
    790-796 in 2.9 and 2.10, :800-806 in 2.11; exported by pytorch/__init__.py:51 in 2.9,
    :43 in 2.10/2.11); ``fp8_autocast(enabled, calibrating, fp8_recipe, fp8_group, _graph)``
    is kept there as a deprecated wrapper that warns and calls ``autocast(recipe=fp8_recipe,
    amax_reduction_group=fp8_group)`` (quantization.py:756-786 in 2.9). Older TE has only
    ``fp8_autocast`` (pytorch/__init__.py:49 in 2.8)."""
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=amax_group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_group)


def linear_config(
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    ffn_hidden_size: int,
    head_dim: int,
    ps,
    params_dtype: torch.dtype,
    use_cpu_init: bool,
    initialize: bool = True,
) -> TransformerConfig:
    """The megatron-core config that every family's parallel linears read (``ps``: its
    :class:`~megatron_apt.parallel.state.ParallelState`)."""
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        ffn_hidden_size=ffn_hidden_size,
        kv_channels=head_dim,
        tensor_model_parallel_size=ps.tp_size,
        context_parallel_size=ps.cp_size,
        sequence_parallel=ps.sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_init,
        perform_initialization=initialize,
        gradient_accumulation_fusion=False,
        add_bias_linear=True,
        # TE linears cache their FP8 weight (and its transpose) on the first micro-batch and
        # reuse it while ``is_first_microbatch`` is False, which megatron sets after every call
        # and only its pipeline schedules reset (megatron-core 0.16.1,
        # extensions/transformer_engine.py:671-678, TELinear.forward). We train outside those
        # schedules: without this the FP8 weights would stay those of the first step forever.
        disable_parameter_transpose_cache=True,
    )


def local_spec() -> LayerSpec:
    return LayerSpec("local", LocalColumnParallelLinear, LocalRowParallelLinear, SDPAttention)


def te_spec(fp8: bool = False, attention: str = "te") -> LayerSpec:
    """Transformer Engine linears (BF16 or FP8) with TE or flash-attn attention (needs CUDA)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the Transformer Engine spec needs a CUDA device; use spec='local'")
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TERowParallelLinear,
        )
    except (ImportError, RuntimeError) as e:
        raise ImportError(
            "Transformer Engine is not usable here: install the `gpu` extra "
            "(pip install 'megatron-apt[gpu]') on a machine with CUDA"
        ) from e
    cores = {"te": TEAttention, "flash": FlashAttention}
    if attention not in cores:
        raise ValueError(f"attention={attention!r}: use one of {sorted(cores)}")
    return LayerSpec(
        f"te{'-fp8' if fp8 else ''}{'-flash' if attention == 'flash' else ''}",
        TEColumnParallelLinear,
        TERowParallelLinear,
        cores[attention],
        uses_te=True,
        fp8=fp8,
    )


def get_spec(name: str) -> LayerSpec:
    """``local`` | ``te`` | ``te-fp8`` | ``te-flash`` | ``te-fp8-flash`` | ``auto``
    (``te`` when CUDA and TE are present, else ``local``)."""
    if name == "auto":
        try:
            return te_spec()
        except (ImportError, RuntimeError):
            return local_spec()
    if name == "local":
        return local_spec()
    head, *parts = name.split("-")
    if head == "te" and not set(parts) - {"fp8", "flash"} and len(set(parts)) == len(parts):
        return te_spec(fp8="fp8" in parts, attention="flash" if "flash" in parts else "te")
    raise ValueError(
        f"unknown layer spec {name!r}; use local, te, te-fp8, te-flash, te-fp8-flash or auto"
    )
