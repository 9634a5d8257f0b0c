"""The DeepSpeed engine: config from our flags, AdamW, and a skippable optimizer step.

Why these choices:

* The optimizer is a torch ``AdamW`` handed to DeepSpeed as a client optimizer. On GPU it
  runs as torch's fused kernel; on CPU it is the plain implementation. Neither needs
  DeepSpeed's JIT-compiled ``FusedAdam``/``CPUAdam``.
* DeepSpeed only skips a step on overflow for fp16. We need NaN/inf skips in fp32 and
  bf16 and for every ZeRO stage, so the optimizer itself can be told to skip its next
  ``step()``: master weights and Adam moments then stay untouched, whatever ZeRO does
  around it.
* On a CPU-only host DeepSpeed's ``TorchBackend`` JIT-compiles a shared-memory
  all-reduce op (``deepspeed_shm_comm``, ~90 s on 2 cores) at start-up. Plain gloo
  collectives work without it, so we mark the op unavailable unless
  ``MEGATRON_SAT_DS_SHM=1`` asks for it.
* The learning rate and weight decay are set by the training loop through
  :class:`~megatron_sat.training.lr_schedule.LRSchedule` (megatron-core's scheduler), not
  by a DeepSpeed scheduler, so resume needs no scheduler state.
"""

from __future__ import annotations

import logging
import os

import torch

from megatron_sat.training.configs import ConfigError, TrainConfig


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next ``step()`` can be turned into a no-op (for NaN/inf iterations)."""

    skip_next: bool = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip_next:
            return None
        return super().step(closure)


def _avoid_cpu_jit() -> None:
    if torch.cuda.is_available() or os.environ.get("MEGATRON_SAT_DS_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(cfg: TrainConfig) -> dict:
    """Merge the user's ``ds_config.json`` with our flags; flags are the source of truth.

    A JSON value that contradicts a flag (other than ``"auto"``) is a one-line error.
    """
    user: dict = {}
    path = cfg.engine.deepspeed_config
    if path:
        from megatron_sat.tools.cli import ToolError
        from megatron_sat.tools.file_checks import read_json

        try:
            user = read_json(path, "--deepspeed_config", "give a DeepSpeed JSON config object")
        except ToolError as e:
            raise ConfigError(str(e)) from None
        user = dict(user)
    problems = []
    for section in ("optimizer", "scheduler"):
        if section in user:
            problems.append(f"{path} has an '{section}' section; remove it, the trainer builds "
                            f"AdamW and the LR schedule from --lr/--min-lr/--lr-warmup-iters")
    if user.get("fp16", {}).get("enabled") is True:
        problems.append(f"{path} enables fp16, which is not supported; use bf16")
    json_bf16 = user.get("bf16", {}).get("enabled")
    if json_bf16 is True and not cfg.engine.bf16:
        problems.append(f"{path} enables bf16 but --bf16 is not given; add --bf16")

    def put(key, value):
        if key in user and user[key] not in ("auto", value):
            problems.append(f"{path} sets {key}={user[key]} but the flags give {value}")
        user[key] = value

    b = cfg.batch
    put("train_micro_batch_size_per_gpu", b.micro_batch_size)
    put("gradient_accumulation_steps", b.grad_accumulation_steps)
    put("train_batch_size", b.micro_batch_size * b.grad_accumulation_steps
        * b.data_parallel_size)
    put("gradient_clipping", cfg.optimizer.clip_grad)
    if problems:
        raise ConfigError("; ".join(problems))
    zero = dict(user.get("zero_optimization", {}))
    zero["stage"] = cfg.engine.zero_stage if cfg.engine.zero_stage is not None \
        else int(zero.get("stage", 0))
    user["zero_optimization"] = zero
    if cfg.engine.bf16:
        user["bf16"] = {**user.get("bf16", {}), "enabled": True}
    user["zero_allow_untested_optimizer"] = True
    user.setdefault("steps_per_print", 10 ** 12)
    user.setdefault("wall_clock_breakdown", False)
    return user


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> SkippableAdamW:
    """AdamW; 1-D tensors (RMSNorm weights) get no weight decay, as in Megatron."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    o = cfg.optimizer
    groups = [{"params": decay, "weight_decay": o.weight_decay, "wd_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}]
    kwargs = {"fused": True} if torch.cuda.is_available() else {}
    return SkippableAdamW([g for g in groups if g["params"]], lr=o.lr,
                          betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, **kwargs)


def build_engine(model: torch.nn.Module, cfg: TrainConfig, mpu):
    """``deepspeed.initialize`` around a megatron-core model; returns (engine, optimizer).

    The returned optimizer is our :class:`SkippableAdamW` (the one DeepSpeed wraps).
    """
    import deepspeed

    _avoid_cpu_jit()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    optimizer = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=mpu,
                                           config=deepspeed_config(cfg))
    if engine.zero_optimization_stage() == 0 and mpu.get_data_parallel_world_size() == 1:
        # One data-parallel rank: nothing to all-reduce, but DeepSpeed's stage-0 path
        # still flattens every gradient into buckets and back each step (~3 passes over
        # all gradients; ~35 ms of a 1.2 s CPU step, measured by benchmarks/bench_e2e.py).
        engine.enable_backward_allreduce = False
    if engine.zero_optimization_stage() == 3 and cfg.sat is not None:
        # SAT layers read their child linears' weights directly; ZeRO-3 must gather them.
        from megatron_sat.control import sat_external_parameters

        for module, param in sat_external_parameters(engine.module):
            deepspeed.zero.register_external_parameter(module, param)
    return engine, optimizer


def param_groups(engine) -> list:
    """The optimizer groups DeepSpeed steps with (its ZeRO wrapper exposes the base ones)."""
    return engine.optimizer.param_groups
