"""Per-layer SAT state: iteration and rate, seeded generator, the iteration's selection
cache and the reduction of input statistics (SAT_SPEC §3, revision 2).

Why a separate object: attention and MLP — in megatron-core and in Hugging Face layers —
share the bookkeeping (which iteration it is, which rate applies, which generator to
draw from, what was kept this iteration) but not the maths.  The trainer reaches it only
through :func:`megatron_sat.control.set_sat_iteration`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

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
        # The selection of the current iteration (§3 rev 2): what ``unit_selection``
        # stored at the first training forward of ``_cache_iteration``.
        self._cache: Optional[Any] = None
        self._indices: Optional[tuple] = None  # (selection, what the layer derived from it)
        self._cache_iteration: Optional[int] = None
        self._cache_counts = (num_units, num_units)
        # Where to reduce statistics over data parallelism: ``None`` = megatron-core's DP
        # group (when initialised); integrations without megatron groups (Hugging Face
        # under DeepSpeed) set their own group here.
        self.data_parallel_group = None
        # --timing-log-level >= 1: seconds spent selecting (statistics, their reduction,
        # scores, draw), summed until the trainer collects them.
        self.time_selection = False
        self.selection_seconds = 0.0
        self.set_iteration(0)

    @property
    def tp_rank(self) -> int:
        if self.tp_group is None or not dist.is_initialized():
            return 0
        return dist.get_rank(self.tp_group)

    def set_iteration(self, iteration: int) -> float:
        """Move to iteration ``t``; returns this layer's omission rate ``ρ`` for it.

        A new ``t`` drops the previous iteration's cached selection; setting the same
        ``t`` again (e.g. once per micro-batch) keeps it, so all micro-batches of ``t``
        train the same sub-network (§3 rev 2).
        """
        if int(iteration) != self._cache_iteration:
            self.clear_selection()
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

    # ------------------------------------------------------------ selection cache
    def cached_selection(self) -> Optional[Any]:
        """This iteration's selection, or ``None`` before its first training forward.

        A Python lookup: reusing indices costs no collective and no host–device sync.
        """
        if self._cache is None or self._cache_iteration != self.iteration:
            return None
        self.last_kept, self.last_total = self._cache_counts
        return self._cache

    def derived_indices(self, selection: Any, build: Callable[[Any], Any]) -> Any:
        """``build(selection)`` (e.g. the sliced ops' rows and columns), once per selection.

        Why: every micro-batch and recomputed forward of an iteration reuses the cached
        selection, so the index arithmetic derived from it need not run again either.
        Keyed on the selection object itself, which a new selection always replaces.
        """
        if self._indices is None or self._indices[0] is not selection:
            self._indices = (selection, build(selection))
        return self._indices[1]

    def store_selection(self, selection: Any) -> None:
        """Keep ``selection`` (index tensors) for the rest of this iteration."""
        self._cache = selection
        self._cache_iteration = self.iteration
        self._cache_counts = (self.last_kept, self.last_total)

    def selection_timer_start(self, x: torch.Tensor) -> Optional[float]:
        """Start timing a fresh selection (``None`` when timing is off)."""
        if not self.time_selection:
            return None
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        return time.perf_counter()

    def selection_timer_stop(self, x: torch.Tensor, t0: Optional[float]) -> None:
        if t0 is None:
            return
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.selection_seconds += time.perf_counter() - t0

    def clear_selection(self) -> None:
        self._cache = None
        self._indices = None
        self._cache_iteration = None

    # ------------------------------------------------------------ statistics
    def reduce_stats(self, stats: Optional[torch.Tensor],
                     sequence_group=None) -> Optional[torch.Tensor]:
        """Combine this rank's input statistics with its peers' (SAT_SPEC §3 rev 2).

        ``maxip``'s token mean ``x̄`` is averaged (every rank holds the same number of
        tokens), ``wanda``'s column sums of squares are added.  Two reductions:

        - ``sequence_group``: the ranks holding the other slices of the same sequences
          (megatron's TP group under sequence parallelism).  Always reduced when given
          with size > 1, because a sequence slice alone is not the layer's input.
        - the data-parallel group, when ``config.dp_consistent`` and DP > 1, so every
          replica scores the union of all replicas' first micro-batches and trains the
          same sub-network.

        ``None`` (``uniform`` / ``magnitude``) returns ``None`` with no collective.
        """
        if stats is None or not dist.is_initialized():
            return stats
        groups = []
        if sequence_group is not None and dist.get_world_size(sequence_group) > 1:
            groups.append(sequence_group)
        if self.config.dp_consistent:
            dp = self.data_parallel_group
            if dp is None:
                dp = _data_parallel_group()
            if dp is not None and dist.get_world_size(dp) > 1:
                groups.append(dp)
        for group in groups:
            stats = stats.contiguous()
            dist.all_reduce(stats, group=group)  # in place: sum over the group
            if self.config.metric == "maxip":
                stats = stats / dist.get_world_size(group)  # mean of equal-count means
        return stats

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


def _data_parallel_group():
    """megatron's DP group when it has more than one rank, else ``None``."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_data_parallel_world_size() == 1:
        return None
    return parallel_state.get_data_parallel_group()
