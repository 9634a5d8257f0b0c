"""The model shape stored in a checkpoint, for ``--use-checkpoint-args`` and shape defaults.

Why: every megatron-sat checkpoint (trainer output and ``convert_checkpoint.py
hf-to-megatron`` output alike) records its shape in ``meta.json`` (and in each
``mp_rank_XX/model.pt``). A user continuing from one should not have to repeat eight
shape flags; Megatron's ``--use-checkpoint-args`` reads them from the checkpoint, and so
do we, also by default when no shape flag and no ``--model`` is given.

Only reads small files (``latest``, ``meta.json``); the weights file is opened
memory-mapped as a fallback, so this is cheap even for 70B checkpoints.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megatron_sat.training.configs import ConfigError


def checkpoint_dir(load: str) -> Optional[str]:
    """The checkpoint directory ``--load`` points at (via ``latest``), or None."""
    latest = os.path.join(load, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip().rstrip("/")
        path = os.path.join(load, tag)
        return path if os.path.isdir(path) else None
    if os.path.isdir(os.path.join(load, "mp_rank_00")):
        return os.path.normpath(load)
    return None


def checkpoint_header(load: str) -> Optional[dict]:
    """``meta.json`` of the checkpoint in ``load`` (shape, tp, iteration, ...), or None."""
    ckpt = checkpoint_dir(load)
    if ckpt is None:
        return None
    meta = os.path.join(ckpt, "meta.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            head = json.load(f)
        if "shape" in head:
            return head
    rank0 = os.path.join(ckpt, "mp_rank_00", "model.pt")
    if not os.path.isfile(rank0):
        return None
    import torch

    head = torch.load(rank0, map_location="cpu", mmap=True, weights_only=False)
    return {k: v for k, v in head.items() if k != "model"}


def shape_from_checkpoint(load: Optional[str], required: bool) -> Optional[dict]:
    """The checkpoint's shape dict; a one-line error if ``required`` and there is none."""
    head = checkpoint_header(load) if load else None
    if head is None or "shape" not in head:
        if required:
            raise ConfigError(f"--use-checkpoint-args: no megatron-sat checkpoint with a shape "
                              f"in --load {load}; convert HF weights there first or give the "
                              f"shape flags")
        return None
    return dict(head["shape"])
