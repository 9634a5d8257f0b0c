"""The trainer's handle on SAT layers: tell them the iteration, read what they kept.

Why one documented call instead of global state: the schedule is a pure function of the
iteration (SAT_SPEC §5), so a training loop — or a resumed one — only has to say which
iteration it is about to run, with :func:`set_sat_iteration`, before the forward pass.
"""

from __future__ import annotations

import torch

from megatron_sat.sat_state import SATLayerState


def _sat_modules(model: torch.nn.Module):
    for module in model.modules():
        if isinstance(getattr(module, "sat_state", None), SATLayerState):
            yield module


def set_sat_iteration(model: torch.nn.Module, iteration: int) -> tuple[float, float]:
    """Set iteration ``t`` (completed iterations, 0-based) on every SAT layer of ``model``.

    Call it once before each training step's forward, including the first step after
    a resume.  A new ``t`` drops the previous iteration's cached selection; the first
    training forward of ``t`` then selects, and every later micro-batch and recomputed
    forward of ``t`` reuses it (SAT_SPEC §3 rev 2).  Calling it again with the same ``t``
    keeps the selection.  Returns the ``(ρ_attn, ρ_mlp)`` now in force (``(0, 0)``
    without SAT).
    """
    rates = {"attn": 0.0, "mlp": 0.0}
    for module in _sat_modules(model):
        rates[module.sat_state.kind] = module.sat_state.set_iteration(iteration)
    return rates["attn"], rates["mlp"]


def sat_kept_fractions(model: torch.nn.Module) -> dict:
    """Kept fractions of the last forward, averaged over layers (1.0 when dense).

    Keys: ``attn_q`` (query heads), ``attn_kv`` (K/V heads: below 1 only for MHA, where
    a dropped head drops its K and V too), ``mlp`` (channels).  Used for FLOPs (§6).
    """
    q, kv, mlp = [], [], []
    for module in _sat_modules(model):
        st = module.sat_state
        frac = st.last_kept / st.last_total
        if st.kind == "mlp":
            mlp.append(frac)
        else:
            q.append(frac)
            kv.append(frac if module.sat_q_per_group == 1 else 1.0)

    def mean(v):
        return sum(v) / len(v) if v else 1.0

    return {"attn_q": mean(q), "attn_kv": mean(kv), "mlp": mean(mlp)}


def sat_external_parameters(model: torch.nn.Module) -> list:
    """``(module, param)`` pairs a SAT layer reads without calling the child's forward.

    Under DeepSpeed ZeRO-3 register each with
    ``deepspeed.zero.register_external_parameter(module, param)`` so it is gathered.
    """
    return [(m, p) for m in _sat_modules(model) for p in m.sat_external_parameters()]


def set_track_frequency(model: torch.nn.Module, on: bool = True) -> None:
    """Count how often each head / channel is kept (``sat_state.frequency``)."""
    for module in _sat_modules(model):
        module.sat_state.track_frequency = on


def set_sat_timing(model: torch.nn.Module, on: bool = True) -> None:
    """Time every fresh selection (``--timing-log-level`` >= 1; syncs CUDA around it)."""
    for module in _sat_modules(model):
        module.sat_state.time_selection = on


def pop_sat_selection_seconds(model: torch.nn.Module) -> float:
    """Seconds spent selecting since the last call, summed over layers (this rank)."""
    total = 0.0
    for module in _sat_modules(model):
        total += module.sat_state.selection_seconds
        module.sat_state.selection_seconds = 0.0
    return total
