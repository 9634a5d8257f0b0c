"""Where an iteration's time goes (``--timing-log-level`` 1 or 2, Megatron's flag).

Why our own small timer: the split must add up to the iteration time the throughput
line reports, so each phase is timed with the same clock, back to back, with a device
synchronisation at each boundary (as Megatron's timers do at level >= 1).  SAT selection
runs inside the forward pass; the layers time it themselves
(:func:`megatron_sat.control.pop_sat_selection_seconds`) and it is moved out of
"forward" so the parts do not overlap.  Evaluation and checkpointing happen between
iterations, are excluded from tokens/s, and are reported on their own.  The host
process's CPU time per iteration is logged too (``time_cpu_ms``): on a shared CPU
machine it is what other jobs' load does not inflate.
"""

from __future__ import annotations

import contextlib
import time

import torch

SPLIT_KEYS = ("data", "forward", "sat_selection", "backward", "optimizer")
EXCLUDED_KEYS = ("eval", "checkpoint")


class IterationTimers:
    """Accumulates seconds per phase; a no-op (and no synchronisation) when disabled."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.device = device
        self.seconds = dict.fromkeys(SPLIT_KEYS + EXCLUDED_KEYS, 0.0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - t0

    def move_selection_out_of_forward(self, selection_seconds: float) -> None:
        self.seconds["sat_selection"] += selection_seconds
        self.seconds["forward"] -= selection_seconds

    def pop(self, keys) -> dict:
        """``{key: seconds}`` for ``keys`` since the last pop of them; resets them."""
        out = {k: self.seconds[k] for k in keys}
        for k in keys:
            self.seconds[k] = 0.0
        return out
