"""The tokenizers the tools accept, behind one small interface.

Why: preprocessing, vocabulary statistics and perplexity evaluation must all encode text
the same way, and must state BOS/EOS handling explicitly rather than inherit whatever
default a library picks (REFERENCE.md §3: BOS/EOS handling is a top user pain).
``encode`` never adds special tokens; callers add BOS/EOD themselves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from megatron_sat.tools.cli import ToolError

# One table for the trainer and every tool (Megatron-LM and Megatron-DeepSpeed names):
# name -> kind. "sp": a SentencePiece ``tokenizer.model``; "hf": a Hugging Face tokenizer
# folder; "null": no text tokenizer (pre-tokenised data only; the trainer accepts it, tools
# that encode text cannot).
TOKENIZER_KINDS = {
    "SentencePieceTokenizer": "sp",
    "GPTSentencePieceTokenizer": "sp",
    "Llama2Tokenizer": "sp",
    "HuggingFaceTokenizer": "hf",
    "HFTokenizer": "hf",
    "NullTokenizer": "null",
}
TOKENIZER_TYPES = tuple(TOKENIZER_KINDS)
TEXT_TOKENIZER_TYPES = tuple(k for k, v in TOKENIZER_KINDS.items() if v != "null")


def tokenizer_kind(tokenizer_type: str, flag: str = "--tokenizer-type") -> str:
    """"sp", "hf" or "null"; a one-line error naming the accepted types otherwise."""
    if tokenizer_type not in TOKENIZER_KINDS:
        raise ToolError(f"{flag} {tokenizer_type!r} is not supported; choose one of "
                        f"{', '.join(TOKENIZER_TYPES)}")
    return TOKENIZER_KINDS[tokenizer_type]


class TextTokenizer:
    """Interface: ``encode(text) -> ids`` without specials, plus special ids and size."""

    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError


class SentencePieceTextTokenizer(TextTokenizer):
    """A ``tokenizer.model`` read by the sentencepiece library."""

    def __init__(self, model_file: Path):
        import sentencepiece as spm

        from megatron_sat.tools.file_checks import require

        self.model_file = Path(model_file)
        require(self.model_file, "tokenizer model", "pass the tokenizer.model file with "
                "--tokenizer-model")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except Exception as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:100]
            raise ToolError(f"'{model_file}' is not a SentencePiece model ({first}); pass the "
                            f"tokenizer.model file with --tokenizer-model") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def __getstate__(self):
        return {"model_file": self.model_file}

    def __setstate__(self, state):
        self.__init__(state["model_file"])


class HFTextTokenizer(TextTokenizer):
    """A Hugging Face tokenizer folder (``AutoTokenizer.from_pretrained``)."""

    def __init__(self, folder: Path):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        try:
            self.tok = AutoTokenizer.from_pretrained(str(self.folder))
        except Exception as exc:
            raise ToolError(f"cannot load an HF tokenizer from '{folder}' ({type(exc).__name__}); "
                            f"pass a folder with tokenizer files via --tokenizer-model") from None
        self.vocab_size = len(self.tok)
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def __getstate__(self):
        return {"folder": self.folder}

    def __setstate__(self, state):
        self.__init__(state["folder"])


def load_tokenizer(tokenizer_type: str, model: Optional[os.PathLike | str]) -> TextTokenizer:
    """Build a tokenizer, or fail with one line naming the missing piece and the flag."""
    kind = tokenizer_kind(tokenizer_type)
    if kind == "null":
        raise ToolError(f"--tokenizer-type {tokenizer_type} cannot encode text; choose one of "
                        f"{', '.join(TEXT_TOKENIZER_TYPES)}")
    if model is None:
        raise ToolError("no tokenizer given; pass --tokenizer-model (a tokenizer.model file, "
                        "or an HF tokenizer folder with --tokenizer-type HFTokenizer)")
    path = Path(model)
    if kind == "sp":
        if path.is_dir() and (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise ToolError(f"tokenizer model '{model}' not found; pass an existing "
                            f"tokenizer.model with --tokenizer-model")
        return SentencePieceTextTokenizer(path)
    if not path.is_dir():
        raise ToolError(f"HF tokenizer folder '{model}' not found; pass an existing folder "
                        f"with --tokenizer-model, or use --tokenizer-type SentencePieceTokenizer")
    return HFTextTokenizer(path)
