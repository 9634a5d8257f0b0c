"""Writer for Megatron's memory-mapped indexed dataset (``.bin`` + ``.idx``).

Why our own writer: it needs only numpy (no torch, no megatron import in worker-free
preprocessing), streams documents of any count, and finalises atomically.  Byte layout
(REFERENCE.md §3), read back by ``megatron.core.datasets.indexed_dataset.IndexedDataset``
in the tests:

``.idx``: ``b"MMIDIDX\\x00\\x00"``, ``<Q`` version 1, ``<B`` dtype code, ``<Q`` sequence
count, ``<Q`` document count (stored as the document index's length, docs + 1, which is
how megatron-core writes and reads it), then ``int32`` sizes [seqs], ``int64`` byte pointers
[seqs], ``int64`` document index [docs + 1] starting at 0.
``.bin``: the token ids of every sequence, back to back, in the dtype.
Here one document is one sequence.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
               np.float64: 6, np.float32: 7, np.uint16: 8}


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits with margin (vocab < 65500), else int32 (Megatron's rule)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dataset_paths(prefix: os.PathLike | str) -> tuple[Path, Path]:
    """``(prefix.bin, prefix.idx)``."""
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedDatasetWriter:
    """Stream documents into ``prefix.bin``/``prefix.idx``; both appear only on ``finalize``.

    Use as a context manager; on an exception the temporary files are removed.
    """

    def __init__(self, prefix: os.PathLike | str, vocab_size: int):
        self.bin_path, self.idx_path = dataset_paths(prefix)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self._tmp_bin = self.bin_path.with_name(f".{self.bin_path.name}.tmp-{os.getpid()}")
        self._tmp_idx = self.idx_path.with_name(f".{self.idx_path.name}.tmp-{os.getpid()}")
        self._bin = None
        self._sizes: list[int] = []

    def __enter__(self) -> "IndexedDatasetWriter":
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._tmp_bin, "wb")
        return self

    def add_document(self, ids: Sequence[int]) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        self._bin.write(arr.astype(self.dtype).tobytes(order="C"))
        self._sizes.append(int(arr.size))

    @property
    def num_documents(self) -> int:
        return len(self._sizes)

    def _write_index(self) -> None:
        sizes = np.asarray(self._sizes, dtype=np.int32)  # [seqs]
        itemsize = np.dtype(self.dtype).itemsize
        pointers = np.zeros(len(sizes), dtype=np.int64)  # [seqs] byte offsets in .bin
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * itemsize, out=pointers[1:])
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)  # [docs + 1]
        with open(self._tmp_idx, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(sizes)))
            f.write(struct.pack("<Q", len(doc_idx)))  # docs + 1, as megatron reads it
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bin.close()
        if exc_type is None:
            self._write_index()
            for tmp in (self._tmp_bin, self._tmp_idx):  # on disk before they get final names
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(self._tmp_idx, self.idx_path)
        for p in (self._tmp_bin, self._tmp_idx):
            if p.exists():
                p.unlink()
