"""Padded text tokens in the joint attention: host-side masks and padded query rows.

**Host masks.** The model takes ``text_mask`` on the host (a CPU bool tensor) even when it
runs on CUDA: every decision that needs the mask's values (is every token real? is every row
a prefix of Trues, as TE and flash-attn's varlen kernels need? the lengths, the longest row,
the valid keys' positions) is then read on the host, where reading costs nothing, and only
the tensors the kernels take are copied to the device, with ``non_blocking=True``
(:func:`megatron_apt.utils.transfer.to_device`). Read on the device, each of those values
would stop the host until the GPU catches up (a host synchronization). A mask given on the
device still works; then those reads do synchronize.

**Padded query rows.** The joint sequence is self-attention, so the key mask is also the
query mask: a padded text token is a padded query row. Nothing downstream reads those rows'
outputs (the text stream is dropped at the end, and padded keys are masked out), but their
*values* still flow into sums: the next layer's weight-gradient GEMMs add ``x_row^T dy_row``
over all rows, and ``0 x NaN = NaN``. Transformer Engine's attention with
``attn_mask_type="padding"`` derives the query lengths from the key mask (self-attention:
``cu_seqlens_q = dpa_utils.get_cu_seqlens(attention_mask)``, TE 2.9
``attention/dot_product_attention/dot_product_attention.py:1198`` and ``backends.py:1791``;
TE 2.10/2.11 ``:1223`` and ``:1806``), so its kernels skip the padded query rows, and its
fused attention allocates ``O`` and ``dQ``/``dK``/``dV`` with ``torch::empty`` and zero-fills
them only for the ``thd`` format: ``if (nvte_get_qkv_format(qkv_layout) ==
NVTE_QKV_Format::NVTE_THD) { te_O.zero_(...) }`` / ``{ dQ.fill_(0); ... }`` (TE 2.9
``pytorch/csrc/extensions/attention.cpp:152-155`` and ``:447-452``; TE 2.10 and 2.11
``:157-160`` and ``:452-457``). With our ``sbhd`` layout in bf16 the padded rows of the
output and of dq/dk/dv are stale memory. (TE's flash-attn backend unpacks into zeros,
``utils.py`` ``_unpack_tensor``, but TE prefers the fused one "on Hopper+", ``utils.py:1119``
in TE 2.9.) :func:`zero_padded_rows`
and :func:`guard_padded_rows` make them exactly zero on every kernel (SDPA, flash-attn, TE),
in the forward and in the gradients, with ``torch.where`` (a product with a 0/1 mask would
keep the NaN). Valid rows are untouched bit for bit.
"""

from __future__ import annotations

import torch


class _ZeroPaddedRowGrads(torch.autograd.Function):
    """Identity on q, k, v; the backward replaces their gradients' padded rows by zeros."""

    @staticmethod
    def forward(ctx, valid_sb11, q, k, v):
        ctx.save_for_backward(valid_sb11)
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (valid,) = ctx.saved_tensors  # [S, b, 1, 1]
        return (None, *(None if g is None else torch.where(valid, g, 0) for g in (dq, dk, dv)))


def guard_padded_rows(q, k, v, valid_sb: torch.Tensor):
    """q, k, v ``[S, b, heads, hd]`` unchanged; in backward the rows of padded tokens
    (``valid_sb [S, b]`` False) get zero gradients, whatever the attention kernel wrote there,
    so nothing stale reaches the QKV weight gradient."""
    return _ZeroPaddedRowGrads.apply(valid_sb[:, :, None, None], q, k, v)


def zero_padded_rows(out_sbh: torch.Tensor, valid_sb: torch.Tensor) -> torch.Tensor:
    """The attention output ``[S, b, h]`` with the rows of padded tokens set to exactly zero
    (their gradient into the kernel is then zero too)."""
    return torch.where(valid_sb[:, :, None], out_sbh, 0)
