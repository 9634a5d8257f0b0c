"""One iteration's choice of kept heads / channels, shared by every SAT integration.

SAT_SPEC §1–§3 (revision 2) as a single pipeline: cache lookup → input statistics of
the first micro-batch → reduction over sequence shards and data parallelism → neuron
scores → head / channel scores → ``k`` → ``topk`` or Plackett–Luce sampling with the
``(seed, t, l, r)`` generator → record → cache.

Why framework-agnostic: the megatron-core layers and the Hugging Face Llama layers
must make exactly the same choice from the same weights and tokens.  Each integration
only says how to turn reduced statistics into head sums (its fused or separate Q/K/V
layout) or into ``[gate; up]`` neuron scores; everything else lives here once.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_sat.importance import attention_unit_scores, input_stats, mlp_channel_scores
from megatron_sat.sat_state import SATLayerState
from megatron_sat.selection import num_kept, select

Stats = Optional[torch.Tensor]


def _reduced_stats(state: SATLayerState, x: torch.Tensor, sequence_group) -> Stats:
    stats = input_stats(state.config.metric, x)  # [d_in] or None; no collective
    return state.reduce_stats(stats, sequence_group=sequence_group)


@torch.no_grad()
def select_heads(state: SATLayerState, x: torch.Tensor,
                 head_sums_fn: Callable[[Stats], torch.Tensor], num_groups: int,
                 q_per_group: int, sequence_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept attention heads of this iteration (SAT_SPEC §2, §3).

    Args:
        state: the attention layer's :class:`SATLayerState` (rate, generator, cache).
        x: ``[..., h]`` the (normalised) input of the Q/K/V projections on this rank.
        head_sums_fn: maps the reduced input statistics (``None`` for ``uniform`` /
            ``magnitude``) to ``[ng, q + 2]`` head sums: columns ``0..q-1`` are ``S^Q``
            of the group's query heads, ``q`` is ``S^K``, ``q + 1`` is ``S^V``.
        num_groups: local query groups ``ng``; q_per_group: ``q`` (1 = MHA).
        sequence_group: the group of ranks holding the other sequence slices
            (sequence parallelism), or ``None``.
    Returns:
        ``(kept_groups [g'], kept_q [g', k_q])``: local group indices, ascending, and per
        kept group the kept query heads' indices within it, ascending.  MHA keeps
        ``g' = k`` whole groups with ``kept_q = 0``; GQA keeps every group with ``k_q``
        query heads each.
    Reuse: later calls in the same iteration (other micro-batches, recomputation) return
    the cached tensors without touching ``x``, any collective or the host.
    """
    cached = state.cached_selection()
    if cached is not None:
        return cached
    t0 = state.selection_timer_start(x)
    cfg, ng, q = state.config, num_groups, q_per_group
    head_sums = head_sums_fn(_reduced_stats(state, x, sequence_group))  # [ng, q + 2]
    if tuple(head_sums.shape) != (ng, q + 2):
        raise ValueError(f"head_sums_fn returned {tuple(head_sums.shape)}, expected "
                         f"[{ng}, {q + 2}] (query heads, K, V per group)")
    units = attention_unit_scores(head_sums)  # [ng, q]
    gen = state.generator(units.device)
    if q == 1:
        k = num_kept(ng, state.rate)
        kept_groups = select(units[:, 0], k, cfg.selection, cfg.temperature, gen)  # [k]
        kept_q = torch.zeros(k, 1, dtype=torch.long, device=units.device)
        state.record(kept_groups, k, ng)
    else:
        k_q = num_kept(q, state.rate)
        kept_q = select(units, k_q, cfg.selection, cfg.temperature, gen)  # [ng, k_q]
        kept_groups = torch.arange(ng, device=units.device)
        state.record(kept_groups.unsqueeze(1) * q + kept_q, ng * k_q, ng * q)
    selection = (kept_groups, kept_q)  # the cached object itself, so later calls match it
    state.store_selection(selection)
    state.selection_timer_stop(x, t0)
    return selection


@torch.no_grad()
def select_channels(state: SATLayerState, x: torch.Tensor,
                    fc1_scores_fn: Callable[[Stats], torch.Tensor], num_channels: int,
                    sequence_group=None) -> torch.Tensor:
    """Kept SwiGLU channels of this iteration (SAT_SPEC §2, §3).

    Args:
        state: the MLP's :class:`SATLayerState`.
        x: ``[..., h]`` the (normalised) input of the gate / up projections on this rank.
        fc1_scores_fn: maps the reduced statistics to ``[2f]`` neuron scores, the ``f``
            gate rows first, then the ``f`` up rows.
        num_channels: local channels ``f``.
        sequence_group: as in :func:`select_heads`.
    Returns:
        ``LongTensor[k]`` of local channel indices, ascending; cached for the iteration.
    """
    cached = state.cached_selection()
    if cached is not None:
        return cached
    t0 = state.selection_timer_start(x)
    cfg = state.config
    scores = fc1_scores_fn(_reduced_stats(state, x, sequence_group))  # [2f]
    if tuple(scores.shape) != (2 * num_channels,):
        raise ValueError(f"fc1_scores_fn returned {tuple(scores.shape)}, expected "
                         f"[{2 * num_channels}] (gate rows, then up rows)")
    channels = mlp_channel_scores(scores)  # [f]
    k = num_kept(num_channels, state.rate)
    kept = select(channels, k, cfg.selection, cfg.temperature, state.generator(channels.device))
    state.record(kept, k, num_channels)
    state.store_selection(kept)
    state.selection_timer_stop(x, t0)
    return kept
