"""The megatron-sat checkpoint format: what ``--save`` writes and ``--load`` reads.

Why our own small format: the converter, the vocabulary-resize tool, the perplexity tool
and the trainer must agree on it, and loading must be able to check that a checkpoint
fits the model being built (shape and padded vocabulary, the top user complaint) before
touching any tensor.  Layout::

    <dir>/latest                      text: the iteration folder's name, e.g. iter_0000000
    <dir>/iter_0000000/meta.json      format, iteration, tp, shape, padded vocab, dtype, source
    <dir>/iter_0000000/mp_rank_00/model.pt
    <dir>/iter_0000000/mp_rank_01/model.pt ...

Each ``model.pt`` is a dict: ``"model"`` (the megatron-core state dict of that TP rank,
names such as ``decoder.layers.0.self_attention.linear_qkv.weight``), ``"shape"``
(``LlamaShape.to_dict()``, with the true, unpadded ``vocab_size``),
``"padded_vocab_size"``, ``"tp"``, ``"tp_rank"``, ``"iteration"``, ``"format_version"``,
plus whatever extra keys the trainer adds (optimizer, RNG ...).  Files are loaded with
``torch.load(weights_only=True)``, so extras must be tensors, containers and numbers.

Writes are atomic: ranks write into a staging folder, which is renamed to its final
name, and only then is ``latest`` replaced.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import torch

from megatron_sat.model import LlamaShape
from megatron_sat.tools.cli import ToolError, atomic_write_bytes

FORMAT_NAME = "megatron-sat"
FORMAT_VERSION = 1
# Writers whose iteration folders hold the same mp_rank_XX/model.pt files: the tools
# (FORMAT_NAME) and the trainer (megatron_sat.training.checkpointing).
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
    os.replace(stage, final)
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


def find_iteration_dir(path: os.PathLike | str) -> Path:
    """The iteration folder for a checkpoint folder (via ``latest``) or an iteration folder."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        it_dir = path / latest.read_text().strip()
        if (it_dir / META_FILE).is_file():
            return it_dir
        raise ToolError(f"'{latest}' names '{it_dir.name}', which has no {META_FILE}; the "
                        f"save was interrupted: point 'latest' at a complete iter_* folder")
    raise ToolError(f"no megatron-sat checkpoint at '{path}' (no '{LATEST_FILE}' or "
                    f"'{META_FILE}'); convert an HF model with tools/convert_checkpoint.py "
                    f"hf-to-megatron, or pass the folder given to --save")


def is_megatron_checkpoint(path: os.PathLike | str) -> bool:
    path = Path(path)
    return (path / LATEST_FILE).is_file() or (path / META_FILE).is_file()


def read_checkpoint_meta(path: os.PathLike | str) -> dict:
    """``meta.json`` of the checkpoint (cheap: loads no tensors)."""
    meta = json.loads((find_iteration_dir(path) / META_FILE).read_text())
    if meta.get("format") not in READABLE_FORMATS:
        raise ToolError(f"'{path}' is not a {FORMAT_NAME} checkpoint (format "
                        f"{meta.get('format')!r}); convert it with tools/convert_checkpoint.py")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ToolError(f"'{path}' has format version {meta['format_version']}, newer than this "
                        f"code's {FORMAT_VERSION}; update megatron-sat")
    return meta


def load_megatron_checkpoint(path: os.PathLike | str, tp_rank: Optional[int] = None,
                             map_location: str | torch.device = "cpu") -> MegatronCheckpoint:
    """Load every TP rank (``tp_rank=None``) or just one, checking shape and vocab padding."""
    it_dir = find_iteration_dir(path)
    meta = read_checkpoint_meta(it_dir)
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
        f = rank_file(it_dir, r)
        if not f.is_file():
            raise ToolError(f"checkpoint {it_dir} lacks {f.relative_to(it_dir)}; it is incomplete")
        payload = torch.load(f, map_location=map_location, weights_only=True)
        emb = payload["model"].get(EMBEDDING_KEY)
        if payload.get("shape") != meta["shape"] or (emb is not None and emb.shape[0] * tp != padded):
            raise ToolError(f"{f} disagrees with {META_FILE} on the model shape; the checkpoint "
                            f"is corrupt")
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
