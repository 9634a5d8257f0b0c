"""Checkpoint saving: exact-resume state, one copy of the weights, crash-safe on disk.

The layout is documented in :mod:`megatron_sat.tools.ckpt_format` (DeepSpeed's files,
which exact resume needs at any ZeRO stage, plus ``meta.json`` and ``rng/``; weights are
stored once).  Loading lives in :mod:`megatron_sat.training.resume`.

Crash safety, in order: every rank writes into the hidden sibling ``SAVE/.iter_N.tmp``;
rank 0 writes ``meta.json`` there, fsyncs the tree, renames it to ``iter_N`` and only then
replaces ``latest`` (fsync'd, by rename).  A SIGKILL at any moment therefore leaves
``latest`` on a complete checkpoint and never an incomplete ``iter_*`` under its final
name.  Temporaries a killed save left behind are removed, with a notice, by the next save.
A full disk ends in one line (:class:`CheckpointSaveError`) with the previous checkpoint
intact and a note of how far training got.  As with Megatron, ``--save`` must be on a
filesystem all nodes share (rank 0 renames what every rank wrote).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_sat.tools.ckpt_format import (LATEST_FILE, META_FILE, complete_iterations,
                                            write_rank_file)
from megatron_sat.tools.cli import atomic_write_bytes, fsync_dir, fsync_tree
from megatron_sat.training.configs import TrainConfig

TRAIN_FORMAT = "megatron-sat-train"
FAILED_SAVE_NOTE = "save_failed.json"


class CheckpointSaveError(RuntimeError):
    """A save failed (disk full, I/O error); the previous checkpoint is intact."""


@dataclass
class TrainState:
    """Where the run is: all that a resume needs besides weights and optimizer.

    ``lineage`` is carried from checkpoint to checkpoint (the source HF config, the
    settings changed at each resume) and written to ``meta.json``.
    """

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iters: int = 0
    lineage: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "skipped_iters": self.skipped_iters}


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _print0(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


# ---- RNG states as tensors and ints (loadable with weights_only=True) ------------------

def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python_version": version, "python_mt": torch.tensor(mt, dtype=torch.int64),
             "python_gauss": gauss, "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss),
             "numpy_cached_gaussian": float(cached), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate((state["python_version"], tuple(state["python_mt"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], state["numpy_has_gauss"],
                         state["numpy_cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- what a run records about itself ----------------------------------------------------

def run_settings(cfg: TrainConfig) -> dict:
    """The settings whose change on resume is reported (flat ``name: value``)."""
    import dataclasses

    out = {"train_iters": cfg.train_iters, "global_batch_size": cfg.batch.global_batch_size,
           "micro_batch_size": cfg.batch.micro_batch_size, "seq_length": cfg.batch.seq_length,
           "seed": cfg.seed, "data_path": [[w, p] for w, p in cfg.data.blend],
           "split": cfg.data.split, "sat": cfg.sat.to_dict() if cfg.sat else None}
    for k, v in dataclasses.asdict(cfg.optimizer).items():
        out[f"optimizer.{k}"] = v
    return json.loads(json.dumps(out))  # JSON-normalised (tuples -> lists)


def _gathered_state_dict(engine) -> dict:
    """ZeRO-3: this TP rank's full state dict on CPU, gathered one parameter at a time."""
    import deepspeed

    module = engine.module
    sd = module.state_dict()
    out = {k: v for k, v in sd.items() if not torch.is_tensor(v)}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            out[name] = param.detach().cpu().clone()
    for name, buf in module.named_buffers():
        if name in sd:
            out[name] = buf.detach().cpu().clone()
    return out


# ---- saving -------------------------------------------------------------------------------

def _is_disk_full(exc: BaseException, where: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain; torch's zip writer reports a full disk only as
    "file write failed", so that case is confirmed by the free space left."""
    first, seen = exc, 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    if "write failed" in str(first):
        try:
            return shutil.disk_usage(where).free < 16 * 2**20
        except OSError:
            return False
    return False


def _remove_tree(path: Path) -> None:
    """Rename out of the ``iter_*`` namespace first, so a kill mid-delete leaves no partial
    folder under a final name; the hidden leftover is cleaned by the next save."""
    trash = path.parent / f".{path.name}.deleting-{os.getpid()}-{time.time_ns()}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale_temporaries(save: Path) -> None:
    """Remove what a killed save or prune left behind (rank 0, before a new save)."""
    for entry in sorted(save.iterdir()) if save.is_dir() else []:
        name = entry.name
        if name.startswith(".iter_") or name.startswith(f".{LATEST_FILE}.tmp-"):
            print(f" removing {entry}, a temporary left by an interrupted save", flush=True)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def prune_checkpoints(save: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (never the one ``latest`` names)."""
    latest = (save / LATEST_FILE).read_text().strip() if (save / LATEST_FILE).is_file() else ""
    complete = complete_iterations(save)
    for _, folder in complete[:max(len(complete) - keep, 0)]:
        if folder.name != latest:
            _remove_tree(folder)
            print(f" removed {folder} (--keep-last-n-checkpoints {keep})", flush=True)


def _agree(error: BaseException | None, save: Path) -> tuple[bool, bool]:
    """(some rank failed, some rank found the disk full), the same on every rank."""
    flags = torch.tensor([float(error is not None),
                          float(error is not None and _is_disk_full(error, save))])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0].item()), bool(flags[1].item())


def _fail(cfg: TrainConfig, state: TrainState, tag: str, exc: BaseException | None,
          disk_full: bool) -> None:
    save = Path(cfg.checkpoint.save)
    latest = (save / LATEST_FILE).read_text().strip() if (save / LATEST_FILE).is_file() \
        else "none"
    reached = f"training reached iteration {state.iteration} ({state.consumed_samples} samples)"
    if dist.get_rank() == 0:
        try:  # tiny, and the failed temporary was just freed
            atomic_write_bytes(save / FAILED_SAVE_NOTE, json.dumps({
                "failed_checkpoint": tag, **state.to_dict(), "latest_complete": latest,
                "error": str(exc)[:500], "time": time.strftime("%Y-%m-%d %H:%M:%S")},
                indent=1).encode())
        except OSError:
            pass
    if disk_full:
        raise CheckpointSaveError(
            f"disk full while saving checkpoint {tag} to {save}; {reached}; the last "
            f"complete checkpoint ({latest}) is intact; free space (or use "
            f"--keep-last-n-checkpoints) and re-run the same command to resume")
    why = (str(exc).splitlines() or [type(exc).__name__])[0][:200] if exc else "another rank failed"
    raise CheckpointSaveError(f"saving checkpoint {tag} to {save} failed ({why}); {reached}; "
                              f"the last complete checkpoint ({latest}) is intact")


def save_checkpoint(engine, cfg: TrainConfig, state: TrainState) -> str:
    """Collective: every rank must call it. Returns the checkpoint directory."""
    from megatron.core import parallel_state as ps

    save = Path(cfg.checkpoint.save)
    tag = tag_for(state.iteration)
    tmp_tag = f".{tag}.tmp"
    tmp, final = save / tmp_tag, save / tag
    rank, tp = dist.get_rank(), cfg.parallel.tensor_model_parallel_size
    zero3 = engine.zero_optimization_stage() == 3
    if rank == 0:
        save.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(save)
    dist.barrier()
    weights = _gathered_state_dict(engine) if zero3 else None  # collective under ZeRO-3
    error = None
    try:
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        error = exc
    try:
        engine.save_checkpoint(str(save), tag=tmp_tag, client_state={}, save_latest=False)
    except Exception as exc:  # noqa: BLE001 - a write failed on this rank
        error = error or exc
        # DeepSpeed's save ends in a barrier that the other ranks are waiting in; this
        # rank raised between its two barriers, so it joins the final one here.
        dist.barrier()
    try:
        if error is not None:
            raise error
        if zero3 and ps.get_data_parallel_rank() == 0:
            write_rank_file(tmp, ps.get_tensor_model_parallel_rank(), weights, cfg.shape, tp,
                            iteration=state.iteration)
    except Exception as exc:  # noqa: BLE001 - reported as one line below
        error = exc
    # ZeRO-3 only: DeepSpeed's per-parameter padded partitions are not re-shardable, so the
    # full optimizer state per TP rank goes to optim/ (reshard.py; ZeRO 0-2 are re-sharded
    # from DeepSpeed's own files). Collective over DP: every rank takes part, even after
    # an error.
    from megatron_sat.training.reshard import needs_full_copy, save_full_state

    if needs_full_copy(engine):
        try:
            save_full_state(engine, tmp, ps.get_tensor_model_parallel_rank(),
                            ps.get_data_parallel_rank(), write=error is None)
        except Exception as exc:  # noqa: BLE001
            error = error or exc
    try:
        if error is not None:
            raise error
        torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    except Exception as exc:  # noqa: BLE001 - reported as one line below
        error = exc
    failed, full = _agree(error, save)
    if not failed and rank == 0:
        try:
            meta = {"format": TRAIN_FORMAT, "format_version": 1, **state.to_dict(),
                    "dtype": "bf16" if cfg.engine.bf16 else "fp32", "shape": cfg.shape.to_dict(),
                    "tp": tp, "padded_vocab_size": cfg.shape.padded_vocab_size(tp),
                    "world_size": dist.get_world_size(),
                    "zero_stage": engine.zero_optimization_stage(),
                    "weights": "mp_rank" if zero3 else "deepspeed",
                    "sat": cfg.sat.to_dict() if cfg.sat else None,
                    # How the step ran (no effect on the weights' layout): issue 9.
                    "attention_backend": cfg.perf.resolved_backend(
                        "cuda" if torch.cuda.is_available() else "cpu", cfg.engine.bf16),
                    "sequence_parallel": cfg.perf.sequence_parallel,
                    "recompute_granularity": cfg.perf.recompute_granularity,
                    "run": run_settings(cfg), **state.lineage}
            atomic_write_bytes(tmp / META_FILE, json.dumps(meta, indent=1).encode())
            fsync_tree(tmp)
            if final.exists():  # a replay of an iteration saved by a killed run
                _remove_tree(final)
            os.replace(tmp, final)
            fsync_dir(save)
            atomic_write_bytes(save / LATEST_FILE, (tag + "\n").encode())
        except Exception as exc:  # noqa: BLE001
            error = exc
    failed, full2 = _agree(error, save)
    if failed:
        full = full or full2
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        _fail(cfg, state, tag, error, full)
    if rank == 0:
        (save / FAILED_SAVE_NOTE).unlink(missing_ok=True)
        if cfg.checkpoint.keep_last_n_checkpoints:
            prune_checkpoints(save, cfg.checkpoint.keep_last_n_checkpoints)
    dist.barrier()
    return str(final)
