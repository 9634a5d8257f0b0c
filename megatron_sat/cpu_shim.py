"""Make megatron-core 0.16 run on a machine without CUDA (REFERENCE.md §1).

megatron-core assumes CUDA in a few places that matter for training: it asks
``torch.cuda.current_device()`` when it builds RoPE frequencies and TP buffers, its
RNG tracker (used by tensor-parallel init and dropout) saves and restores the CUDA RNG,
and the default causal mask of the unfused softmax is created on ``"cuda"``.
On a CPU-only host we answer ``"cpu"`` for the device and give the tracker a CPU RNG
with the same interface.  Nothing is patched when CUDA is available, so GPU runs use
stock megatron-core.

Call :func:`install` once before building a model; it is idempotent.
"""

from __future__ import annotations

import contextlib

import torch

_INSTALLED = False


class CpuRNGStatesTracker:
    """Drop-in for megatron's ``CudaRNGStatesTracker`` that keeps CPU generator states.

    Why: megatron forks a named RNG state around TP weight init and dropout, so that
    TP ranks draw different dropout masks while DP ranks draw the same ones.  The
    semantics (named states, ``fork`` swaps the global state in and out) are kept.
    """

    def __init__(self, *args, **kwargs):
        self.states_ = {}
        self.seeds_ = set()
        self.use_cudagraphable_rng = False

    def is_initialized(self):
        return bool(self.states_)

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states):
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name, seed):
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def install() -> bool:
    """Activate the shim when CUDA is absent. Returns True if it is active."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda seed: None  # CPU seed is set by torch.manual_seed
    torch.cuda.manual_seed_all = lambda seed: None

    from megatron.core.tensor_parallel import random as mrandom

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mrandom.initialize_rng_tracker(force_reset=True)

    # The default causal mask is built with device="cuda" (and cached).
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as mutils

    @functools.lru_cache(maxsize=32)
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    mutils.get_default_causal_mask = cpu_causal_mask
    fused_softmax.get_default_causal_mask = cpu_causal_mask
    _INSTALLED = True
    return True
