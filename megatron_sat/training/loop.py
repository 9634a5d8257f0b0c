"""The training loop: SAT iteration, micro-batches, skips, eval, checkpoints, SIGTERM.

Why it looks like this: everything a step depends on (learning rate, SAT rates and
selections, data position) is a pure function of the completed-iteration count, so the
loop only carries a :class:`TrainState` and a resumed run replays an uninterrupted one
exactly. One small all-reduce per iteration makes every rank agree on "this step had a
NaN/inf loss" and "SIGTERM arrived", so all ranks skip, save and stop together.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sat.training import checkpointing as ckpt
from megatron_sat.training.configs import TrainConfig
from megatron_sat.training.data import (MicroBatchReader, build_datasets, check_prefixes,
                                         check_splits)
from megatron_sat.training.engine import build_engine, deepspeed_config, param_groups
from megatron_sat.training.flops import KeptFractions, Recompute, peak_tflops_for_device
from megatron_sat.training.logger import IterationRecord, ThroughputLogger
from megatron_sat.training.lr_schedule import LRSchedule
from megatron_sat.training.reshard import load_full_state, needs_reshard, state_from_header
from megatron_sat.training.timers import EXCLUDED_KEYS, SPLIT_KEYS, IterationTimers


class TrainingAborted(RuntimeError):
    """Too many NaN/inf iterations in a row; a checkpoint was saved if possible."""


class _StopRequest:
    """Remembers a SIGTERM so the loop can save at the next iteration boundary."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        # Restart interrupted system calls: a gloo/NCCL wait that sees EINTR would
        # otherwise fail the collective instead of letting the loop stop cleanly.
        signal.siginterrupt(signal.SIGTERM, False)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _print0(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()  # [b, s]
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


def _forward(engine, batch: dict) -> torch.Tensor:
    """Per-token loss ``[b, s]`` of one micro-batch (causal mask built by the kernel)."""
    return engine(batch["tokens"], batch["position_ids"], attention_mask=None,
                  labels=batch["labels"])


def train_step(engine, optimizer, reader: MicroBatchReader, cfg: TrainConfig, consumed: int,
               iteration: int, stop: _StopRequest,
               timers: Optional[IterationTimers] = None) -> tuple[float, bool, bool]:
    """One optimizer step over ``grad_accumulation_steps`` micro-batches.

    Returns ``(mean local loss, skipped, stop requested on any rank)``.  ``timers``
    (``--timing-log-level``) splits the time into data, forward, backward and optimizer.
    """
    timers = timers or IterationTimers(False, torch.device("cpu"))
    gas = cfg.batch.grad_accumulation_steps
    losses = []
    for m in range(gas):
        with timers("data"):
            batch = reader.get(consumed, m)
        with timers("forward"):
            loss = _masked_mean(_forward(engine, batch), batch["loss_mask"])
        if iteration in cfg.inject_nan_iters:
            loss = loss * float("nan")
        losses.append(loss.detach())
        with timers("backward"):
            engine.backward(loss)
        if m < gas - 1:
            with timers("optimizer"):
                engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    with timers("optimizer"):
        # All ranks agree, before the boundary step, on "skip this step" and "stop after it".
        local = torch.stack(losses)
        flags = torch.tensor([float(not bool(torch.isfinite(local).all())),
                              float(stop.requested)], device=local.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skipped, stop_any = bool(flags[0].item()), bool(flags[1].item())
        optimizer.skip_next = skipped
        engine.step()  # the boundary: clip, optimizer step (a no-op when skipped), zero grads
        optimizer.skip_next = False
    return float(local.mean()), skipped, stop_any


@torch.no_grad()
def evaluate(engine, reader: MicroBatchReader, cfg: TrainConfig) -> float:
    """Mean loss over ``--eval-iters`` fixed validation batches, dense (eval mode)."""
    from megatron.core import parallel_state as ps

    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=_device())
    for k in range(cfg.logging.eval_iters):
        for m in range(cfg.batch.grad_accumulation_steps):
            batch = reader.get(k * cfg.batch.global_batch_size, m)
            per_token, mask = _forward(engine, batch).float(), batch["loss_mask"].float()
            totals += torch.stack([(per_token * mask).sum(), mask.sum()]).double()
    engine.train()
    dist.all_reduce(totals, group=ps.get_data_parallel_group())
    return float(totals[0] / totals[1].clamp(min=1.0))


def _reduce_mean_dp(total: float, count: int) -> float:
    from megatron.core import parallel_state as ps

    t = torch.tensor([total, float(count)], dtype=torch.float64, device=_device())
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _setup_model(cfg: TrainConfig):
    """Model + engine, loading a checkpoint if asked. Returns (engine, optimizer, state)."""
    from megatron.core import parallel_state as ps

    from megatron_sat.model import build_gpt_model
    from megatron_sat.parallel import MPU

    from megatron_sat.training import resume

    c, tp = cfg.checkpoint, cfg.parallel.tensor_model_parallel_size
    it_dir = resume.resolve_load(c.load, c.save, c.ckpt_step, c.finetune)
    if c.load and it_dir is None:
        _print0(f" --load {c.load} (= --save) holds no checkpoint yet; starting from scratch")
    meta = resume.checkpoint_meta(it_dir) if it_dir else None
    resume.check_save_target(cfg, it_dir)
    resume.clear_save_for_overwrite(cfg, it_dir)
    tp_rank = ps.get_tensor_model_parallel_rank()
    if it_dir:
        resume.check_compatible(it_dir, meta, cfg.shape, tp)
    dtype = torch.bfloat16 if cfg.engine.bf16 else torch.float32
    model = build_gpt_model(cfg.shape, cfg.sat, tp=tp, params_dtype=dtype,
                            seq_length=cfg.batch.seq_length,
                            init_method_std=cfg.init_method_std,
                            attention_backend=_attention_backend(cfg),
                            **cfg.perf.model_settings())
    zero = deepspeed_config(cfg)["zero_optimization"]["stage"]
    # Resume at another DP size or ZeRO stage: weights first, the optimizer state after,
    # re-sharded from the checkpoint's full copy (reshard.py).
    reshard = bool(it_dir and not c.weights_only
                   and needs_reshard(meta, cfg.parallel.data_parallel_size, zero))
    if it_dir and (c.weights_only or reshard):
        resume.load_weights(model, it_dir, meta, tp_rank)
    engine, optimizer = build_engine(model, cfg, MPU())
    state = ckpt.TrainState()
    if it_dir and c.finetune:
        _print0(f" loaded weights from {it_dir} (--finetune: optimizer, step and RNG not loaded)")
    elif it_dir and (c.no_load_optim or reshard):
        # Megatron's meaning: weights, iteration and data position; the optimizer only when
        # re-sharding it from the full state; RNG unless --no-load-rng.
        if reshard and not c.no_load_optim:
            load_full_state(engine, it_dir, tp_rank, meta)
        state = ckpt.TrainState(**state_from_header(meta))
        if not c.no_load_rng:
            resume.load_rng(it_dir)
        what = "--no-load-optim: optimizer not loaded" if c.no_load_optim else \
            f"optimizer re-sharded from DP={meta['world_size'] // meta['tp']} ZeRO-" \
            f"{meta.get('zero_stage')} to DP={cfg.parallel.data_parallel_size} ZeRO-{zero}"
        _print0(f" loaded weights from {it_dir} at iteration {state.iteration} ({what})")
    elif it_dir:
        state = resume.load_full(engine, it_dir, meta, restore_rng=not c.no_load_rng)
        _print0(f" resumed from {it_dir} at iteration {state.iteration}")
    state.lineage = resume.lineage_for(cfg, meta, resumed=bool(it_dir and not c.finetune))
    return engine, optimizer, state


def _attention_backend(cfg: TrainConfig) -> str:
    return cfg.perf.resolved_backend(_device().type, cfg.engine.bf16)


def _wandb_kwargs(cfg: TrainConfig) -> Optional[dict]:
    lg = cfg.logging
    if not lg.wandb_project:
        return None
    return {"project": lg.wandb_project, "name": lg.wandb_exp_name, "dir": lg.wandb_save_dir,
            "entity": lg.wandb_entity,
            "config": {"shape": cfg.shape.to_dict(), "sat": cfg.sat.to_dict() if cfg.sat else None,
                       "global_batch_size": cfg.batch.global_batch_size,
                       "seq_length": cfg.batch.seq_length, "lr": cfg.optimizer.lr}}


def pretrain(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; returns the throughput/loss summary. Collective on all ranks."""
    from megatron.core import parallel_state as ps

    check_prefixes(cfg.data)
    check_splits(cfg.data)
    engine, optimizer, state = _setup_model(cfg)
    device = _device()
    datasets = build_datasets(cfg.data, cfg.batch, cfg.shape.vocab_size, cfg.train_iters,
                              cfg.logging.eval_iters, cfg.seed)
    dp_rank = ps.get_data_parallel_rank()
    train_reader = MicroBatchReader(datasets.train, cfg.batch, dp_rank, device)
    valid_reader = MicroBatchReader(datasets.valid, cfg.batch, dp_rank, device) \
        if datasets.valid is not None and cfg.logging.eval_iters > 0 else None
    lg = cfg.logging
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    logger = ThroughputLogger(
        cfg.shape, cfg.batch.seq_length, cfg.batch.global_batch_size, cfg.train_iters,
        dist.get_world_size(), cfg.parallel.tensor_model_parallel_size,
        is_writer=dist.get_rank() == 0, tensorboard_dir=lg.tensorboard_dir,
        metrics_file=lg.metrics_file, wandb=_wandb_kwargs(cfg),
        peak_tflops=lg.peak_tflops or peak_tflops_for_device(device_name),
        recompute=Recompute(cfg.perf.recompute_granularity, cfg.perf.recompute_method,
                            cfg.perf.recompute_num_layers))
    logger.skipped_total = state.skipped_iters
    stop = _StopRequest()
    _print0(f" training {cfg.shape} for {cfg.train_iters} iterations, "
            f"{cfg.batch.tokens_per_iteration} tokens each, SAT "
            f"{'on: ' + str(cfg.sat) if cfg.sat else 'off'}")
    run_info = _run_info(cfg)
    _print0(" " + ", ".join(f"{k}: {v}" for k, v in run_info.items()))
    logger.log_run_info(run_info)
    try:
        return _run(cfg, engine, optimizer, state, train_reader, valid_reader, logger, stop)
    finally:
        stop.restore()
        logger.close()


def _run_info(cfg: TrainConfig) -> dict:
    """What the header, the JSONL ``run`` record and ``meta.json`` say about the kernel."""
    p = cfg.perf
    return {"attention_backend": _attention_backend(cfg),
            "attention_backend_requested": p.attention_backend,
            "recompute_granularity": p.recompute_granularity,
            "recompute_method": p.recompute_method,
            "recompute_num_layers": p.recompute_num_layers,
            "sequence_parallel": p.sequence_parallel,
            "timing_log_level": p.timing_log_level}


def _run(cfg, engine, optimizer, state, train_reader, valid_reader, logger, stop) -> dict:
    from megatron_sat.control import (pop_sat_selection_seconds, sat_kept_fractions,
                                      set_sat_iteration, set_sat_timing)
    from megatron_sat.schedule import schedule_phase

    timers = IterationTimers(cfg.perf.timing_log_level >= 1, _device())
    set_sat_timing(engine.module, timers.enabled)

    loss_sum, loss_count, consecutive, first = 0.0, 0, 0, True
    last_train_loss = valid_loss = None
    saved_at = evaluated_at = None
    schedule = LRSchedule(cfg.optimizer, cfg.train_iters, param_groups(engine))

    def save(reason: str):
        nonlocal saved_at
        if cfg.checkpoint.save and saved_at != state.iteration:
            with timers("checkpoint"):
                path = ckpt.save_checkpoint(engine, cfg, state)
            saved_at = state.iteration
            _print0(f" saved checkpoint ({reason}) to {path}")

    def run_eval():
        nonlocal valid_loss, evaluated_at
        if valid_reader is not None and evaluated_at != state.iteration:
            with timers("eval"):
                valid_loss = evaluate(engine, valid_reader, cfg)
            evaluated_at = state.iteration
            logger.log_eval(state.iteration, valid_loss, state.consumed_samples)

    while state.iteration < cfg.train_iters:
        it = state.iteration
        rates = set_sat_iteration(engine.module, it) if cfg.sat else (0.0, 0.0)
        lr = schedule.apply(it)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss, skipped, stop_now = train_step(engine, optimizer, train_reader, cfg,
                                             state.consumed_samples, it, stop, timers)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - c0
        split = None
        if timers.enabled:
            timers.move_selection_out_of_forward(pop_sat_selection_seconds(engine.module))
            split = timers.pop(SPLIT_KEYS)
        state.iteration += 1
        state.consumed_samples += cfg.batch.global_batch_size
        state.skipped_iters += int(skipped)
        consecutive = consecutive + 1 if skipped else 0
        if not skipped:
            loss_sum, loss_count = loss_sum + loss, loss_count + 1
        kept = KeptFractions.from_dict(sat_kept_fractions(engine.module)) if cfg.sat \
            else KeptFractions()
        logger.record(IterationRecord(
            iteration=state.iteration, seconds=seconds, kept=kept, rates=rates,
            phase=schedule_phase(cfg.sat, it) if cfg.sat else 0, lr=lr,
            grad_norm=None if skipped else _grad_norm(engine), skipped=skipped,
            timed=not first, split=split, cpu_seconds=cpu_seconds))
        first = False
        if state.iteration % cfg.logging.log_interval == 0 or state.iteration == cfg.train_iters:
            last_train_loss = _reduce_mean_dp(loss_sum, loss_count)
            logger.log(state.iteration, last_train_loss, state.consumed_samples,
                       excluded=timers.pop(EXCLUDED_KEYS) if timers.enabled else None)
            loss_sum, loss_count = 0.0, 0
        if consecutive >= cfg.max_skipped_iters:
            save("abort")
            where = f"; checkpoint saved to {cfg.checkpoint.save}" if cfg.checkpoint.save else ""
            raise TrainingAborted(
                f"{consecutive} iterations in a row had a NaN/inf loss (last: iteration "
                f"{state.iteration}){where}; lower --lr, check the data, or raise "
                f"--max-skipped-iters")
        if cfg.logging.eval_interval and state.iteration % cfg.logging.eval_interval == 0:
            run_eval()
        if cfg.checkpoint.save_interval and state.iteration % cfg.checkpoint.save_interval == 0:
            save("interval")
        if stop_now:
            save("SIGTERM")
            _print0(f" SIGTERM received: stopped cleanly at iteration {state.iteration}")
            break
        if cfg.exit_interval and state.iteration % cfg.exit_interval == 0 \
                and state.iteration < cfg.train_iters:
            save("exit interval")
            _print0(f" --exit-interval {cfg.exit_interval}: stopped at iteration "
                    f"{state.iteration}")
            break
    else:
        if cfg.logging.eval_iters:
            run_eval()
        save("end of training")
    if timers.enabled:
        logger.add_excluded(timers.pop(EXCLUDED_KEYS))
    if last_train_loss is not None and math.isnan(last_train_loss):
        last_train_loss = None
    return logger.summary(last_train_loss, valid_loss)
