"""Checkpoints: exact resume, weights-only starts, and an atomic ``latest`` pointer.

Layout of ``SAVE/iter_0000100/`` (``SAVE/latest`` names the newest complete one):

* DeepSpeed's own files (model, ZeRO-partitioned optimizer, engine counters): exact resume
  at any ZeRO stage without re-implementing ZeRO's sharding.
* ``mp_rank_XX/model.pt`` = ``{"model": state_dict, "shape", "padded_vocab_size", "tp"}``
  for each TP rank, the same format the HF converter writes. Why twice: it makes every
  training checkpoint usable by ``--finetune``, the exporters and the tools without
  DeepSpeed, and ZeRO-3 weights are gathered here once instead of by every reader.
* ``rng/rank_XXXXX.pt``: every rank's RNG states (DeepSpeed keeps only DP rank 0's
  client state).
* ``meta.json``: iteration, consumed samples, shape, TP and the SAT settings.

``latest`` is written last, by rank 0, after a barrier, via a rename: a run killed while
saving leaves ``latest`` on the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_sat.model import LlamaShape
from megatron_sat.tools.ckpt_format import write_rank_file
from megatron_sat.tools.cli import atomic_write_bytes
from megatron_sat.training.configs import ConfigError, TrainConfig

SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "vocab_size")


@dataclass
class TrainState:
    """Where the run is: all that a resume needs besides weights and optimizer."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iters: int = 0

    def to_dict(self) -> dict:
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "skipped_iters": self.skipped_iters}


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gathered_state_dict(engine) -> dict:
    """This TP rank's full state dict on CPU; ZeRO-3 params are gathered one at a time."""
    module = engine.module
    sd = module.state_dict()
    if engine.zero_optimization_stage() != 3:
        return {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in sd.items()}
    import deepspeed

    out = {k: v for k, v in sd.items() if not torch.is_tensor(v)}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            out[name] = param.detach().cpu().clone()
    for name, buf in module.named_buffers():
        if name in sd:
            out[name] = buf.detach().cpu().clone()
    return out


def save_checkpoint(engine, cfg: TrainConfig, state: TrainState) -> str:
    """Collective: every rank must call it. Returns the checkpoint directory."""
    from megatron.core import parallel_state as ps

    save, tag = cfg.checkpoint.save, tag_for(state.iteration)
    ckpt = os.path.join(save, tag)
    rank, tp = dist.get_rank(), cfg.parallel.tensor_model_parallel_size
    os.makedirs(os.path.join(ckpt, "rng"), exist_ok=True)  # every node, if not shared
    client = {"train_state": state.to_dict(),
              "sat": cfg.sat.to_dict() if cfg.sat else None}
    engine.save_checkpoint(save, tag=tag, client_state=client, save_latest=False)
    weights = _gathered_state_dict(engine)
    from megatron_sat.training.reshard import save_full_state

    # full (unpartitioned) optimizer state: resume at another DP size / ZeRO stage
    save_full_state(engine, ckpt, ps.get_tensor_model_parallel_rank(),
                    ps.get_data_parallel_rank())
    if ps.get_data_parallel_rank() == 0:
        # The converter's per-rank layout, so tools read training output directly.
        write_rank_file(ckpt, ps.get_tensor_model_parallel_rank(), weights, cfg.shape, tp,
                        iteration=state.iteration)
    torch.save(_rng_state(), os.path.join(ckpt, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        meta = {"format": "megatron-sat-train", "format_version": 1, **state.to_dict(),
                "dtype": "bf16" if cfg.engine.bf16 else "fp32", "shape": cfg.shape.to_dict(),
                "tp": tp, "padded_vocab_size": cfg.shape.padded_vocab_size(tp),
                "world_size": dist.get_world_size(),
                "zero_stage": engine.zero_optimization_stage(),
                "sat": cfg.sat.to_dict() if cfg.sat else None}
        atomic_write_bytes(os.path.join(ckpt, "meta.json"), json.dumps(meta, indent=1).encode())
    dist.barrier()
    if rank == 0:
        atomic_write_bytes(os.path.join(save, "latest"), (tag + "\n").encode())
    dist.barrier()
    return ckpt


def find_checkpoint(load: str) -> Optional[tuple[str, str]]:
    """(parent dir, tag) of the checkpoint ``--load`` names, or None if it holds none.

    Accepts a directory with a ``latest`` file (ours or the converter's) or one
    checkpoint directory itself (holding ``mp_rank_00/``).
    """
    latest = os.path.join(load, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip().rstrip("/")
        if not os.path.isdir(os.path.join(load, tag)):
            raise ConfigError(f"--load {load}: 'latest' names {tag}, which does not exist")
        return load, tag
    if os.path.isdir(os.path.join(load, "mp_rank_00")):
        load = os.path.normpath(load)
        return os.path.dirname(load), os.path.basename(load)
    return None


def _read_header(ckpt: str, tp_rank: int) -> dict:
    meta = os.path.join(ckpt, "meta.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            d = json.load(f)
        if "shape" in d and "tp" in d:
            return d
    path = os.path.join(ckpt, f"mp_rank_{tp_rank:02d}", "model.pt")
    if not os.path.isfile(path):
        raise ConfigError(f"--load {ckpt}: {path} not found; is this a megatron-sat checkpoint?")
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def check_compatible(ckpt: str, shape: LlamaShape, tp: int, tp_rank: int = 0) -> dict:
    """One-line error when the checkpoint's shape or TP differs from this run's."""
    head = _read_header(ckpt, tp_rank)
    theirs = LlamaShape.from_dict(head["shape"])
    diffs = [f"{k} {getattr(theirs, k)} vs {getattr(shape, k)}" for k in SHAPE_KEYS
             if getattr(theirs, k) != getattr(shape, k)]
    if diffs:
        raise ConfigError(f"--load {ckpt} has another model shape (checkpoint vs flags: "
                          f"{', '.join(diffs)}); pass the checkpoint's shape flags or --model")
    if int(head["tp"]) != tp:
        raise ConfigError(f"--load {ckpt} was saved with --tensor-model-parallel-size "
                          f"{head['tp']}, this run uses {tp}; use the same TP (re-convert "
                          f"for another TP)")
    return head


def load_weights(module: torch.nn.Module, ckpt: str, tp_rank: int) -> None:
    """Weights only (``--finetune``/``--no-load-optim``), before DeepSpeed wraps the model."""
    path = os.path.join(ckpt, f"mp_rank_{tp_rank:02d}", "model.pt")
    if not os.path.isfile(path):
        raise ConfigError(f"--load {ckpt}: {path} not found")
    sd = torch.load(path, map_location="cpu", weights_only=False)["model"]
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("_extra_state")]
    if missing:
        raise ConfigError(f"--load {path} lacks {len(missing)} weights (first: {missing[0]}); "
                          f"it does not match this model")
    for k, v in own.items():
        if torch.is_tensor(v) and k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise ConfigError(f"--load {path}: {k} has shape {tuple(sd[k].shape)}, the model "
                              f"expects {tuple(v.shape)}")
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def restore_rng(ckpt: str) -> bool:
    """This rank's RNG states from ``ckpt`` if it holds them (same world size)."""
    rng = os.path.join(ckpt, "rng", f"rank_{dist.get_rank():05d}.pt")
    if not os.path.isfile(rng):
        return False
    _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    return True


def load_full(engine, load_dir: str, tag: str, restore_rng: bool) -> TrainState:
    """Exact resume: DeepSpeed state (model, optimizer), train state and RNG."""
    path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None:
        raise ConfigError(f"--load {os.path.join(load_dir, tag)} has no DeepSpeed state; use "
                          f"--finetune to start from its weights alone")
    state = TrainState(**client["train_state"])
    rng = os.path.join(load_dir, tag, "rng", f"rank_{dist.get_rank():05d}.pt")
    if restore_rng and os.path.isfile(rng):
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    return state
