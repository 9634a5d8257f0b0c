"""Neuron importance (SAT_SPEC §1) and its aggregation to heads and channels (§2).

Why fp32 and no_grad: scores only rank units; they must not enter autograd, and bf16
sums over thousands of tokens lose the ordering that the selection depends on.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_sat.config import METRICS


# Scoring reads each weight once in row chunks of at most this many elements, upcasting
# one chunk at a time: a bf16 7B MLP weight (22016 x 4096) needs 64 MB of fp32 scratch
# instead of a full-size fp32 copy (360 MB) plus its ``abs()`` (another 360 MB).
SCORE_CHUNK_ELEMENTS = 1 << 24


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 tensors; fp64 stays fp64 (float64 reference tests)."""
    return torch.promote_types(dtype, torch.float32)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown importance metric {metric!r}; use one of {', '.join(METRICS)}")


@torch.no_grad()
def input_stats(metric: str, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The per-micro-batch input statistic a metric needs (SAT_SPEC §3 rev 2), no collective.

    Args:
        metric: ``uniform`` | ``magnitude`` | ``wanda`` | ``maxip``.
        x: ``[..., d_in]`` the layer's (normalised) input for every local token.
    Returns:
        ``maxip``: the token mean ``x̄`` ``[d_in]``; ``wanda``: the per-column sums of
        squares ``Σ_t X[t, i]²`` ``[d_in]``; both accumulated and returned in fp32 (fp64
        for fp64 input).  ``None`` for the input-independent ``uniform`` / ``magnitude``.
    Why these two: they are what DP / sequence shards can combine exactly — means of
    equal token counts average, sums of squares add — so scores formed *after* the
    reduction equal scores over the union of the shards' tokens (§3).
    """
    _check_metric(metric)
    if metric in ("uniform", "magnitude"):
        return None
    x2 = x.reshape(-1, x.shape[-1])  # [n, d_in]; a view for contiguous input
    acc = _accumulation_dtype(x2.dtype)
    if metric == "maxip":
        return x2.mean(dim=0, dtype=acc)  # [d_in]: x̄
    # wanda: ‖X[:, i]‖₂² without an upcast copy of X: one chunk of rows at a time.
    n, d_in = x2.shape
    out = torch.zeros(d_in, dtype=acc, device=x2.device)
    step = max(1, SCORE_CHUNK_ELEMENTS // max(1, d_in))
    for i in range(0, n, step):
        chunk = x2[i:i + step].to(acc)
        out.add_((chunk * chunk).sum(dim=0))  # [d_in]
    return out


@torch.no_grad()
def scores_from_stats(metric: str, weight: torch.Tensor,
                      stats: Optional[torch.Tensor]) -> torch.Tensor:
    """Neuron scores ``s_j`` (SAT_SPEC §1) from already-reduced input statistics.

    Args:
        metric: ``uniform`` | ``magnitude`` | ``wanda`` | ``maxip``.
        weight: ``[d_out, d_in]`` PyTorch weight in its stored dtype; neuron ``j`` is row ``j``.
        stats: what :func:`input_stats` returned (after any DP / sequence reduction);
            ``None`` for ``uniform`` / ``magnitude``.
    Returns:
        ``[d_out]`` fp32 scores.
    Never materialises a full-size upcast (or ``abs``) copy of ``weight``: rows are
    upcast a chunk of at most :data:`SCORE_CHUNK_ELEMENTS` at a time, and an fp32 /
    fp64 weight is read in place.
    """
    _check_metric(metric)
    d_out, d_in = weight.shape
    if metric == "uniform":
        return torch.ones(d_out, dtype=torch.float32, device=weight.device)
    acc = _accumulation_dtype(weight.dtype)
    if metric != "magnitude":
        if stats is None or stats.shape != (d_in,):
            raise ValueError(f"metric {metric!r} needs input statistics [{d_in}], got "
                             f"{None if stats is None else tuple(stats.shape)}")
        vec = stats.to(acc)
        if metric == "wanda":
            vec = vec.sqrt()  # ‖X[:, i]‖₂, taken after the reduction (§3)
    out = torch.empty(d_out, dtype=acc, device=weight.device)
    step = max(1, SCORE_CHUNK_ELEMENTS // max(1, d_in))
    for i in range(0, d_out, step):
        w = weight[i:i + step]
        w = w if w.dtype == acc else w.to(acc)  # [c, d_in] scratch, never the full weight
        if metric == "magnitude":
            torch.linalg.vector_norm(w, dim=1, out=out[i:i + step])
        elif metric == "wanda":
            torch.mv(w.abs(), vec, out=out[i:i + step])  # Σ_i ‖X[:, i]‖₂ · |W[j, i]|
        else:
            torch.mv(w, vec, out=out[i:i + step])
    if metric == "maxip":
        out.abs_()  # |x̄ · W[j]|
    return out.float()


@torch.no_grad()
def neuron_scores(metric: str, weight: torch.Tensor, inputs: torch.Tensor | None) -> torch.Tensor:
    """Importance ``s_j`` of each row of ``weight`` on one set of tokens (SAT_SPEC §1).

    The convenience composition ``scores_from_stats(metric, weight, input_stats(metric,
    inputs))`` with no reduction; the layers go through :mod:`megatron_sat.unit_selection`.

    Args:
        metric: ``uniform`` | ``magnitude`` | ``wanda`` | ``maxip``.
        weight: ``[d_out, d_in]`` PyTorch weight; neuron ``j`` is ``weight[j]``.
        inputs: ``[..., d_in]`` the layer's (normalised) input for every local token;
            unused by ``uniform`` and ``magnitude``.
    Returns:
        ``[d_out]`` fp32 scores.
    """
    _check_metric(metric)
    d_in = weight.shape[1]
    if metric in ("wanda", "maxip") and (inputs is None or inputs.shape[-1] != d_in):
        raise ValueError(f"metric {metric!r} needs inputs [..., {d_in}], got "
                         f"{None if inputs is None else tuple(inputs.shape)}")
    stats = input_stats(metric, inputs) if inputs is not None else None
    return scores_from_stats(metric, weight, stats)


def normalize(unit_scores: torch.Tensor) -> torch.Tensor:
    """``Ŝ_h = S_h / Σ S`` over the last dim; ``1/n`` everywhere when the sum is 0 (§2).

    Branch-free (``torch.where``) so it never synchronises host and device.
    """
    n = unit_scores.shape[-1]
    total = unit_scores.sum(dim=-1, keepdim=True)
    safe = torch.where(total == 0, torch.ones_like(total), total)
    return torch.where(total == 0, torch.full_like(unit_scores, 1.0 / n), unit_scores / safe)


def qkv_head_scores(scores: torch.Tensor, num_groups: int, q_per_group: int,
                    head_dim: int) -> torch.Tensor:
    """Per-matrix head sums of fused-QKV neuron scores, in megatron-core's layout.

    ``scores`` is ``[ng * (q + 2) * d]``, laid out per query group as
    ``[q_1 … q_q, k, v]`` (REFERENCE §3).  Returns ``[ng, q + 2]``: columns ``0..q-1``
    are ``S^Q`` of the group's query heads, column ``q`` is ``S^K`` and ``q + 1`` is ``S^V``.
    """
    return scores.view(num_groups, q_per_group + 2, head_dim).sum(dim=-1)


def attention_unit_scores(head_sums: torch.Tensor) -> torch.Tensor:
    """Selectable-unit scores from ``[ng, q + 2]`` head sums (SAT_SPEC §2, revision 2).

    Each matrix is normalised over its own local heads so Q, K and V weigh equally.
    Returns ``[ng, q]``:
    - MHA (``q = 1``): the score of whole head ``g``, ``Ŝ^Q_g + Ŝ^K_g + Ŝ^V_g``;
    - GQA (``q > 1``): the score of each query head, ``Ŝ^Q_h`` alone.  K and V of every
      group always stay, so ``Ŝ^K_g + Ŝ^V_g`` would add one constant to all candidates
      of a group: harmless for top-k, but it flattens ``ŝ = s / mean(s)`` and makes
      sampling nearly uniform (why revision 2 dropped it).
    """
    ng, qp2 = head_sums.shape
    q = qp2 - 2
    s_q = normalize(head_sums[:, :q].reshape(-1)).view(ng, q)  # over all local query heads
    if q > 1:
        return s_q
    s_k = normalize(head_sums[:, q])  # [ng]
    s_v = normalize(head_sums[:, q + 1])  # [ng]
    return s_q + (s_k + s_v).unsqueeze(1)  # [ng, 1]


def mlp_channel_scores(fc1_scores: torch.Tensor) -> torch.Tensor:
    """Channel score ``Ŝ^gate_c + Ŝ^up_c`` from the ``[2f]`` scores of ``linear_fc1``.

    megatron-core's local ``linear_fc1`` rows are ``[gate_local; up_local]``.
    """
    gate, up = fc1_scores.view(2, -1)
    return normalize(gate) + normalize(up)  # [f]
