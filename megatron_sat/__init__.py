"""megatron-sat: Sparsity-Accelerated Training for Llama-2 on megatron-core + DeepSpeed.

The method is defined in SAT_SPEC.md; the public pieces are re-exported here lazily, so
that light tools (data preprocessing) do not pay for importing torch and megatron-core.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "SATConfig": "megatron_sat.config",
    "neuron_scores": "megatron_sat.importance",
    "omission_rates": "megatron_sat.schedule",
    "select": "megatron_sat.selection",
    "selection_generator": "megatron_sat.selection",
    "get_sat_layer_spec": "megatron_sat.spec",
    "set_sat_iteration": "megatron_sat.control",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron_sat' has no attribute {name!r}")
