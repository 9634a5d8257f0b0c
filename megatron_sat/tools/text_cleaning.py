"""Chinese-aware text cleaning applied to each document before tokenisation.

Why these steps: Chinese web and news text mixes full-width and half-width forms
(``１９９８`` vs ``1998``) that a tokenizer would learn twice (NFKC folds them); stray
whitespace runs waste tokens; very short records and exact duplicates skew continual
pre-training; traditional characters split the vocabulary's statistics unless converted
to simplified (OpenCC, optional).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from megatron_sat.tools.cli import ToolError

_HSPACE = re.compile(r"[^\S\n]+")  # whitespace except newline


@dataclass(frozen=True)
class CleaningConfig:
    """Which cleaning steps run, in this order: t2s, NFKC, whitespace, length filter.

    ``min_chars`` counts characters after cleaning; ``dedup`` drops exact duplicates of
    the cleaned text (first occurrence kept).
    """

    nfkc: bool = False
    collapse_whitespace: bool = False
    min_chars: int = 0
    dedup: bool = False
    t2s: bool = False

    def __post_init__(self):
        if not isinstance(self.min_chars, int) or self.min_chars < 0:
            raise ToolError(f"--min-chars {self.min_chars!r} must be a non-negative integer")


class TextCleaner:
    """Applies a :class:`CleaningConfig` to one document at a time (picklable)."""

    def __init__(self, config: CleaningConfig):
        self.config = config
        self._converter = make_t2s_converter() if config.t2s else None

    def __getstate__(self):
        return {"config": self.config}

    def __setstate__(self, state):
        self.__init__(state["config"])

    def clean(self, text: str) -> str:
        c = self.config
        if self._converter is not None:
            text = self._converter.convert(text)
        if c.nfkc:
            text = unicodedata.normalize("NFKC", text)
        if c.collapse_whitespace:
            lines = (_HSPACE.sub(" ", line).strip() for line in text.split("\n"))
            text = "\n".join(line for line in lines if line)
        return text


def make_t2s_converter():
    """OpenCC traditional→simplified converter, or a one-line error naming the fix."""
    try:
        import opencc  # type: ignore
    except ImportError:
        raise ToolError("--t2s needs OpenCC, which is not installed; run "
                        "`pip install opencc-python-reimplemented` (or `opencc`), "
                        "or drop --t2s") from None
    for config in ("t2s", "t2s.json"):
        try:
            return opencc.OpenCC(config)
        except Exception:  # the two OpenCC packages name their configs differently
            continue
    raise ToolError("OpenCC is installed but has no 't2s' conversion; reinstall OpenCC")


def dedup_key(text: str) -> bytes:
    """A 16-byte digest identifying the cleaned text, for exact-duplicate removal."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
