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


def linear_rows(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight[rows]ᵀ (+ bias[rows])``: a column-parallel linear on kept output rows.

    x: ``[..., d_in]``; weight: ``[d_out, d_in]``; rows: ``[k]`` → ``[..., k]``.
    """
    w = weight.index_select(0, rows)  # [k, d_in]
    b = bias.index_select(0, rows) if bias is not None else None
    return F.linear(x, w, b)


def linear_cols(x: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x @ weight[:, cols]ᵀ``: a row-parallel linear restricted to kept input columns.

    x: ``[..., k]``; weight: ``[d_out, d_in]``; cols: ``[k]`` → ``[..., d_out]``.
    """
    w = weight.index_select(1, cols)  # [d_out, k]
    return F.linear(x, w)


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
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    mask = None
    if attention_mask is not None:
        mask = ~attention_mask.bool()  # SDPA: True = attend
        causal = False
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=causal, scale=scale)
    sq, b = query.shape[:2]
    return ctx.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [sq, b, nq * d]
