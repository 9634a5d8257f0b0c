"""Neuron importance (SAT_SPEC §1) and its aggregation to heads and channels (§2).

Why fp32 and no_grad: scores only rank units; they must not enter autograd, and bf16
sums over thousands of tokens lose the ordering that the selection depends on.
"""

from __future__ import annotations

import torch

from megatron_sat.config import METRICS


@torch.no_grad()
def neuron_scores(metric: str, weight: torch.Tensor, inputs: torch.Tensor | None) -> torch.Tensor:
    """Importance ``s_j`` of each row of ``weight`` (SAT_SPEC §1).

    Args:
        metric: ``uniform`` | ``magnitude`` | ``wanda`` | ``maxip``.
        weight: ``[d_out, d_in]`` PyTorch weight; neuron ``j`` is ``weight[j]``.
        inputs: ``[..., d_in]`` the layer's (normalised) input for every local token;
            unused by ``uniform`` and ``magnitude``.
    Returns:
        ``[d_out]`` fp32 scores.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown importance metric {metric!r}; use one of {', '.join(METRICS)}")
    d_out, d_in = weight.shape
    if metric == "uniform":
        return torch.ones(d_out, dtype=torch.float32, device=weight.device)
    w = weight.float()
    if metric == "magnitude":
        return torch.linalg.vector_norm(w, dim=1)  # [d_out]
    if inputs is None or inputs.shape[-1] != d_in:
        raise ValueError(f"metric {metric!r} needs inputs [..., {d_in}], got "
                         f"{None if inputs is None else tuple(inputs.shape)}")
    x = inputs.reshape(-1, d_in)  # [n, d_in]; reductions accumulate in >= fp32, no copy
    acc = torch.promote_types(x.dtype, torch.float32)
    if metric == "wanda":
        col_norm = torch.linalg.vector_norm(x, dim=0, dtype=acc).float()  # [d_in]: ‖X[:, i]‖₂
        return w.abs() @ col_norm  # [d_out]
    x_mean = x.mean(dim=0, dtype=acc).float()  # [d_in]: x̄
    return (w @ x_mean).abs()  # [d_out]: |x̄ · W[j]|


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
    """Selectable-unit scores from ``[ng, q + 2]`` head sums (SAT_SPEC §2).

    Each matrix is normalised over its own local heads so Q, K and V weigh equally.
    Returns ``[ng, q]``: the score of each query head, ``Ŝ^Q_h + Ŝ^K_g + Ŝ^V_g``.
    For MHA (``q = 1``) this is the score of whole head ``g``.
    """
    ng, qp2 = head_sums.shape
    q = qp2 - 2
    s_q = normalize(head_sums[:, :q].reshape(-1)).view(ng, q)  # over all local query heads
    s_k = normalize(head_sums[:, q])  # [ng]
    s_v = normalize(head_sums[:, q + 1])  # [ng]
    return s_q + (s_k + s_v).unsqueeze(1)  # [ng, q]


def mlp_channel_scores(fc1_scores: torch.Tensor) -> torch.Tensor:
    """Channel score ``Ŝ^gate_c + Ŝ^up_c`` from the ``[2f]`` scores of ``linear_fc1``.

    megatron-core's local ``linear_fc1`` rows are ``[gate_local; up_local]``.
    """
    gate, up = fc1_scores.view(2, -1)
    return normalize(gate) + normalize(up)  # [f]
