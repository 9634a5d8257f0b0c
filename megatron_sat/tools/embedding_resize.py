"""Grow a checkpoint's embedding and output layer to a larger vocabulary.

Why mean initialisation: a new token's embedding at the mean of the old ones (and its
output row likewise) gives it an average logit instead of a random one, so the first
steps after vocabulary extension do not spike the loss (a known pain, REFERENCE.md §3).
Optional Gaussian noise (``--init-noise-std``) breaks the symmetry between new rows.
Old rows are copied bit for bit.

One vocabulary rule for every tool (the trainer, the converter, this resize, the
perplexity tool): ``vocab_size`` is always the TRUE vocabulary, the tokenizer's piece
count.  HF folders store exactly that many rows (HF has no padding concept, and a padded
``vocab_size`` in ``config.json`` would disagree with the tokenizer).  Megatron-sat
checkpoints store ``shape.padded_vocab_size(tp)`` rows, a multiple of
``make_vocab_size_divisible_by × TP``, with zero padding rows, and record the true size
in ``meta.json``; the converter pads and trims at the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_sat.tools import llama_layout
from megatron_sat.tools.ckpt_format import (EMBEDDING_KEY, OUTPUT_KEY, is_megatron_checkpoint,
                                            load_megatron_checkpoint, save_megatron_checkpoint)
from megatron_sat.tools.cli import ToolError, atomic_dir, check_output_free
from megatron_sat.tools.hf_llama import (is_hf_checkpoint, load_hf_checkpoint, read_hf_config,
                                         save_hf_checkpoint)

HF_VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass
class ResizeReport:
    kind: str  # "hf" or "megatron"
    old_vocab_size: int
    new_vocab_size: int
    rows: int  # rows stored (padded)
    output: Path


def grow_rows(w: torch.Tensor, old_rows: int, new_rows: int, noise_std: float,
              generator: torch.Generator) -> torch.Tensor:
    """``w[:old_rows]`` kept exactly; rows ``old_rows..new_rows-1`` = mean (+ noise).

    ``w`` is ``[rows, h]``; the mean is taken in fp32 over the first ``old_rows`` rows.
    """
    old = w[:old_rows]
    mean = old.float().mean(dim=0, keepdim=True)  # [1, h]
    extra = mean.expand(new_rows - old_rows, -1).clone()  # [new - old, h]
    if noise_std > 0:
        extra += noise_std * torch.randn(extra.shape, generator=generator)
    return torch.cat([old, extra.to(w.dtype)])


def _check_sizes(old: int, new: int, tokenizer_desc: str) -> None:
    if new < old:
        raise ToolError(f"the new vocabulary ({tokenizer_desc}, {new} tokens) is smaller than the "
                        f"checkpoint's ({old}); pass the merged tokenizer, which extends the "
                        f"checkpoint's own")


def resize_hf(src: str | Path, dst: str | Path, new_vocab_size: int, noise_std: float = 0.0,
              seed: int = 1234, make_vocab_size_divisible_by: int = 128,
              tokenizer_dir: Optional[str | Path] = None, overwrite: bool = False,
              tokenizer_desc: str = "tokenizer") -> ResizeReport:
    """Resize an HF Llama folder; copy ``tokenizer_dir``'s files in so it is self-contained."""
    check_output_free([dst], overwrite, inputs=[src])
    shape, config, sd = load_hf_checkpoint(src)
    old = shape.vocab_size
    _check_sizes(old, new_vocab_size, tokenizer_desc)
    rows = new_vocab_size  # the true vocabulary; padding is the megatron side's business
    gen = torch.Generator().manual_seed(seed)
    if "lm_head.weight" not in sd:  # tied checkpoints are written untied
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    for k in HF_VOCAB_KEYS:
        sd[k] = grow_rows(sd[k], old, rows, noise_std, gen)
    config = {**config, "vocab_size": new_vocab_size, "tie_word_embeddings": False}
    with atomic_dir(dst, overwrite) as tmp:
        save_hf_checkpoint(tmp, sd, config)
        for extra in ("generation_config.json",):
            if (Path(src) / extra).is_file():
                (tmp / extra).write_bytes((Path(src) / extra).read_bytes())
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file():
                    (tmp / f.name).write_bytes(f.read_bytes())
    return ResizeReport("hf", old, new_vocab_size, rows, Path(dst))


def resize_megatron(src: str | Path, dst: str | Path, new_vocab_size: int,
                    noise_std: float = 0.0, seed: int = 1234,
                    make_vocab_size_divisible_by: Optional[int] = None,
                    overwrite: bool = False, tokenizer_desc: str = "tokenizer") -> ResizeReport:
    """Resize a megatron-sat checkpoint at its own TP degree."""
    check_output_free([dst], overwrite, inputs=[src])
    ckpt = load_megatron_checkpoint(src)
    old = ckpt.shape.vocab_size
    _check_sizes(old, new_vocab_size, tokenizer_desc)
    changes = {"vocab_size": new_vocab_size}
    if make_vocab_size_divisible_by:
        changes["make_vocab_size_divisible_by"] = make_vocab_size_divisible_by
    shape = ckpt.shape.replace(**changes)
    padded = shape.padded_vocab_size(ckpt.tp)
    gen = torch.Generator().manual_seed(seed)
    ranks = [dict(sd) for sd in ckpt.rank_models()]
    for key in (EMBEDDING_KEY, OUTPUT_KEY):
        full = torch.cat([sd[key] for sd in ranks])  # [old padded, h]
        grown = llama_layout.pad_vocab_rows(grow_rows(full, old, new_vocab_size, noise_std, gen),
                                            padded)  # [padded, h]
        for sd, chunk in zip(ranks, grown.chunk(ckpt.tp)):
            sd[key] = chunk.clone()
    meta = {k: v for k, v in ckpt.meta.items() if k == "hf_config"}
    meta["vocab_extension"] = {"old_vocab_size": old, "new_vocab_size": new_vocab_size,
                               "init": "mean", "noise_std": noise_std, "seed": seed}
    with atomic_dir(dst, overwrite) as tmp:
        save_megatron_checkpoint(tmp, ranks, shape, iteration=ckpt.iteration,
                                 source=f"megatron:{Path(src).resolve()}", extra_meta=meta)
    return ResizeReport("megatron", old, new_vocab_size, padded, Path(dst))


def checkpoint_vocab_size(src: str | Path) -> int:
    """True vocabulary size of an HF folder or megatron-sat checkpoint (reads no tensors)."""
    from megatron_sat.tools.ckpt_format import read_checkpoint_meta
    from megatron_sat.tools.hf_llama import shape_from_hf_config

    if is_megatron_checkpoint(src):
        return int(read_checkpoint_meta(src)["shape"]["vocab_size"])
    if is_hf_checkpoint(src):
        return shape_from_hf_config(read_hf_config(src)).vocab_size
    raise ToolError(f"'{src}' is neither an HF folder (config.json) nor a megatron-sat "
                    f"checkpoint (latest/meta.json); check --resize-checkpoint")


def check_resizable(src: str | Path, new_vocab_size: int, tokenizer_desc: str) -> None:
    """Fail early (before any output is written) if ``src`` cannot grow to the new size."""
    _check_sizes(checkpoint_vocab_size(src), new_vocab_size, tokenizer_desc)


def resize_checkpoint(src: str | Path, dst: str | Path, new_vocab_size: int, **kwargs) -> ResizeReport:
    """Resize an HF folder or a megatron-sat checkpoint, whichever ``src`` is."""
    if is_megatron_checkpoint(src):
        kwargs.pop("tokenizer_dir", None)
        return resize_megatron(src, dst, new_vocab_size, **kwargs)
    if is_hf_checkpoint(src):
        kwargs["make_vocab_size_divisible_by"] = kwargs.get("make_vocab_size_divisible_by") or 128
        return resize_hf(src, dst, new_vocab_size, **kwargs)
    raise ToolError(f"'{src}' is neither an HF folder (config.json) nor a megatron-sat "
                    f"checkpoint (latest/meta.json); check --resize-checkpoint")

