"""SAT for Hugging Face Transformers: the second integration of the one method.

    from megatron_sat import SATConfig
    from megatron_sat.hf import apply_sat, add_sat_callback

    model = apply_sat(model, SATConfig(total_iters=max_steps))
    trainer = Trainer(model, args, ...)
    add_sat_callback(trainer)          # a SATCallback ahead of the report_to loggers

Importance, selection and schedules are :mod:`megatron_sat`'s own (SAT_SPEC); this
package only adapts them to HF's module layout and ``Trainer`` (docs/SFT.md).  Imports
are lazy so ``megatron_sat.hf.sft_data`` stays usable without torch-heavy imports.
"""

import importlib

_EXPORTS = {
    "apply_sat": "megatron_sat.hf.apply",
    "remove_sat": "megatron_sat.hf.apply",
    "sat_config_of": "megatron_sat.hf.apply",
    "SATError": "megatron_sat.hf.apply",
    "SUPPORTED": "megatron_sat.hf.apply",
    "SATCallback": "megatron_sat.hf.callback",
    "add_sat_callback": "megatron_sat.hf.callback",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron_sat.hf' has no attribute {name!r}")
