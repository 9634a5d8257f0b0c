"""What ``--load`` means, and loading a checkpoint safely.

Rules (a typo in ``--load`` must not silently waste a cluster-week):

* no ``--load``: start from scratch;
* ``--load`` equal to ``--save`` whose folder holds no checkpoint yet (or does not exist):
  start from scratch with a one-line notice, the restart idiom of cluster scripts;
* any other ``--load`` must hold a checkpoint, else a one-line error;
* the checkpoint ``latest`` names is loaded, or the one ``--ckpt-step N`` names.  When it
  is unreadable the error names the broken file and lists the other complete iterations;
  an older one is only loaded on that explicit flag.

Every file is validated before any byte of it reaches DeepSpeed, with
``torch.load(weights_only=True)`` (:mod:`megatron_sat.tools.file_checks`), so a truncated
copy is one line and a malicious pickle never runs.  The architecture of a checkpoint
(every :class:`LlamaShape` field) becomes this run's default and is compared in full;
changes of other settings on resume are printed and recorded in ``meta.json``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sat.model import LlamaShape
from megatron_sat.tools.ckpt_format import (LATEST_FILE, META_FILE, validated_meta, complete_iterations,
                                            find_iteration_dir, load_rank_payload, others_hint,
                                            weight_file)
from megatron_sat.tools.cli import ToolError
from megatron_sat.tools.file_checks import load_torch_file
from megatron_sat.training.checkpointing import (TrainState, _print0, run_settings,
                                                 set_rng_state)
from megatron_sat.training.configs import ConfigError, TrainConfig


def _same(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def holds_checkpoint(folder: Optional[str]) -> bool:
    p = Path(folder) if folder else None
    return bool(p and p.is_dir() and ((p / LATEST_FILE).exists() or (p / META_FILE).exists()
                                      or complete_iterations(p)))


def resolve_load(load: Optional[str], save: Optional[str], step: Optional[int],
                 weights_only: bool = False) -> Optional[Path]:
    """The iteration folder to load, or None to start from scratch (see module doc)."""
    if not load:
        return None
    if _same(load, save) and not holds_checkpoint(load) and not weights_only:
        if step is not None:
            raise ConfigError(f"--ckpt-step {step}: --load {load} holds no checkpoint")
        return None
    p = Path(load)
    if not p.exists():
        raise ConfigError(f"--load {load} does not exist; fix the path (to start from scratch, "
                          f"drop --load or make it equal to --save)")
    if not (p / LATEST_FILE).exists() and not (p / META_FILE).exists() and step is None:
        found = complete_iterations(p)
        if found and _same(load, save):  # killed between the first rename and 'latest'
            return found[-1][1]
        if not found:
            raise ConfigError(f"--load {load} holds no megatron-sat checkpoint (no 'latest', "
                              f"no iter_*/meta.json); convert HF weights with "
                              f"tools/convert_checkpoint.py, or drop --load to start from "
                              f"scratch")
    try:
        return find_iteration_dir(p, step)
    except ToolError as exc:
        raise ConfigError(f"--load {load}: {exc}") from None


def checkpoint_meta(it_dir: Path) -> dict:
    try:
        return validated_meta(it_dir)
    except ToolError as exc:
        raise ConfigError(f"--load: {exc}") from None


def check_save_target(cfg: TrainConfig, it_dir: Optional[Path]) -> None:
    """Refuse a new run into a ``--save`` that holds another run (``--overwrite-save``)."""
    c = cfg.checkpoint
    if not c.save or not holds_checkpoint(c.save):
        return
    # --no-load-optim continues the run (iteration, data position): resuming too
    resuming_here = it_dir is not None and not c.finetune and _same(str(it_dir.parent), c.save)
    if resuming_here or c.overwrite_save:
        return
    latest = Path(c.save) / LATEST_FILE
    what = latest.read_text().strip() if latest.is_file() else "checkpoints"
    raise ConfigError(f"--save {c.save} already holds a run (latest: {what}); to resume it pass "
                      f"--load {c.save} without --finetune, to replace it add --overwrite-save, "
                      f"or choose another --save")


def clear_save_for_overwrite(cfg: TrainConfig, it_dir: Optional[Path]) -> None:
    """``--overwrite-save``: rank 0 removes the previous run's checkpoints, with a notice."""
    c = cfg.checkpoint
    if not (c.overwrite_save and c.save and holds_checkpoint(c.save)):
        return
    if it_dir is not None and _same(str(it_dir.parent), c.save) and not c.finetune:
        return  # resuming from it: nothing to overwrite
    if it_dir is not None and _same(str(it_dir.parent), c.save):
        raise ConfigError("--overwrite-save would delete the checkpoint being loaded; save "
                          "elsewhere")
    if dist.get_rank() == 0:
        save = Path(c.save)
        olds = complete_iterations(save)
        for _, d in olds:
            shutil.rmtree(d)
        (save / LATEST_FILE).unlink(missing_ok=True)
        print(f" --overwrite-save: removed {len(olds)} checkpoint(s) of the previous run in "
              f"{save}", flush=True)
    dist.barrier()


def check_compatible(it_dir: Path, meta: dict, shape: LlamaShape, tp: int) -> None:
    """One-line error when any architecture field or TP differs from this run's."""
    theirs = LlamaShape.from_dict(meta["shape"])
    mine, ours = theirs.to_dict(), shape.to_dict()
    diffs = [f"{k} {mine[k]} vs {ours[k]}" for k in mine if mine[k] != ours[k]]
    if diffs:
        raise ConfigError(f"--load {it_dir} has another model shape (checkpoint vs flags: "
                          f"{', '.join(diffs)}); drop the differing flags (the checkpoint's "
                          f"values are the default) or use a matching --model")
    if int(meta["tp"]) != tp:
        raise ConfigError(f"--load {it_dir} was saved with --tensor-model-parallel-size "
                          f"{meta['tp']}, this run uses {tp}; use the same TP (or reshard with "
                          f"tools/convert_checkpoint.py megatron-to-megatron)")


def _check_files(it_dir: Path, with_rng: bool = True) -> None:
    """Every DeepSpeed (and RNG) file of the checkpoint loads safely (weights_only)."""
    fix = f"the checkpoint is truncated or corrupt{others_hint(it_dir.parent, it_dir)}"
    for f in sorted(it_dir.rglob("*.pt")):
        if f.parent.name == "rng":
            if with_rng:
                load_torch_file(f, "RNG state", "pass --no-load-rng to resume without it")
            continue
        load_torch_file(f, "checkpoint file", fix, deepspeed=True)


def preflight_checkpoint(cfg: TrainConfig) -> None:
    """Before start-up: the checkpoint to load fits, every file it will read loads safely,
    and ``--save`` may be written (no process group needed; every rank runs it)."""
    c = cfg.checkpoint
    it_dir = resolve_load(c.load, c.save, c.ckpt_step, c.finetune)
    check_save_target(cfg, it_dir)
    if it_dir is None:
        return
    meta = checkpoint_meta(it_dir)
    tp = cfg.parallel.tensor_model_parallel_size
    check_compatible(it_dir, meta, cfg.shape, tp)
    try:
        if c.finetune:
            fix = f"the checkpoint is truncated or corrupt{others_hint(it_dir.parent, it_dir)}"
            for r in range(tp):
                f, is_ds = weight_file(it_dir, meta, r)
                if not f.is_file():
                    raise ToolError(f"checkpoint {it_dir} lacks {f.name}; {fix}")
                load_torch_file(f, "checkpoint file", fix, deepspeed=is_ds)
        else:
            _check_files(it_dir, with_rng=not c.no_load_rng)
    except ToolError as exc:
        raise ConfigError(str(exc)) from None


def load_weights(module: torch.nn.Module, it_dir: Path, meta: dict, tp_rank: int) -> None:
    """Weights only (``--finetune``), before DeepSpeed wraps the model."""
    try:
        sd = load_rank_payload(it_dir, meta, tp_rank)["model"]
    except ToolError as exc:
        raise ConfigError(str(exc)) from None
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("_extra_state")]
    if missing:
        raise ConfigError(f"--load {it_dir} lacks {len(missing)} weights (first: {missing[0]}); "
                          f"it does not match this model")
    for k, v in own.items():
        if torch.is_tensor(v) and k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise ConfigError(f"--load {it_dir}: {k} has shape {tuple(sd[k].shape)}, the model "
                              f"expects {tuple(v.shape)}")
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def load_full(engine, it_dir: Path, meta: dict, restore_rng: bool) -> TrainState:
    """Exact resume: DeepSpeed state (model, optimizer), train state and RNG."""
    try:
        _check_files(it_dir, with_rng=restore_rng)
    except ToolError as exc:
        raise ConfigError(str(exc)) from None
    try:
        path, _ = engine.load_checkpoint(str(it_dir.parent), tag=it_dir.name,
                                         load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
    except Exception as exc:  # noqa: BLE001 - DeepSpeed's errors are multi-frame
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError(f"--load {it_dir}: DeepSpeed could not load it ({first}); the "
                          f"checkpoint is incomplete{others_hint(it_dir.parent, it_dir)}") from None
    if path is None:
        raise ConfigError(f"--load {it_dir} has no DeepSpeed state (converted weights); use "
                          f"--finetune to start from its weights alone")
    state = TrainState(int(meta["iteration"]), int(meta.get("consumed_samples", 0)),
                       int(meta.get("skipped_iters", 0)))
    if restore_rng:
        load_rng(it_dir)
    return state


def load_rng(it_dir: Path) -> bool:
    """This rank's RNG states from ``it_dir`` if it holds them (same world size)."""
    rng = it_dir / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if not rng.is_file():
        return False
    try:
        set_rng_state(load_torch_file(rng, "RNG state", "re-save the checkpoint", mmap=False))
    except (ToolError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--load: RNG state '{rng}' is unusable ({exc}); pass "
                          f"--no-load-rng to resume without it") from None
    return True


def _breaks(key: str, cfg: TrainConfig) -> bool:
    """Whether changing ``key`` makes the run differ from an uninterrupted one."""
    if key == "train_iters":  # feeds the LR decay (when over the whole run) and SAT
        o = cfg.optimizer
        return cfg.sat is not None or (o.lr_decay_iters == 0 and o.lr_decay_style != "constant")
    return True


def lineage_for(cfg: TrainConfig, meta: Optional[dict], resumed: bool) -> dict:
    """``meta.json`` extras carried on: the source HF config, the changes at each resume.

    Prints one "changed since the checkpoint" line per changed setting.
    """
    if meta is None:
        return {}
    out = {k: meta[k] for k in ("hf_config",) if k in meta}
    if not resumed:
        out["initialised_from"] = {"format": meta.get("format"), "iteration": meta["iteration"],
                                   "source": meta.get("source", "")}
        return out
    changes = list(meta.get("changes", []))
    old, new = meta.get("run") or {}, run_settings(cfg)
    changed = {k: [old.get(k), new[k]] for k in new if k in old and old[k] != new[k]}
    if changed:
        breaking = [k for k in changed if _breaks(k, cfg)]
        for k, (a, b) in changed.items():
            note = " (breaks exact resume)" if k in breaking else ""
            _print0(f" changed since the checkpoint: {k} {a} -> {b}{note}")
        changes.append({"at_iteration": meta["iteration"], "changed": changed,
                        "breaks_exact_resume": breaking})
    out["changes"] = changes
    if "initialised_from" in meta:
        out["initialised_from"] = meta["initialised_from"]
    return out
