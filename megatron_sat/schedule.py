"""Omission-rate schedules, LORS included (SAT_SPEC §5).

Why pure functions of the iteration: a resumed run must see exactly the rates of an
uninterrupted one, so the schedule holds no state beyond the config and ``t``.
"""

from __future__ import annotations

import math

from megatron_sat.config import SATConfig


def ladder_rung_ends(config: SATConfig) -> list[int]:
    """End iteration (exclusive) of each LORS rung; the last one is ``t_end`` (§5).

    Rung ``i`` ends at ``t_s + round(D · Σ_{j≤i} w_j / Σ w)``, half up, computed in
    integers so the rungs tile ``D = t_end − t_s`` exactly.
    """
    n = config.ladder_rungs
    weights = list(range(1, n + 1)) if config.ladder_spacing == "lengthening" else [1] * n
    total = sum(weights)
    span = config.total_iters - config.decay_start
    ends, cum = [], 0
    for w in weights:
        cum += w
        ends.append(config.decay_start + (2 * span * cum + total) // (2 * total))
    return ends


def rate_multiplier(config: SATConfig, iteration: int) -> float:
    """The factor applied to ``ρ_max`` at iteration ``t`` (0-based, completed iterations)."""
    t, ts, te = iteration, config.decay_start, config.total_iters
    if config.schedule == "constant":
        return 1.0
    if t < ts:
        return 1.0
    if t >= te:
        return 0.0
    span = te - ts
    if config.schedule == "linear":
        return 1.0 - (t - ts) / span
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (t - ts) / span))
    n = config.ladder_rungs
    for i, end in enumerate(ladder_rung_ends(config), start=1):
        if t < end:
            return (n - i) / n
    return 0.0


def omission_rates(config: SATConfig, iteration: int) -> tuple[float, float]:
    """``(ρ_attn, ρ_mlp)`` at iteration ``t``; ``(0, 0)`` when SAT is disabled."""
    if not config.enabled:
        return 0.0, 0.0
    m = rate_multiplier(config, iteration)
    return config.attn_omission_rate * m, config.mlp_omission_rate * m


def schedule_phase(config: SATConfig, iteration: int) -> int:
    """Index of the schedule phase ``t`` falls in, for per-phase throughput summaries.

    Phase 0 is the constant part before ``t_s``; for ``ladder`` phase ``i`` is rung
    ``i``; ``linear``/``cosine`` have one decay phase (1); ``constant`` only phase 0.
    """
    if config.schedule == "constant" or iteration < config.decay_start:
        return 0
    if config.schedule in ("linear", "cosine"):
        return 1
    for i, end in enumerate(ladder_rung_ends(config), start=1):
        if iteration < end:
            return i
    return config.ladder_rungs
