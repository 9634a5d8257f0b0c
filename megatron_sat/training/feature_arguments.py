"""The ``--sat*`` and performance flag groups, shared by every entry point.

Why a module of its own: ``sft_llama.py`` (HF Trainer) takes the same ``--sat*`` flags as
``pretrain_llama.py`` and must turn them into the same :class:`SATConfig`, with the same
one-line errors; the performance group (attention kernel, recomputation, sequence
parallelism, timers) is Megatron-LM's names mapped onto :class:`PerformanceConfig`.
"""

from __future__ import annotations

import argparse
from typing import Optional

from megatron_sat.config import LADDER_SPACINGS, METRICS, SATConfig, SCHEDULES, SELECTIONS
from megatron_sat.training.configs import ConfigError, PerformanceConfig


def add_sat_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--sat*`` flags, shared by ``pretrain_llama.py`` and ``sft_llama.py``."""
    g = p.add_argument_group("SAT (see SAT_SPEC.md)")
    d = SATConfig()
    g.add_argument("--sat", action="store_true", help="enable Sparsity-Accelerated Training")
    g.add_argument("--sat-metric", default=d.metric, choices=METRICS,
                   help="neuron importance score (SAT_SPEC §2)")
    g.add_argument("--sat-selection", default=d.selection, choices=SELECTIONS,
                   help="keep the top scores, or sample by temperature (SAT_SPEC §3)")
    g.add_argument("--sat-temperature", type=float, default=d.temperature,
                   help="sampling temperature for --sat-selection sampling")
    g.add_argument("--sat-attn-omission-rate", type=float, default=d.attn_omission_rate,
                   help="fraction of attention heads skipped per iteration")
    g.add_argument("--sat-mlp-omission-rate", type=float, default=d.mlp_omission_rate,
                   help="fraction of MLP channels skipped per iteration")
    g.add_argument("--sat-schedule", default=d.schedule, choices=SCHEDULES,
                   help="how omission rates fall to 0 from --sat-decay-start (SAT_SPEC §4)")
    g.add_argument("--sat-decay-start", type=int, default=d.decay_start)
    g.add_argument("--sat-ladder-rungs", type=int, default=d.ladder_rungs)
    g.add_argument("--sat-ladder-spacing", default=d.ladder_spacing, choices=LADDER_SPACINGS)
    g.add_argument("--sat-seed", type=int, help="default: --seed")
    g.add_argument("--sat-dp-consistent", action=argparse.BooleanOptionalAction,
                   default=d.dp_consistent)


def sat_config_from_args(a, total_iters: int, seed: int) -> Optional[SATConfig]:
    """``SATConfig`` from parsed ``--sat*`` flags (``None`` without ``--sat``)."""
    sat_flags_given = [f for f in ("sat_metric", "sat_selection", "sat_schedule")
                       if getattr(a, f) != getattr(SATConfig(), f[4:])]
    if sat_flags_given and not a.sat:
        raise ConfigError(f"--{sat_flags_given[0].replace('_', '-')} given without --sat; "
                          f"add --sat to enable SAT")
    if not a.sat:
        return None
    try:
        return SATConfig(enabled=True, metric=a.sat_metric, selection=a.sat_selection,
                         temperature=a.sat_temperature,
                         attn_omission_rate=a.sat_attn_omission_rate,
                         mlp_omission_rate=a.sat_mlp_omission_rate, schedule=a.sat_schedule,
                         decay_start=a.sat_decay_start, total_iters=total_iters,
                         ladder_rungs=a.sat_ladder_rungs, ladder_spacing=a.sat_ladder_spacing,
                         seed=seed if a.sat_seed is None else a.sat_seed,
                         dp_consistent=a.sat_dp_consistent)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _add_performance_args(p: argparse.ArgumentParser) -> None:
    """Megatron-LM's names for the attention kernel, recomputation, SP and timers."""
    g = p.add_argument_group("performance (attention kernel, recomputation, timers)")
    g.add_argument("--attention-backend", default="auto",
                   help="auto (flash when installed and applicable, else sdpa), flash "
                        "(flash-attn; CUDA, bf16), sdpa (PyTorch) or unfused (megatron-core's "
                        "DotProductAttention); dense and SAT steps use the same one")
    g.add_argument("--use-flash-attn", action="store_true",
                   help="Megatron-DeepSpeed's alias for --attention-backend flash")
    g.add_argument("--recompute-granularity", choices=["full", "selective"],
                   help="recompute activations in the backward pass: whole layers (full) or "
                        "the attention core only (selective); the recomputed forward keeps "
                        "the iteration's SAT selection")
    g.add_argument("--recompute-method", choices=["uniform", "block"],
                   help="with full: chunks of --recompute-num-layers layers (uniform) or only "
                        "the first --recompute-num-layers layers (block)")
    g.add_argument("--recompute-num-layers", type=int,
                   help="with full (default: 1, as in Megatron-DeepSpeed)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split the sequence over the TP ranks outside the TP regions (TP >= 2)")
    g.add_argument("--timing-log-level", type=int, default=0,
                   help="1 (or 2): split each iteration into data, forward, SAT selection, "
                        "backward and optimizer time, and report evaluation and checkpoint "
                        "time; synchronises the device at each boundary")


def _performance_from_args(a, tp: int, num_layers: int) -> PerformanceConfig:
    backend = a.attention_backend
    if a.use_flash_attn:
        if backend not in ("auto", "flash"):
            raise ConfigError(f"--use-flash-attn contradicts --attention-backend {backend}; "
                              f"give one of them")
        backend = "flash"
    return PerformanceConfig(backend, a.recompute_granularity, a.recompute_method,
                             a.recompute_num_layers, a.sequence_parallel, a.timing_log_level,
                             tp, num_layers)
