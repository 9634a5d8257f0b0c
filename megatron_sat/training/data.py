"""Training and validation micro-batches from Megatron ``.bin/.idx`` data.

Why this shape: megatron-core's ``BlendedMegatronDatasetBuilder`` already does the hard
parts (weighted blending, ``--split``, shuffled sample indices cached under
``--data-cache-path``, built once by rank 0 while the others wait at a barrier). What is
left is the sampler: sample ``i`` of the run is a pure function of the number of samples
consumed, so a resumed run reads exactly the batches an uninterrupted one would. Each DP
rank reads its own slice of the global batch; the TP ranks of one replica read the same.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sat.training.configs import BatchConfig, ConfigError, DataConfig


class TokenizerInfo:
    """The few tokenizer facts ``GPTDataset`` needs: vocabulary size and end-of-document id.

    Data are pre-tokenised, so no text is ever encoded here. ``pad`` is absent on purpose:
    megatron then uses an id that never occurs in the data, so no real token is masked.
    """

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size = vocab_size
        self.eod = eod
        # megatron hashes this into the cache file names: same facts, same cache.
        self.unique_identifiers = {"class": "TokenizerInfo", "vocab_size": vocab_size,
                                   "eod": eod}

    @property
    def pad(self):
        raise AttributeError("no pad token")


def check_prefixes(cfg: DataConfig, seq_length: Optional[int] = None) -> None:
    """One-line error for a ``--data-path`` prefix whose ``.bin/.idx`` pair is missing,
    damaged (magic, version, dtype, sizes against the ``.bin`` length), empty, or too
    small to fill one sequence of ``seq_length`` tokens."""
    from megatron_sat.tools.cli import ToolError
    from megatron_sat.tools.file_checks import check_indexed_dataset

    for _, prefix in cfg.blend:
        try:
            _, tokens = check_indexed_dataset(prefix, "--data-path")
        except ToolError as e:
            raise ConfigError(str(e)) from None
        if seq_length is not None and tokens < seq_length + 1:
            raise ConfigError(f"--data-path {prefix} holds {tokens} tokens, fewer than one "
                              f"sample of --seq-length {seq_length} (+1); use more data or a "
                              f"shorter --seq-length")


def check_splits(cfg: DataConfig) -> None:
    """One-line error when ``--split`` leaves a split of some prefix without sequences.

    Why: megatron-core loops forever sizing the epochs of an empty split, so a 949,50,1
    split of a small corpus (an empty test third) would hang instead of failing.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.split))
    for _, prefix in cfg.blend:
        n = len(IndexedDataset(prefix).sequence_lengths)
        for name, bookends in zip(("train", "valid", "test"), matrix):
            if bookends is None:
                continue
            beg, end = (int(round(b * float(n))) for b in bookends)
            if end <= beg:
                raise ConfigError(
                    f"--split {cfg.split} leaves the {name} split of {prefix} empty ({n} "
                    f"sequences); give it weight 0 (e.g. --split 95,5,0) or use more data")


@dataclass
class Datasets:
    train: object
    valid: Optional[object]


def build_datasets(cfg: DataConfig, batch: BatchConfig, vocab_size: int, train_iters: int,
                   eval_iters: int, seed: int) -> Datasets:
    """Build the train/valid splits on every rank (rank 0 builds the index caches first)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import \
        BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    check_prefixes(cfg, batch.seq_length)
    check_splits(cfg)
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    prefixes = [p for _, p in cfg.blend]
    weights = None if not cfg.blend or cfg.blend[0][0] is None else [w for w, _ in cfg.blend]
    if cfg.data_cache_path:
        os.makedirs(cfg.data_cache_path, exist_ok=True)
    ds_config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=batch.seq_length,
        blend=None if cfg.mock else (prefixes, weights),
        split=cfg.split,
        path_to_cache=cfg.data_cache_path,
        tokenizer=TokenizerInfo(vocab_size, cfg.eod_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=False,
    )
    gbs = batch.global_batch_size
    sizes = [train_iters * gbs, max(eval_iters, 1) * gbs, max(eval_iters, 1) * gbs]
    train, valid, _ = BlendedMegatronDatasetBuilder(
        MockGPTDataset if cfg.mock else GPTDataset, sizes, lambda: True, ds_config).build()
    if train is None or len(train) == 0:
        raise ConfigError(f"--split {cfg.split} leaves no training data; give the train split "
                          f"a positive weight")
    return Datasets(train, valid if valid is not None and len(valid) > 0 else None)


class MicroBatchReader:
    """Reads this DP rank's micro-batches of a global batch, by position.

    Global batch ``k`` covers samples ``[c, c + G)`` with ``c`` the samples consumed so
    far. Micro-step ``m`` of DP rank ``r`` reads ``c + m·b·D + r·b + [0, b)``, so
    replicas never overlap and TP ranks (same ``r``) read identical tokens.
    """

    def __init__(self, dataset, batch: BatchConfig, dp_rank: int, device: torch.device):
        self.dataset = dataset
        self.batch = batch
        self.dp_rank = dp_rank
        self.device = device

    def get(self, consumed_samples: int, micro_step: int) -> dict:
        b, dp = self.batch.micro_batch_size, self.batch.data_parallel_size
        start = consumed_samples + micro_step * b * dp + self.dp_rank * b
        n = len(self.dataset)
        samples = [self.dataset[(start + i) % n] for i in range(b)]
        out = {}
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            out[key] = torch.stack([s[key] for s in samples]).to(self.device)  # [b, s]
        return out
