"""Megatron-style throughput log: one line per ``--log-interval``, TensorBoard and JSONL.

Why exact FLOPs: SAT changes the work per token from one iteration to the next, so the
logger multiplies each iteration's tokens by that iteration's FLOPs per token (from the
layers' actual kept fractions, GQA included; see :mod:`flops`). Besides executed TFLOP/s
it reports "dense-equivalent tokens/s" = executed FLOP/s ÷ dense FLOPs per token: the
tokens/s a dense run would reach at this FLOP rate, so SAT and dense runs compare on one
axis (tokens/s ÷ dense-equivalent tokens/s is the gain from skipped work).

The line starts exactly as Megatron-LM's ``training_log`` writes it (timestamp, iteration,
consumed samples, ms per iteration, TFLOP/s per GPU, learning rate, global batch size,
lm loss, loss scale, grad norm, number of skipped / nan iterations in the interval), and
TensorBoard gets Megatron's tag names (``lm loss``, ``learning-rate``, ``grad-norm``,
``lm loss validation``, each also ``... vs samples``), so public Megatron log parsers and
dashboards read SAT runs and overlay them on dense baselines. The SAT extras follow after
Megatron's fields (line) or under ``sat/*`` and ``throughput/*`` (TensorBoard).

Only rank 0 writes; callers pass values already reduced over the data-parallel group.
"""

from __future__ import annotations

import datetime
import json
import math
import os

import torch
from dataclasses import dataclass, field
from typing import Optional

from megatron_sat.training.flops import (DENSE, KeptFractions, Recompute,
                                         recompute_flops_per_token, train_flops_per_token)


@dataclass
class _Window:
    """Sums over a span of timed iterations."""

    iters: int = 0
    seconds: float = 0.0
    tokens: int = 0
    flops: float = 0.0
    first: Optional[int] = None
    last: Optional[int] = None
    rates: tuple = (0.0, 0.0)
    skipped: int = 0  # iterations whose optimizer step was skipped
    nan: int = 0  # iterations with a NaN/inf loss (here: the same ones, they are skipped)
    hw_flops: float = 0.0  # model FLOPs plus recomputed forward FLOPs (HFU)
    split: dict = field(default_factory=dict)  # --timing-log-level: seconds per phase

    def add(self, iteration, seconds, tokens, flops, rates, hw_flops=None, split=None):
        self.hw_flops += flops if hw_flops is None else hw_flops
        for k, v in (split or {}).items():
            self.split[k] = self.split.get(k, 0.0) + v
        self.iters += 1
        self.seconds += seconds
        self.tokens += tokens
        self.flops += flops
        self.first = iteration if self.first is None else self.first
        self.last = iteration
        self.rates = rates


@dataclass
class IterationRecord:
    """What the loop knows after one iteration (values local to this rank)."""

    iteration: int  # completed iterations after this step (1-based, like Megatron)
    seconds: float
    kept: KeptFractions
    rates: tuple  # (ρ_attn, ρ_mlp) in force for this step
    phase: int
    lr: float
    grad_norm: Optional[float]
    skipped: bool
    timed: bool = True  # False for the first step of a process (warm-up)
    split: Optional[dict] = None  # --timing-log-level: seconds per phase of this step
    cpu_seconds: Optional[float] = None  # host process CPU time of this step


@dataclass
class ThroughputLogger:
    shape: object
    seq_length: int
    global_batch_size: int
    train_iters: int
    world_size: int
    tp: int
    is_writer: bool
    tensorboard_dir: Optional[str] = None
    metrics_file: Optional[str] = None
    peak_tflops: Optional[float] = None
    wandb: Optional[dict] = None  # wandb.init kwargs (project, name, dir, entity)
    window: _Window = field(default_factory=_Window)
    phases: dict = field(default_factory=dict)
    total: _Window = field(default_factory=_Window)
    skipped_total: int = 0
    last_record: Optional[IterationRecord] = None
    last_line: Optional[dict] = None
    recompute: Recompute = field(default_factory=Recompute)
    excluded_total: dict = field(default_factory=dict)  # eval / checkpoint seconds

    def __post_init__(self):
        self._tb = self._jsonl = self._wandb = None
        self.dense_flops_per_token = train_flops_per_token(self.shape, self.seq_length, DENSE,
                                                           self.tp)
        if not self.is_writer:
            return
        if self.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(self.tensorboard_dir)
        if self.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(self.metrics_file)), exist_ok=True)
            self._jsonl = open(self.metrics_file, "a", buffering=1)
        if self.wandb:
            from megatron_sat.training.configs import ConfigError

            try:
                import wandb
            except ImportError:
                raise ConfigError("--wandb-project needs the wandb package: pip install wandb "
                                  "(or drop --wandb-project)") from None
            if self.wandb.get("dir"):
                os.makedirs(self.wandb["dir"], exist_ok=True)
            self._wandb = wandb.init(**{k: v for k, v in self.wandb.items() if v is not None})

    # -- accumulation -------------------------------------------------------------------
    def record(self, rec: IterationRecord) -> None:
        tokens = self.global_batch_size * self.seq_length
        flops = tokens * train_flops_per_token(self.shape, self.seq_length, rec.kept, self.tp)
        hw = flops + tokens * recompute_flops_per_token(self.shape, self.seq_length, rec.kept,
                                                        self.recompute)
        self.skipped_total += int(rec.skipped)
        self.last_record = rec
        split = dict(rec.split or {})
        if rec.split is not None and rec.cpu_seconds is not None:
            split["cpu"] = rec.cpu_seconds  # logged as time_cpu_ms: robust to other jobs
        self.window.add(rec.iteration, rec.seconds, tokens, flops, rec.rates, hw, split)
        self.window.skipped += int(rec.skipped)
        self.window.nan += int(rec.skipped)
        if rec.timed:
            self.total.add(rec.iteration, rec.seconds, tokens, flops, rec.rates, hw, rec.split)
            self.phases.setdefault(rec.phase, _Window()).add(rec.iteration, rec.seconds,
                                                             tokens, flops, rec.rates, hw)

    # -- output ---------------------------------------------------------------------------
    def _rates(self, w: _Window) -> dict:
        s = max(w.seconds, 1e-12)
        tps = w.tokens / s
        tflops = w.flops / s / self.world_size / 1e12
        out = {
            "iterations": w.iters, "seconds": w.seconds, "tokens": w.tokens,
            "ms_per_iter": 1000.0 * w.seconds / max(w.iters, 1),
            "samples_per_sec": tps / self.seq_length,
            "tokens_per_sec": tps,
            "tokens_per_sec_per_gpu": tps / self.world_size,
            "tflops_per_gpu": tflops,
            "dense_equiv_tokens_per_sec": w.flops / s / self.dense_flops_per_token,
        }
        hw_tflops = w.hw_flops / s / self.world_size / 1e12
        out["hw_tflops_per_gpu"] = hw_tflops  # model + recomputed FLOPs (HFU numerator)
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
            out["hfu"] = hw_tflops / self.peak_tflops
        for k, v in w.split.items():  # --timing-log-level: mean ms per iteration
            out[f"time_{k}_ms"] = 1000.0 * v / max(w.iters, 1)
        return out

    def log(self, iteration: int, lm_loss: float, consumed_samples: int,
            excluded: Optional[dict] = None) -> dict:
        """Close the current window; print and store one line. Returns its values.

        ``excluded``: seconds of evaluation / checkpointing since the last line (not part
        of the iteration times or tokens/s), logged as ``time_<kind>_ms`` totals.
        """
        rec = self.last_record
        w, self.window = self.window, _Window()
        values = {"iteration": iteration, "train_iters": self.train_iters,
                  "consumed_samples": consumed_samples,
                  "consumed_tokens": consumed_samples * self.seq_length,
                  "lr": rec.lr, "global_batch_size": self.global_batch_size,
                  "lm_loss": lm_loss, "grad_norm": rec.grad_norm,
                  "skipped_iters": self.skipped_total,
                  "skipped_in_interval": w.skipped, "nan_in_interval": w.nan,
                  "attn_omission_rate": rec.rates[0], "mlp_omission_rate": rec.rates[1],
                  "kept_attn_q": rec.kept.attn_q, "kept_attn_kv": rec.kept.attn_kv,
                  "kept_mlp": rec.kept.mlp, **self._rates(w)}
        if excluded is not None:
            self.add_excluded(excluded)
            values.update({f"time_{k}_ms": 1000.0 * v for k, v in excluded.items()})
        if torch.cuda.is_available():
            values["mem_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.last_line = values
        if self.is_writer:
            print(self.format_line(values) + _hfu_text(values) + _timing_text(values),
                  flush=True)
            self._write("train", values)
        return values

    def format_line(self, v: dict) -> str:
        def num(x, fmt):
            return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt % x

        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        return " | ".join([  # Megatron-LM's fields first, in its order and format
            f" [{stamp}] iteration {v['iteration']:8d}/{v['train_iters']:8d}",
            f"consumed samples: {v['consumed_samples']:12d}",
            f"elapsed time per iteration (ms): {v['ms_per_iter']:.1f}",
            f"throughput per GPU (TFLOP/s/GPU): {v['tflops_per_gpu']:.1f}",
            f"learning rate: {v['lr']:.6E}",
            f"global batch size: {v['global_batch_size']:5d}",
            f"lm loss: {num(v['lm_loss'], '%.6E')}",
            "loss scale: 1.0",
            f"grad norm: {num(v['grad_norm'], '%.3f')}",
            f"number of skipped iterations: {v['skipped_in_interval']:3d}",
            f"number of nan iterations: {v['nan_in_interval']:3d}",
            # SAT extras
            f"consumed tokens: {v['consumed_tokens']:12d}",
            f"samples per second: {v['samples_per_sec']:.3f}",
            f"tokens per second: {v['tokens_per_sec']:.1f}",
            f"tokens per GPU per second: {v['tokens_per_sec_per_gpu']:.1f}",
            f"TFLOP/s per GPU: {v['tflops_per_gpu']:.4f}",
            f"dense-equiv tokens per second: {v['dense_equiv_tokens_per_sec']:.1f}",
            f"MFU: {num(None if v.get('mfu') is None else 100.0 * v['mfu'], '%.2f%%')}",
            f"omission rate attn/mlp: {v['attn_omission_rate']:.3f}/{v['mlp_omission_rate']:.3f}",
        ]) + " |"

    def add_excluded(self, excluded: dict) -> None:
        for k, v in excluded.items():
            self.excluded_total[k] = self.excluded_total.get(k, 0.0) + v

    def log_run_info(self, info: dict) -> None:
        """One ``{"kind": "run", ...}`` JSONL record: the attention backend in use etc."""
        self.run_info = dict(info)
        if self.is_writer and self._jsonl:
            self._jsonl.write(json.dumps({"kind": "run", **info}) + "\n")

    def log_eval(self, iteration: int, lm_loss: float, consumed_samples: int = 0) -> None:
        if not self.is_writer:
            return
        ppl = math.exp(min(lm_loss, 20.0))  # Megatron clips the exponent at 20
        print(f" validation loss at iteration {iteration} | lm loss value: {lm_loss:.6E} | "
              f"lm loss PPL: {ppl:.6E} |", flush=True)
        self._write("valid", {"iteration": iteration, "consumed_samples": consumed_samples,
                              "lm_loss": lm_loss, "lm_loss_ppl": ppl})

    def _write(self, kind: str, values: dict) -> None:
        if self._jsonl:
            self._jsonl.write(json.dumps({"kind": kind, **values}) + "\n")
        scalars = megatron_scalars(kind, values)
        if self._tb:
            for tag, (v, step) in scalars.items():
                self._tb.add_scalar(tag, v, step)
        if self._wandb:
            self._wandb.log({tag: v for tag, (v, _) in scalars.items()
                             if not tag.endswith(" vs samples")}, step=values["iteration"])

    def summary(self, final_train_loss: Optional[float],
                final_valid_loss: Optional[float]) -> dict:
        """Average tokens/s per schedule phase and overall (warm-up step excluded)."""
        phases = []
        for phase in sorted(self.phases):
            w = self.phases[phase]
            phases.append({"phase": phase, "first_iteration": w.first,
                           "last_iteration": w.last,
                           "attn_omission_rate": w.rates[0], "mlp_omission_rate": w.rates[1],
                           **self._rates(w)})
        out = {"phases": phases, "overall": self._rates(self.total) if self.total.iters else {},
               "final_train_loss": final_train_loss, "final_valid_loss": final_valid_loss,
               "skipped_iters": self.skipped_total,
               **{f"time_{k}_s_total": v for k, v in self.excluded_total.items()},
               **getattr(self, "run_info", {})}
        if self.is_writer:
            print(" throughput summary (first step of the process excluded as warm-up):")
            for p in phases:
                print(f"   phase {p['phase']} (iterations {p['first_iteration']}-"
                      f"{p['last_iteration']}, omission attn/mlp "
                      f"{p['attn_omission_rate']:.3f}/{p['mlp_omission_rate']:.3f}): "
                      f"{p['tokens_per_sec']:.1f} tokens/s, {p['ms_per_iter']:.1f} ms/iter, "
                      f"{p['tflops_per_gpu']:.4f} TFLOP/s per GPU")
            if out["overall"]:
                o = out["overall"]
                print(f"   overall: {o['tokens_per_sec']:.1f} tokens/s "
                      f"({o['tokens_per_sec_per_gpu']:.1f} per GPU), "
                      f"dense-equiv {o['dense_equiv_tokens_per_sec']:.1f} tokens/s", flush=True)
            if self._jsonl:
                self._jsonl.write(json.dumps({"kind": "summary", **out}) + "\n")
        return out

    def close(self) -> None:
        if self._tb:
            self._tb.close()
        if self._jsonl:
            self._jsonl.close()
        if self._wandb:
            self._wandb.finish()


# Megatron-LM's TensorBoard tags: ours -> theirs (each also written "vs samples").
MEGATRON_TRAIN_TAGS = {"lm_loss": "lm loss", "lr": "learning-rate", "grad_norm": "grad-norm",
                       "global_batch_size": "batch-size"}
MEGATRON_VALID_TAGS = {"lm_loss": "lm loss validation", "lm_loss_ppl": "lm loss validation ppl"}


def megatron_scalars(kind: str, values: dict) -> dict:
    """``{tag: (value, step)}``: Megatron's tags (by iteration and by consumed samples)
    plus the SAT extras under ``throughput/*`` and ``sat/*``."""
    it, samples = values["iteration"], values.get("consumed_samples", 0)
    names = MEGATRON_TRAIN_TAGS if kind == "train" else MEGATRON_VALID_TAGS
    out = {}
    for k, v in values.items():
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if k in names:
            out[names[k]] = (v, it)
            out[names[k] + " vs samples"] = (v, samples)
        elif kind == "train" and k == "ms_per_iter":
            out["iteration-time"] = (v / 1000.0, it)
        elif kind == "train" and k in _THROUGHPUT_KEYS:
            out[f"throughput/{k}"] = (v, it)
        elif kind == "train" and ("omission" in k or k.startswith("kept")):
            out[f"sat/{k}"] = (v, it)
        elif kind == "train" and k.startswith("time_") and k.endswith("_ms") \
                and k[5:-3] in MEGATRON_TIMER_NAMES:  # Megatron's timers.write: seconds
            out[f"{MEGATRON_TIMER_NAMES[k[5:-3]]}-time"] = (v / 1000.0, it)
    if kind == "train":
        out["loss-scale"] = (1.0, it)
        out["loss-scale vs samples"] = (1.0, samples)
    return out


_THROUGHPUT_KEYS = {"ms_per_iter", "samples_per_sec", "tokens_per_sec", "tokens_per_sec_per_gpu",
                    "tflops_per_gpu", "dense_equiv_tokens_per_sec", "mfu", "consumed_tokens",
                    "consumed_samples", "hw_tflops_per_gpu", "hfu"}


def _hfu_text(v: dict) -> str:
    """Hardware FLOP/s and HFU, printed only when recomputation makes them differ."""
    if v.get("hw_tflops_per_gpu", 0.0) <= v.get("tflops_per_gpu", 0.0):
        return ""
    out = f" hardware TFLOP/s per GPU (with recomputation): {v['hw_tflops_per_gpu']:.4f} |"
    if v.get("hfu") is not None:
        out += f" HFU: {100.0 * v['hfu']:.2f}% |"
    return out


# Megatron-LM's timer names for the --timing-log-level phases (its ``timers.log`` block and
# its ``<name>-time`` TensorBoard tags); SAT selection has no Megatron counterpart.
MEGATRON_TIMER_NAMES = {"data": "batch-generator", "forward": "forward-compute",
                        "sat_selection": "sat-selection", "backward": "backward-compute",
                        "optimizer": "optimizer", "cpu": "cpu-process",
                        "eval": "evaluate", "checkpoint": "save-checkpoint"}


def _timer_rows(v: dict, keys) -> list:
    return [f"    {MEGATRON_TIMER_NAMES[k] + ' ':.<48}: {v[f'time_{k}_ms']:.2f}" for k in keys
            if f"time_{k}_ms" in v]


def _timing_text(v: dict) -> str:
    """The ``--timing-log-level`` block after the line ('' when timing is off), laid out
    as Megatron's ``timers.log``: one dotted row per timer, in ms. Rank 0's times (the
    loop does not reduce them over ranks, so no "(min, max) across ranks" is claimed)."""
    from megatron_sat.training.timers import EXCLUDED_KEYS, SPLIT_KEYS

    rows = _timer_rows(v, SPLIT_KEYS + ("cpu",))
    if not rows:
        return ""
    out = "\n(rank 0) time per iteration (ms), mean over the interval:\n" + "\n".join(rows)
    excl = _timer_rows(v, EXCLUDED_KEYS)
    return out + ("\n(rank 0) time not in tokens/s (ms), total since the last line:\n"
                  + "\n".join(excl) if excl else "")
