"""Validation of every file the trainer and the tools read, at the point of reading.

Why one module: a truncated copy, a git-lfs pointer, a mistyped path or a checkpoint from
someone else must end in ONE line that names the file, what is wrong and the fix, never in
a traceback from deep inside torch, sentencepiece or megatron-core, and never in silently
wrong training.  Every reader (trainer and tools) goes through these functions.

Safe loading: :func:`load_torch_file` always uses ``torch.load(weights_only=True)``, so a
pickle that would import and call arbitrary code (``os.system`` ...) is refused before
anything runs.  The only non-tensor classes allowed are DeepSpeed's own plain-data
classes that its ZeRO optimizer files contain (:data:`DEEPSPEED_SAFE_GLOBALS`).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Optional, Tuple

from megatron_sat.tools.cli import ToolError

LFS_POINTER = b"version https://git-lfs"
IDX_MAGIC = b"MMIDIDX\x00\x00"
# dtype code -> item size of Megatron's indexed dataset (megatron-core's DType enum).
IDX_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}


def _head(path: Path, n: int = 64) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def require(path: os.PathLike | str, what: str, fix: str) -> Path:
    """``path`` if it is a readable, non-empty, non-LFS-pointer file; else a one-line error."""
    p = Path(path)
    if not p.exists():
        raise ToolError(f"{what} '{p}' does not exist; {fix}")
    if not p.is_file():
        raise ToolError(f"{what} '{p}' is not a file; {fix}")
    if not os.access(p, os.R_OK):
        raise ToolError(f"{what} '{p}' is not readable (permissions); fix its permissions")
    if p.stat().st_size == 0:
        raise ToolError(f"{what} '{p}' is empty (0 bytes); {fix}")
    if _head(p, len(LFS_POINTER)) == LFS_POINTER:
        raise ToolError(f"{what} '{p}' is a git-lfs pointer, not the file itself; run "
                        f"'git lfs pull' in its repository")
    return p


def read_json(path: os.PathLike | str, what: str, fix: str, kind: type = dict):
    """Parsed JSON of ``path`` (which must hold a ``kind``), or a one-line error."""
    p = require(path, what, fix)
    try:
        value = json.loads(p.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToolError(f"{what} '{p}' is not valid JSON ({exc}); {fix}") from None
    if not isinstance(value, kind):
        raise ToolError(f"{what} '{p}' holds a JSON {type(value).__name__}, expected a "
                        f"{kind.__name__}; {fix}")
    return value


def _deepspeed_safe_globals() -> list:
    """Plain-data DeepSpeed classes inside ZeRO optimizer files (no code runs on load)."""
    out = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        out += [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    except ImportError:
        pass
    return out


def load_torch_file(path: os.PathLike | str, what: str, fix: str, mmap: bool = True,
                    deepspeed: bool = False):
    """``torch.load(weights_only=True)`` with one-line errors for every way it can fail.

    A pickle that names any other global (code) is refused and never executed.
    """
    import pickle

    import torch

    p = require(path, what, fix)
    allowed = _deepspeed_safe_globals() if deepspeed else []
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as exc:
                if mmap and "mmap can only be used with files saved with" in str(exc):
                    return torch.load(p, map_location="cpu", weights_only=True)
                raise
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        marker = "Unsupported global: GLOBAL "
        if marker in msg:
            name = msg.split(marker, 1)[1].split()[0]
            raise ToolError(f"{what} '{p}' contains a pickled reference to {name}, which could "
                            f"run code when loaded; refused (only tensors and plain data are "
                            f"loaded). Re-create it from a trusted source") from None
        raise ToolError(f"{what} '{p}' is not a safe tensor file ({msg.splitlines()[0][:120]}); "
                        f"{fix}") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0][:120]
        raise ToolError(f"{what} '{p}' is unreadable ({first}); {fix}") from None


def check_sentencepiece(path: os.PathLike | str, flag: str) -> Tuple[int, int, int]:
    """``(pieces, bos id, eos id)`` of a SentencePiece model, or a one-line error."""
    fix = f"give a SentencePiece tokenizer.model with {flag}"
    p = require(path, f"{flag}", fix)
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(p))
    except Exception:  # sentencepiece raises RuntimeError/OSError with C++ text
        raise ToolError(f"{flag} '{p}' is not a SentencePiece model (cannot parse it); "
                        f"{fix}") from None
    return sp.get_piece_size(), sp.bos_id(), sp.eos_id()


def check_indexed_dataset(prefix: str, flag: str = "--data-path",
                          vocab_size: Optional[int] = None) -> Tuple[int, int]:
    """``(sequences, tokens)`` of a Megatron ``.bin/.idx`` pair after checking its header.

    Checks the magic, version, dtype code, that the index arrays fit in the ``.idx`` and
    that the sizes it lists match the ``.bin`` length (a truncated copy fails here).
    """
    fix = "re-create it with tools/preprocess_data.py"
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    missing = [str(x) for x in (bin_, idx) if not x.is_file()]
    if missing:
        raise ToolError(f"{flag} {prefix}: {' and '.join(missing)} not found; give the prefix "
                        f"(without .bin/.idx) of data made by tools/preprocess_data.py")
    require(idx, f"{flag} index", fix)
    head = _head(idx, 34)
    if len(head) < 34 or head[:9] != IDX_MAGIC:
        raise ToolError(f"{flag} index '{idx}' is not a Megatron indexed-dataset index (bad "
                        f"magic); {fix}")
    version, = struct.unpack("<Q", head[9:17])
    code = head[17]
    seqs, docs = struct.unpack("<QQ", head[18:34])
    if version != 1:
        raise ToolError(f"{flag} index '{idx}' has version {version}, expected 1; {fix}")
    if code not in IDX_DTYPE_SIZES:
        raise ToolError(f"{flag} index '{idx}' has unknown dtype code {code}; {fix}")
    need = 34 + seqs * 4 + seqs * 8 + docs * 8
    if idx.stat().st_size < need:
        raise ToolError(f"{flag} index '{idx}' is truncated ({idx.stat().st_size} bytes, its "
                        f"header needs {need}); {fix}")
    if seqs == 0:
        raise ToolError(f"{flag} {prefix} holds no documents (empty dataset); re-run "
                        f"tools/preprocess_data.py and check its 'skipped' counts")
    import numpy as np

    sizes = np.fromfile(idx, dtype=np.int32, count=seqs, offset=34)
    tokens = int(sizes.astype(np.int64).sum())
    expected = tokens * IDX_DTYPE_SIZES[code]
    actual = bin_.stat().st_size
    if actual != expected:
        state = "truncated" if actual < expected else "longer than its index says"
        raise ToolError(f"{flag} data '{bin_}' is {state} ({actual} bytes, the index lists "
                        f"{expected}); the .bin/.idx pair is damaged or mismatched, {fix}")
    if vocab_size is not None and code in (3, 8) and vocab_size > 65536:
        raise ToolError(f"{flag} {prefix} stores 16-bit ids but the vocabulary has "
                        f"{vocab_size} tokens; {fix}")
    return int(seqs), tokens
