"""Per-layer SAT state: current iteration and rate, seeded generator, DP score averaging.

Why a separate object: attention and MLP share the bookkeeping (which iteration it is,
which rate applies, which generator to draw from, what was kept) but not the maths.
The trainer reaches it only through :func:`megatron_sat.control.set_sat_iteration`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_sat.config import SATConfig
from megatron_sat.schedule import omission_rates
from megatron_sat.selection import selection_generator


class SATLayerState:
    """What one SAT sub-layer (attention or MLP) needs besides its weights.

    Args:
        config: the SAT settings (``None`` means SAT disabled: stock behaviour).
        kind: ``"attn"`` or ``"mlp"``; picks the rate and the generator stream.
        layer_number: megatron's 1-based global layer number.
        tp_group: this layer's tensor-parallel group.
        num_units: how many selectable units this rank holds (for frequency stats).
    """

    def __init__(self, config: Optional[SATConfig], kind: str, layer_number: int,
                 tp_group, num_units: int):
        self.config = config if config is not None else SATConfig(enabled=False)
        self.kind = kind
        # (seed, t, l, r) of SAT_SPEC §3: attention and MLP of a layer are separate l.
        self.layer_key = 2 * (layer_number - 1) + (0 if kind == "attn" else 1)
        self.tp_group = tp_group
        self.num_units = num_units
        self.iteration = 0
        self.rate = 0.0
        self.last_kept = num_units
        self.last_total = num_units
        self.track_frequency = False
        self.frequency: Optional[torch.Tensor] = None  # [num_units] times kept
        self.set_iteration(0)

    @property
    def tp_rank(self) -> int:
        if self.tp_group is None or not dist.is_initialized():
            return 0
        return dist.get_rank(self.tp_group)

    def set_iteration(self, iteration: int) -> float:
        """Move to iteration ``t``; returns this layer's omission rate ``ρ`` for it."""
        self.iteration = int(iteration)
        rho_attn, rho_mlp = omission_rates(self.config, self.iteration)
        self.rate = rho_attn if self.kind == "attn" else rho_mlp
        return self.rate

    def active(self, training: bool) -> bool:
        """Sparse compute happens only in training, with SAT on and ``ρ > 0`` (§4)."""
        return training and self.config.enabled and self.rate > 0.0

    def generator(self, device: torch.device) -> torch.Generator:
        return selection_generator(self.config.seed, self.iteration, self.layer_key,
                                   self.tp_rank, device)

    def dp_average(self, scores: torch.Tensor) -> torch.Tensor:
        """Average scores over the data-parallel group when ``dp_consistent`` (§3)."""
        if not self.config.dp_consistent or not dist.is_initialized():
            return scores
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return scores
        world = parallel_state.get_data_parallel_world_size()
        if world == 1:
            return scores
        scores = scores.contiguous()
        dist.all_reduce(scores, group=parallel_state.get_data_parallel_group())
        return scores / world

    def record(self, kept_units: torch.Tensor, kept: int, total: int) -> None:
        """Remember what was kept; optionally count per-unit selection frequency."""
        self.last_kept, self.last_total = kept, total
        if self.track_frequency:
            if self.frequency is None or self.frequency.device != kept_units.device:
                self.frequency = torch.zeros(self.num_units, dtype=torch.long,
                                             device=kept_units.device)
            self.frequency.index_add_(0, kept_units.reshape(-1),
                                      torch.ones_like(kept_units.reshape(-1)))

    def mark_dense(self) -> None:
        self.last_kept = self.last_total = self.num_units
