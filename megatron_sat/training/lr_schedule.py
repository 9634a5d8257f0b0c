"""Learning rate as a pure function of the iteration (linear warm-up, then decay).

Why a function and not a scheduler object: the only state is the iteration, which the
checkpoint already holds, so a resumed run gets the exact same learning rate with
nothing extra to save or restore.
"""

from __future__ import annotations

import math

from megatron_sat.training.configs import OptimizerConfig


def lr_at(cfg: OptimizerConfig, iteration: int, train_iters: int) -> float:
    """Learning rate for the step that follows ``iteration`` completed steps."""
    warmup = cfg.lr_warmup_iters
    if warmup and iteration < warmup:
        return cfg.lr * (iteration + 1) / warmup
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    decay_iters = cfg.lr_decay_iters or train_iters
    if iteration >= decay_iters:
        return cfg.min_lr
    ratio = (iteration - warmup) / max(1, decay_iters - warmup)
    if cfg.lr_decay_style == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    else:  # linear
        coeff = 1.0 - ratio
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * coeff
