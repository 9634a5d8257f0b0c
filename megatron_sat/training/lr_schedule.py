"""Learning rate and weight decay from megatron-core's ``OptimizerParamScheduler``.

Why megatron-core's scheduler: it is the code Megatron-LM users already trust, with its
exact warm-up semantics (the step after ``n`` completed iterations runs at
``init + (lr - init) * n / warmup``, so step 1 of a warm-up runs at ``--lr-warmup-init``,
0 by default), and it brings cosine, linear, constant, WSD (warm-up, stable, decay;
common for continual pre-training) and inverse-square-root decay, plus weight-decay
schedules.

Why we set its step count instead of stepping it: the learning rate stays a pure function
of the completed-iteration count, which the checkpoint already holds, so a resumed run
gets the exact learning rate of an uninterrupted one with no scheduler state to save
(one step is one iteration here; Megatron counts samples, the ratios are the same).
"""

from __future__ import annotations

from megatron_sat.training.configs import ConfigError, OptimizerConfig


class _Groups:
    """The ``optimizer`` the scheduler drives: anything with ``param_groups``."""

    def __init__(self, param_groups):
        self.param_groups = param_groups


class LRSchedule:
    """Sets ``lr`` and ``weight_decay`` of ``param_groups`` for a given iteration.

    Groups may carry ``wd_mult`` (0 for norms), which the scheduler multiplies in.
    """

    def __init__(self, cfg: OptimizerConfig, train_iters: int, param_groups):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        decay = cfg.lr_decay_iters or train_iters
        if cfg.lr_warmup_iters >= decay:
            raise ConfigError(f"--lr-warmup-iters {cfg.lr_warmup_iters} must be below the decay "
                              f"span {decay} (--lr-decay-iters, else --train-iters)")
        if cfg.lr_decay_style == "WSD" and cfg.wsd_decay_iters > decay:
            raise ConfigError(f"--lr-wsd-decay-iters {cfg.wsd_decay_iters} exceeds the decay "
                              f"span {decay}")
        start_wd = cfg.weight_decay if cfg.start_weight_decay is None else cfg.start_weight_decay
        end_wd = cfg.weight_decay if cfg.end_weight_decay is None else cfg.end_weight_decay
        self._sched = OptimizerParamScheduler(
            _Groups(param_groups), init_lr=cfg.lr_warmup_init, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.lr_warmup_iters, lr_decay_steps=decay,
            lr_decay_style=cfg.lr_decay_style, start_wd=start_wd, end_wd=end_wd,
            wd_incr_steps=decay, wd_incr_style=cfg.weight_decay_incr_style,
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
            wsd_decay_steps=cfg.wsd_decay_iters, lr_wsd_decay_style=cfg.wsd_decay_style)

    def apply(self, iteration: int) -> float:
        """Set the groups for the step that follows ``iteration`` completed steps."""
        self._sched.num_steps = iteration
        self._sched.step(0)
        return self._sched.get_lr({})


def lr_at(cfg: OptimizerConfig, iteration: int, train_iters: int) -> float:
    """Learning rate for the step that follows ``iteration`` completed steps."""
    return LRSchedule(cfg, train_iters, [{}]).apply(iteration)
