"""Sliced linear algebra for SAT: compute with kept rows / columns of a full weight.

Why a module of its own: this is the hot path (SAT_SPEC §4).  Forward gathers the
kept slices; autograd writes the slice gradients into the full parameter's gradient
and leaves omitted slices at exactly zero.  Keeping it here lets the fast path change
without touching the layers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _inverse_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """``inv[j] = position of j in idx``, or ``len(idx)`` (the zero slot) when j is not kept."""
    k = idx.numel()
    inv = torch.full((n,), k, dtype=torch.long, device=idx.device)
    return inv.index_put_((idx,), torch.arange(k, device=idx.device))


def _slice_grad_to_full(dy2: torch.Tensor, x2: torch.Tensor, idx: torch.Tensor, n: int,
                        dim: int, padded_gemm: Optional[bool] = None) -> torch.Tensor:
    """The full-size weight gradient whose kept slice (along ``dim``) is ``dy2ᵀ @ x2``.

    The slice GEMM writes straight into a buffer with one extra, zeroed slot; one gather
    (``index_select`` with the inverse index) then lays out the full gradient: every
    element is written once, no separate zero fill of the full tensor, no ``index_add_``
    atomics, no strided scatter.  Deterministic.  ``padded_gemm`` (default: on CUDA)
    lets the column-slice GEMM write into the padded buffer directly.
    """
    k = idx.numel()
    if dim == 0:  # kept rows: slice is [k, d_in]
        buf = dy2.new_empty(k + 1, x2.shape[1])
        torch.mm(dy2.t(), x2, out=buf[:k])
        buf[k].zero_()
    elif dy2.is_cuda if padded_gemm is None else padded_gemm:  # kept columns: slice is [d_out, k]
        buf = dy2.new_empty(dy2.shape[1], k + 1)
        torch.mm(dy2.t(), x2, out=buf[:, :k])  # cuBLAS writes with leading dim k + 1
        buf[:, k].zero_()
    else:  # on CPU a GEMM into a padded view goes through a temporary; pad afterwards
        g = dy2.t() @ x2  # [d_out, k]
        buf = torch.cat([g, g.new_zeros(g.shape[0], 1)], dim=1)
    return buf.index_select(dim, _inverse_index(idx, n))


class _LinearRows(torch.autograd.Function):
    """``y = x @ W[rows]ᵀ (+ b[rows])`` with a slice-only backward.

    Saves exactly what dense ``F.linear`` saves — the input and a *reference* to the
    full weight — plus the ``[k]`` indices; the kept rows are gathered again in backward.
    Why not save the gathered slice: it is a second copy of the kept weights per
    micro-batch in flight (≈ 8 GB bf16 for Llama-2-7B at 62.5 % kept) and would break
    "peak memory within 2 % of dense".  A reference also lets DeepSpeed ZeRO-3 re-gather
    the partitioned parameter before backward, as it does for ``F.linear``.
    Backward computes the ``[k, d_in]`` slice gradient with one matmul and returns a
    full-size gradient laid out by :func:`_slice_grad_to_full` (exact zeros in the
    omitted rows).  Returning the gradient, rather than writing ``weight.grad``, keeps
    autograd's ``AccumulateGrad`` — and the DeepSpeed / megatron DDP hooks on it — in
    charge of accumulation.
    """

    @staticmethod
    def forward(ctx, x, weight, rows, bias):
        w = weight.index_select(0, rows)  # [k, d_in], contiguous; freed after forward
        b = bias.index_select(0, rows) if bias is not None else None
        y = F.linear(x, w, b)  # [..., k]
        ctx.save_for_backward(x, weight, rows)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, rows = ctx.saved_tensors
        dx = dw = db = None
        dy2 = dy.reshape(-1, dy.shape[-1])  # [n, k]
        if ctx.needs_input_grad[0]:
            w = weight.index_select(0, rows)  # [k, d_in], re-gathered
            dx = (dy2 @ w).view(*dy.shape[:-1], w.shape[1])  # [..., d_in]
        if ctx.needs_input_grad[1]:
            dw = _slice_grad_to_full(dy2, x.reshape(-1, x.shape[-1]), rows,
                                     weight.shape[0], 0)  # [d_out, d_in]
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = dy2.sum(dim=0)  # [k]
            db = gb.new_zeros(weight.shape[0]).index_copy_(0, rows, gb)
        return dx, dw, None, db


class _LinearCols(torch.autograd.Function):
    """``y = x @ W[:, cols]ᵀ`` with a slice-only backward (see :class:`_LinearRows`).

    The kept columns are gathered through the transposed view, ``Wᵀ[cols]`` (``[k, d_out]``,
    contiguous), so forward and backward run plain GEMMs on it; only the weight reference
    and ``cols`` are saved, the gather is repeated in backward.  The slice gradient
    ``[d_out, k]`` is laid out in the kept columns of a full-size gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, cols):
        wt = weight.t().index_select(0, cols)  # [k, d_out], contiguous rows of Wᵀ
        y = torch.matmul(x, wt)  # [..., d_out]
        ctx.save_for_backward(x, weight, cols)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, cols = ctx.saved_tensors
        dx = dw = None
        dy2 = dy.reshape(-1, dy.shape[-1])  # [n, d_out]
        if ctx.needs_input_grad[0]:
            wt = weight.t().index_select(0, cols)  # [k, d_out], re-gathered
            dx = F.linear(dy, wt)  # [..., k] = dy @ wtᵀ
        if ctx.needs_input_grad[1]:
            dw = _slice_grad_to_full(dy2, x.reshape(-1, x.shape[-1]), cols,
                                     weight.shape[1], 1)  # [d_out, d_in]
        return dx, dw, None


def linear_rows(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight[rows]ᵀ (+ bias[rows])``: a column-parallel linear on kept output rows.

    x: ``[..., d_in]``; weight: ``[d_out, d_in]``; rows: ``[k]`` distinct → ``[..., k]``.
    The weight's gradient is full size with exactly zero in the rows not kept.
    """
    return _LinearRows.apply(x, weight, rows, bias)


def linear_cols(x: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x @ weight[:, cols]ᵀ``: a row-parallel linear restricted to kept input columns.

    x: ``[..., k]``; weight: ``[d_out, d_in]``; cols: ``[k]`` distinct → ``[..., d_out]``.
    The weight's gradient is full size with exactly zero in the columns not kept.
    """
    return _LinearCols.apply(x, weight, cols)


def linear_rows_reference(x, weight, rows, bias=None):
    """The autograd-through-``index_select`` formulation, kept for tests and benchmarks."""
    w = weight.index_select(0, rows)
    b = bias.index_select(0, rows) if bias is not None else None
    return F.linear(x, w, b)


def linear_cols_reference(x, weight, cols):
    """The autograd-through-``index_select`` formulation of :func:`linear_cols`."""
    return F.linear(x, weight.index_select(1, cols))


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: Optional[torch.Tensor] = None, *, causal: bool = True,
              scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled-dot-product attention in megatron's ``[s, b, heads, d]`` layout.

    query ``[sq, b, nq, d]``, key/value ``[sk, b, nkv, d]`` with ``nq % nkv == 0`` (GQA)
    → ``[sq, b, nq * d]``.  ``attention_mask`` follows megatron (True = masked out); with
    no mask, ``causal`` picks causal or full attention.  PyTorch SDPA dispatches to flash
    kernels on GPU and to its fused CPU kernel otherwise.  Dropout draws from the current
    RNG; callers fork megatron's tracker around it.
    """
    q = query.permute(1, 2, 0, 3)  # [b, nq, sq, d]
    k = key.permute(1, 2, 0, 3)  # [b, nkv, sk, d]
    v = value.permute(1, 2, 0, 3)
    mask = None
    if attention_mask is not None:
        mask = ~attention_mask.bool()  # SDPA: True = attend
        causal = False
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=causal, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])  # no K/V copies
    sq, b = query.shape[:2]
    return ctx.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [sq, b, nq * d]
