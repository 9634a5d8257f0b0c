"""The megatron-sat checkpoint format: what ``--save`` writes and ``--load`` reads.

Why our own small format: the converter, the vocabulary-resize tool, the perplexity tool
and the trainer must agree on it, and loading must be able to check that a checkpoint
fits the model being built (shape and padded vocabulary, the top user complaint) before
touching any tensor.  Two writers share one folder layout::

    <dir>/latest                      text: the iteration folder's name, e.g. iter_0000100
    <dir>/iter_0000100/meta.json      format, iteration, tp, shape, padded vocab, dtype, ...
    <dir>/iter_0000100/...            the weights, ONE copy (below)

* Tools (``format: megatron-sat``): ``mp_rank_XX/model.pt`` per TP rank, a dict
  ``"model"`` (the megatron-core state dict of that TP rank), ``"shape"``
  (``LlamaShape.to_dict()``, with the true, unpadded ``vocab_size``),
  ``"padded_vocab_size"``, ``"tp"``, ``"tp_rank"``, ``"iteration"``, ``"format_version"``.
* Trainer (``format: megatron-sat-train``): DeepSpeed's own files, which exact resume
  needs anyway, and nothing else holding weights.  ``meta.json["weights"]`` says where
  the weights are:

  - ``"deepspeed"`` (ZeRO 0-2): ``mp_rank_XX_model_states.pt["module"]`` is TP rank
    XX's full state dict; the tools read it directly, as DeepSpeed's ``zero_to_fp32``
    does.  The optimizer states are in the same file (ZeRO 0) or in
    ``zero_pp_rank_*_mp_rank_XX_optim_states.pt`` (ZeRO 1-2).
  - ``"mp_rank"`` (ZeRO 3): DeepSpeed's model-state files hold no weights (only
    partitions in the optimizer files), so the gathered weights are written once, as
    ``mp_rank_XX/model.pt`` above.

  Resume at another DP size or ZeRO stage (``megatron_sat.training.reshard``) reads the
  same files, so no tensor is stored twice for it: at ZeRO 1-2 (and bf16) the full fp32
  master weights and Adam moments are reassembled from the ``zero_pp_rank_*`` shards via
  their ``param_slice_mappings``; at ZeRO-0 fp32 they are the model-state file's
  ``module`` and ``optimizer``. Only ZeRO-3 checkpoints add ``optim/mp_rank_XX.pt``
  (full fp32 weights + both moments per TP rank, ~12 bytes/param), because DeepSpeed's
  ZeRO-3 partitions are padded per parameter and carry no slice map; this is the one
  layout with a second copy of the optimizer state.

  Bytes per parameter (fp32, ZeRO-0, the layout the one-copy test measures): 4 (weights,
  ``module``) + 8 (the two moments, ``optimizer``) = 12, plus pickling overhead, RNG and
  ``meta.json``. ZeRO 1-2 add DeepSpeed's fp32 master copy in the shards (16 in fp32,
  2 + 12 = 14 in bf16).

  ``rng/rank_XXXXX.pt`` holds every rank's RNG states as tensors and ints, and
  ``meta.json`` the train state (iteration, consumed samples), the run's settings and
  the settings changed at each resume.

Safe loading: every file is read with ``torch.load(weights_only=True)``
(:func:`megatron_sat.tools.file_checks.load_torch_file`).  The one place that needs a
pickle of other objects is DeepSpeed's ZeRO optimizer file, which names plain-data
DeepSpeed classes (the ZeRO stage enum, the loss scaler, ``fragment_address``, listed in
``file_checks``); only those are allow-listed,
everything else is refused, so a checkpoint received from someone else cannot run code.
DeepSpeed's own loader (``weights_only=False``) only ever sees files that passed this check.

Writes are atomic: everything is written into a hidden sibling folder, fsync'd, and
renamed to its final ``iter_*`` name; only then is ``latest`` replaced.  A folder under
its final name is therefore always complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from megatron_sat.model import LlamaShape
from megatron_sat.tools.cli import ToolError, atomic_write_bytes, fsync_dir, fsync_tree
from megatron_sat.tools.file_checks import load_torch_file, read_json

FORMAT_NAME = "megatron-sat"
FORMAT_VERSION = 1
# The two writers whose folders every tool reads: the tools (FORMAT_NAME) and the trainer
# (megatron_sat.training.checkpointing; weights in DeepSpeed's files, see the layout above).
READABLE_FORMATS = (FORMAT_NAME, "megatron-sat-train")
LATEST_FILE = "latest"
META_FILE = "meta.json"
EMBEDDING_KEY = "embedding.word_embeddings.weight"
OUTPUT_KEY = "output_layer.weight"


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_file(iter_dir: os.PathLike | str, tp_rank: int) -> Path:
    return Path(iter_dir) / f"mp_rank_{tp_rank:02d}" / "model.pt"


def staging_dir(save_dir: os.PathLike | str, iteration: int) -> Path:
    """Where ranks write before :func:`commit_checkpoint` (same path on every rank)."""
    return Path(save_dir) / f".{iteration_dir_name(iteration)}.staging"


def clean_state_dict(state_dict: Mapping[str, object]) -> Dict[str, object]:
    """Drop ``_extra_state`` entries that are not ``None``/tensors (e.g. TE fp8 buffers).

    Why: they are not weights, and keeping arbitrary objects would force unsafe
    ``torch.load``.
    """
    return {k: v for k, v in state_dict.items()
            if not k.endswith("_extra_state") or v is None or torch.is_tensor(v)}


def write_rank_file(stage: os.PathLike | str, tp_rank: int, state_dict: Mapping[str, object],
                    shape: LlamaShape, tp: int, iteration: int = 0,
                    extra: Optional[Mapping[str, object]] = None) -> Path:
    """Write one TP rank's ``model.pt`` into a staging folder (each rank calls this)."""
    padded = shape.padded_vocab_size(tp)
    emb = state_dict.get(EMBEDDING_KEY)
    if emb is not None and emb.shape[0] * tp != padded:
        raise ToolError(f"embedding has {emb.shape[0]} rows per rank at TP={tp}, but the shape "
                        f"needs padded vocabulary {padded}; pad with llama_layout helpers")
    payload = {"model": clean_state_dict(state_dict), "shape": shape.to_dict(),
               "padded_vocab_size": padded, "tp": tp, "tp_rank": tp_rank,
               "iteration": iteration, "format_version": FORMAT_VERSION}
    payload.update(extra or {})
    path = rank_file(stage, tp_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    return path


def commit_checkpoint(save_dir: os.PathLike | str, stage: os.PathLike | str, iteration: int,
                      shape: LlamaShape, tp: int, dtype: str, source: str = "",
                      extra_meta: Optional[Mapping[str, object]] = None,
                      overwrite: bool = False) -> Path:
    """Write ``meta.json``, rename the staging folder into place, then update ``latest``.

    Call on one process after every rank's :func:`write_rank_file` finished (barrier).
    """
    save_dir, stage = Path(save_dir), Path(stage)
    missing = [r for r in range(tp) if not rank_file(stage, r).is_file()]
    if missing:
        raise ToolError(f"staging folder {stage} lacks TP ranks {missing}; every rank must "
                        f"write its file before the commit")
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "iteration": iteration,
            "tp": tp, "shape": shape.to_dict(), "padded_vocab_size": shape.padded_vocab_size(tp),
            "dtype": dtype, "source": source}
    meta.update(extra_meta or {})
    (stage / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    final = save_dir / iteration_dir_name(iteration)
    if final.exists():
        if not overwrite:
            raise ToolError(f"checkpoint {final} already exists; pass --overwrite to replace it")
        shutil.rmtree(final)
    fsync_tree(stage)
    os.replace(stage, final)
    fsync_dir(save_dir)
    atomic_write_bytes(save_dir / LATEST_FILE, (final.name + "\n").encode())
    return final


def dtype_name(state_dict: Mapping[str, object]) -> str:
    dtypes = {str(v.dtype).replace("torch.", "") for v in state_dict.values()
              if torch.is_tensor(v) and v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def save_megatron_checkpoint(save_dir: os.PathLike | str,
                             rank_state_dicts: Sequence[Mapping[str, object]],
                             shape: LlamaShape, *, iteration: int = 0, source: str = "",
                             extra_meta: Optional[Mapping[str, object]] = None,
                             overwrite: bool = False) -> Path:
    """Save all TP ranks from one process; returns the iteration folder.

    ``rank_state_dicts[r]`` is TP rank ``r``'s megatron-core state dict; TP is their count.
    """
    tp = len(rank_state_dicts)
    shape.check_tp(tp)
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    stage = staging_dir(save_dir, iteration)
    if stage.exists():
        shutil.rmtree(stage)
    try:
        for r, sd in enumerate(rank_state_dicts):
            write_rank_file(stage, r, sd, shape, tp, iteration)
        return commit_checkpoint(save_dir, stage, iteration, shape, tp,
                                 dtype_name(rank_state_dicts[0]), source, extra_meta, overwrite)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


@dataclass
class MegatronCheckpoint:
    """A loaded checkpoint: ``payloads[rank]`` is that rank's whole ``model.pt`` dict."""

    path: Path  # the iteration folder
    meta: dict
    shape: LlamaShape
    tp: int
    padded_vocab_size: int
    iteration: int
    payloads: Dict[int, dict]

    def model(self, tp_rank: int = 0) -> Dict[str, torch.Tensor]:
        return self.payloads[tp_rank]["model"]

    def rank_models(self) -> list:
        return [self.model(r) for r in range(self.tp)]


ITER_PREFIX = "iter_"
CHECKPOINT_FIX = ("convert an HF model with tools/convert_checkpoint.py hf-to-megatron, or pass "
                  "the folder given to --save")


def complete_iterations(save_dir: os.PathLike | str) -> list:
    """``[(iteration, folder)]`` of the iteration folders that hold a ``meta.json``, oldest first.

    Folders under their final name are complete by construction (atomic rename); the
    ``meta.json`` test also skips folders another program left half-copied.
    """
    out = []
    root = Path(save_dir)
    if not root.is_dir():
        return out
    for d in root.iterdir():
        name = d.name
        if name.startswith(ITER_PREFIX) and name[len(ITER_PREFIX):].isdigit() \
                and (d / META_FILE).is_file():
            out.append((int(name[len(ITER_PREFIX):]), d))
    return sorted(out)


def others_hint(save_dir: os.PathLike | str, exclude: Optional[Path] = None) -> str:
    """'; other complete checkpoints: ... load one with --ckpt-step N' (or a no-others note)."""
    others = [(i, d) for i, d in complete_iterations(save_dir)
              if exclude is None or d.resolve() != Path(exclude).resolve()]
    if not others:
        return "; no other complete checkpoint is in the folder"
    names = ", ".join(d.name for _, d in others[-5:])
    return f"; other complete checkpoints: {names}; load one with --ckpt-step {others[-1][0]}"


def find_iteration_dir(path: os.PathLike | str, step: Optional[int] = None) -> Path:
    """The iteration folder for a checkpoint folder (via ``latest`` or ``step``) or itself."""
    path = Path(path)
    if not path.exists():
        raise ToolError(f"checkpoint folder '{path}' does not exist; {CHECKPOINT_FIX}")
    if step is not None:
        it_dir = path / iteration_dir_name(step)
        if not (it_dir / META_FILE).is_file():
            raise ToolError(f"--ckpt-step {step}: '{it_dir}' is not a complete checkpoint"
                            f"{others_hint(path)}")
        return it_dir
    if (path / META_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        try:
            name = latest.read_bytes().decode("utf-8").strip().rstrip("/")
        except UnicodeDecodeError:
            name = ""
        if not name.startswith(ITER_PREFIX) or "/" in name or not name[5:].isdigit():
            raise ToolError(f"'{latest}' does not name an iteration folder ({name[:40]!r}); it "
                            f"is corrupt{others_hint(path)}")
        it_dir = path / name
        if (it_dir / META_FILE).is_file():
            return it_dir
        raise ToolError(f"'{latest}' names '{name}', which is missing or incomplete (no "
                        f"{META_FILE}){others_hint(path)}")
    found = complete_iterations(path)
    if found:
        raise ToolError(f"'{path}' has checkpoints but no '{LATEST_FILE}' file"
                        f"{others_hint(path)}")
    raise ToolError(f"no megatron-sat checkpoint at '{path}' (no '{LATEST_FILE}' or "
                    f"'{META_FILE}'); {CHECKPOINT_FIX}")


def is_megatron_checkpoint(path: os.PathLike | str) -> bool:
    path = Path(path)
    return (path / LATEST_FILE).is_file() or (path / META_FILE).is_file()


def validated_meta(it_dir: Path) -> dict:
    meta = read_json(it_dir / META_FILE, "checkpoint metadata",
                     f"the checkpoint is corrupt{others_hint(it_dir.parent, it_dir)}")
    if meta.get("format") not in READABLE_FORMATS:
        raise ToolError(f"'{it_dir}' is not a {FORMAT_NAME} checkpoint (format "
                        f"{meta.get('format')!r}); convert it with tools/convert_checkpoint.py")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ToolError(f"'{it_dir}' has format version {meta['format_version']}, newer than "
                        f"this code's {FORMAT_VERSION}; update megatron-sat")
    bad = [k for k in ("shape", "tp", "padded_vocab_size", "iteration") if k not in meta]
    try:
        if not bad:
            LlamaShape.from_dict(meta["shape"])
    except (TypeError, ValueError) as exc:
        bad.append(f"shape ({exc})")
    if bad:
        raise ToolError(f"'{it_dir / META_FILE}' lacks or has a bad {', '.join(bad)}; the "
                        f"checkpoint is corrupt{others_hint(it_dir.parent, it_dir)}")
    return meta


def read_checkpoint_meta(path: os.PathLike | str, step: Optional[int] = None) -> dict:
    """``meta.json`` of the checkpoint (cheap: loads no tensors), validated."""
    return validated_meta(find_iteration_dir(path, step))


def weight_file(it_dir: Path, meta: dict, tp_rank: int) -> Tuple[Path, bool]:
    """(file holding TP rank ``tp_rank``'s weights, whether it is DeepSpeed's model states)."""
    if meta.get("weights") == "deepspeed":
        return it_dir / f"mp_rank_{tp_rank:02d}_model_states.pt", True
    return rank_file(it_dir, tp_rank), False


def load_rank_payload(it_dir: Path, meta: dict, tp_rank: int,
                      map_location: str | torch.device = "cpu") -> dict:
    """One TP rank's ``{"model": state_dict, "shape": ...}``, whichever writer made it."""
    f, is_ds = weight_file(it_dir, meta, tp_rank)
    fix = f"the checkpoint is incomplete or corrupt{others_hint(it_dir.parent, it_dir)}"
    if not f.is_file():
        raise ToolError(f"checkpoint {it_dir} lacks {f.name if is_ds else f.relative_to(it_dir)}"
                        f"; {fix}")
    payload = load_torch_file(f, "checkpoint file", fix, deepspeed=is_ds)
    if not isinstance(payload, dict) or not isinstance(payload.get("module" if is_ds else "model"),
                                                       dict):
        raise ToolError(f"checkpoint file '{f}' holds no model state dict; {fix}")
    if is_ds:
        payload = {"model": clean_state_dict(payload["module"]), "shape": meta["shape"]}
    if map_location != "cpu":
        payload["model"] = {k: v.to(map_location) if torch.is_tensor(v) else v
                            for k, v in payload["model"].items()}
    return payload


def load_megatron_checkpoint(path: os.PathLike | str, tp_rank: Optional[int] = None,
                             map_location: str | torch.device = "cpu",
                             step: Optional[int] = None) -> MegatronCheckpoint:
    """Load every TP rank (``tp_rank=None``) or just one, checking shape and vocab padding."""
    it_dir = find_iteration_dir(path, step)
    meta = validated_meta(it_dir)
    shape = LlamaShape.from_dict(meta["shape"])
    tp, padded = int(meta["tp"]), int(meta["padded_vocab_size"])
    if padded != shape.padded_vocab_size(tp):
        raise ToolError(f"{it_dir}: padded vocabulary {padded} does not match vocab_size "
                        f"{shape.vocab_size} padded for TP={tp}; the checkpoint is corrupt")
    ranks = range(tp) if tp_rank is None else [tp_rank]
    if tp_rank is not None and not 0 <= tp_rank < tp:
        raise ToolError(f"checkpoint {it_dir} has TP={tp}, so TP rank {tp_rank} does not exist; "
                        f"run with --tensor-model-parallel-size {tp} or reshard it with "
                        f"tools/convert_checkpoint.py megatron-to-megatron --target-tp N")
    payloads = {}
    for r in ranks:
        payload = load_rank_payload(it_dir, meta, r, map_location)
        emb = payload["model"].get(EMBEDDING_KEY)
        if payload.get("shape") != meta["shape"] or (emb is not None and emb.shape[0] * tp != padded):
            raise ToolError(f"{weight_file(it_dir, meta, r)[0]} disagrees with {META_FILE} on "
                            f"the model shape; the checkpoint is corrupt")
        payloads[r] = payload
    return MegatronCheckpoint(it_dir, meta, shape, tp, padded, int(meta["iteration"]), payloads)


def load_state_dict_into(model: torch.nn.Module, state_dict: Mapping[str, object]) -> None:
    """``model.load_state_dict`` that tolerates absent ``_extra_state`` but nothing else."""
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ToolError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}; check --num-layers and the other shape flags")
