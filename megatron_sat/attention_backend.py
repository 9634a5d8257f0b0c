"""Which attention backend a run uses: names, flash-attn availability, resolution.

Why apart from :mod:`megatron_sat.core_attention`: the trainer validates
``--attention-backend`` while parsing flags, before anything imports megatron-core or
flash-attn; this module needs only torch.  ``flash-attn`` is imported lazily, once, and
its absence (or a build for another CUDA/torch) only means "not available".
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "unfused")
FLASH_DTYPES = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def _flash_attn_func():
    """flash-attn's ``flash_attn_func``, or ``None`` when the package cannot be imported."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # ImportError, or a build for another CUDA/torch: both mean "absent"
        return None
    return flash_attn_func


def flash_available() -> bool:
    return _flash_attn_func() is not None


def flash_problem(device_type: str, dtype: torch.dtype) -> Optional[str]:
    """Why ``flash`` cannot run here (one line), or ``None`` when it can."""
    if device_type != "cuda":
        return ("--attention-backend flash needs a CUDA GPU (flash-attn has no CPU kernel); "
                "use --attention-backend sdpa or auto")
    if dtype not in FLASH_DTYPES:
        return (f"--attention-backend flash needs bf16 or fp16 (flash-attn), not {dtype}; "
                "add --bf16 or use --attention-backend sdpa")
    if not flash_available():
        return ("--attention-backend flash: the flash-attn package is not installed; "
                "pip install 'megatron-sat[flash]' or use --attention-backend sdpa")
    return None


def resolve_attention_backend(requested: str, device_type: str, dtype: torch.dtype) -> str:
    """The backend a run actually uses: ``auto`` → flash when it can run, else sdpa.

    Raises ``ValueError`` (one line) for an unknown name or ``flash`` where it cannot run.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend {requested!r} is not one of "
                         f"{', '.join(ATTENTION_BACKENDS)}")
    if requested == "auto":
        return "flash" if flash_problem(device_type, dtype) is None else "sdpa"
    if requested == "flash":
        problem = flash_problem(device_type, dtype)
        if problem:
            raise ValueError(problem)
    return requested
