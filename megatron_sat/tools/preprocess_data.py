"""Raw (Chinese) corpora → Megatron indexed datasets for ``pretrain_llama.py --data-path``.

Why this shape: real corpora contain broken lines, so every record is parsed on its own
and a bad one is counted by reason and skipped, never fatal.  Work is split over
processes with an *ordered* ``imap``, so ``--workers N`` writes byte-for-byte what
``--workers 1`` writes.  Outputs follow Megatron's naming,
``{output_prefix}_{json_key}_document.{bin,idx}``, and appear atomically.

BOS/EOD are explicit: ``--append-eod`` appends the tokenizer's EOS id to each document,
and BOS is prepended only with ``--bos`` (default ``--no-bos``, Megatron's convention;
the choice is printed).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_sat.tools.cli import (Progress, ToolError, check_output_free, make_parser,
                                    run_main)
from megatron_sat.tools.indexed_writer import IndexedDatasetWriter, dataset_paths
from megatron_sat.tools.text_cleaning import CleaningConfig, TextCleaner, dedup_key
from megatron_sat.tools.text_tokenizer import TEXT_TOKENIZER_TYPES, TextTokenizer, load_tokenizer

INPUT_FORMATS = ("jsonl", "text")
SPLIT_MODES = ("line", "paragraph")
BOM = b"\xef\xbb\xbf"
SKIP_REASONS = ("invalid_utf8", "bad_json", "missing_key", "empty", "too_short", "duplicate")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything :func:`preprocess` needs; validated on construction."""

    inputs: Tuple[str, ...]
    output_prefix: str
    tokenizer_model: Optional[str]
    tokenizer_type: str = "SentencePieceTokenizer"
    input_format: str = "jsonl"
    json_keys: Tuple[str, ...] = ("text",)
    split_mode: str = "line"
    append_eod: bool = False
    bos: bool = False
    workers: int = 1
    chunk_size: int = 64
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    overwrite: bool = False
    show_progress: bool = True

    def __post_init__(self):
        problems = []
        if self.input_format not in INPUT_FORMATS:
            problems.append(f"--input-format must be one of {INPUT_FORMATS}")
        if self.split_mode not in SPLIT_MODES:
            problems.append(f"--split-mode must be one of {SPLIT_MODES}")
        if not self.json_keys:
            problems.append("--json-keys needs at least one key")
        if self.workers < 1 or self.chunk_size < 1:
            problems.append("--workers and --chunk-size must be at least 1")
        if not self.inputs:
            problems.append("--input needs at least one file")
        if problems:
            raise ToolError("; ".join(problems))

    @property
    def keys(self) -> Tuple[str, ...]:
        return self.json_keys if self.input_format == "jsonl" else ("text",)

    def output_prefix_for(self, key: str) -> str:
        return f"{self.output_prefix}_{key}_document"


@dataclass
class DatasetReport:
    """What was written for one JSON key."""

    key: str
    prefix: str
    documents: int = 0
    tokens: int = 0  # written, including BOS/EOD
    text_tokens: int = 0  # from the text alone
    characters: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def chars_per_token(self) -> float:
        return self.characters / max(self.text_tokens, 1)


@dataclass
class PreprocessReport:
    records: int
    seconds: float
    datasets: List[DatasetReport]


# Outcome of one record for one key: (reason, None, 0, b"") or ("ok", ids, chars, digest).
Outcome = Tuple[str, Optional[np.ndarray], int, bytes]


class RecordEncoder:
    """Parse, clean and tokenise one raw record; pure and deterministic (picklable)."""

    def __init__(self, config: PreprocessConfig, tokenizer: TextTokenizer):
        self.keys = config.keys
        self.jsonl = config.input_format == "jsonl"
        self.min_chars = config.cleaning.min_chars
        self.cleaner = TextCleaner(config.cleaning)
        self.tokenizer = tokenizer
        self.prefix = [tokenizer.bos_id] if config.bos else []
        self.suffix = [tokenizer.eos_id] if config.append_eod else []
        self.dtype = np.int32

    def __call__(self, raw: bytes) -> List[Outcome]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return [("invalid_utf8", None, 0, b"")] * len(self.keys)
        if not self.jsonl:
            return [self._encode(text)]
        if not text.strip():
            return [("empty", None, 0, b"")] * len(self.keys)
        try:
            record = json.loads(text)
        except ValueError:
            return [("bad_json", None, 0, b"")] * len(self.keys)
        outs = []
        for key in self.keys:
            value = record.get(key) if isinstance(record, dict) else None
            outs.append(self._encode(value) if isinstance(value, str)
                        else ("missing_key", None, 0, b""))
        return outs

    def _encode(self, text: str) -> Outcome:
        text = self.cleaner.clean(text)
        if not text.strip():
            return ("empty", None, 0, b"")
        if len(text) < self.min_chars:
            return ("too_short", None, 0, b"")
        ids = self.prefix + self.tokenizer.encode(text) + self.suffix
        return ("ok", np.asarray(ids, dtype=self.dtype), len(text), dedup_key(text))


def iter_records(paths: Sequence[str], input_format: str, split_mode: str) -> Iterator[bytes]:
    """Raw records as bytes (decoding happens per record, so bad UTF-8 only skips one)."""
    paragraph = input_format == "text" and split_mode == "paragraph"
    for path in paths:
        with open(path, "rb") as f:
            block: List[bytes] = []
            for i, line in enumerate(f):
                if i == 0 and line.startswith(BOM):  # files saved on Windows: utf-8-sig
                    line = line[len(BOM):]
                line = line.rstrip(b"\r\n")
                if not paragraph:
                    yield line
                elif line.strip():
                    block.append(line)
                elif block:
                    yield b"\n".join(block)
                    block = []
            if block:
                yield b"\n".join(block)


_WORKER_ENCODER: Optional[RecordEncoder] = None  # set once per worker process


def _init_worker(encoder: RecordEncoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _encode_in_worker(raw: bytes) -> List[Outcome]:
    return _WORKER_ENCODER(raw)


def preprocess(config: PreprocessConfig) -> PreprocessReport:
    """Write one indexed dataset per key; return counts. Raises ToolError on bad setup."""
    for p in config.inputs:
        if not Path(p).is_file():
            raise ToolError(f"input '{p}' not found; pass an existing file with --input")
    tokenizer = load_tokenizer(config.tokenizer_type, config.tokenizer_model)
    if config.bos and tokenizer.bos_id is None:
        raise ToolError("--bos given but the tokenizer has no BOS token; use --no-bos")
    if config.append_eod and tokenizer.eos_id is None:
        raise ToolError("--append-eod given but the tokenizer has no EOS token; drop it")
    outputs = [p for k in config.keys for p in dataset_paths(config.output_prefix_for(k))]
    check_output_free(outputs, config.overwrite, inputs=config.inputs)

    encoder = RecordEncoder(config, tokenizer)
    reports = [DatasetReport(k, config.output_prefix_for(k)) for k in config.keys]
    seen: List[set] = [set() for _ in config.keys]
    records = iter_records(config.inputs, config.input_format, config.split_mode)
    start = time.monotonic()
    n = 0
    with contextlib.ExitStack() as stack:
        bar = Progress("preprocess", unit="records", enabled=config.show_progress)
        stack.callback(bar.close)
        if config.workers > 1:
            # fork where available: workers inherit the loaded tokenizer instead of
            # re-importing torch (via megatron_sat) and re-reading the model.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            pool = stack.enter_context(
                ctx.Pool(config.workers, initializer=_init_worker, initargs=(encoder,)))
            outcomes = pool.imap(_encode_in_worker, records, chunksize=config.chunk_size)
        else:
            outcomes = map(encoder, records)
        # Writers are entered last, so they finalise (or clean up) before the pool stops.
        writers = [stack.enter_context(IndexedDatasetWriter(r.prefix, tokenizer.vocab_size))
                   for r in reports]
        for n, per_key in enumerate(outcomes, 1):
            for report, writer, done, (status, ids, chars, digest) in zip(
                    reports, writers, seen, per_key):
                if status == "ok" and config.cleaning.dedup:
                    status = "duplicate" if digest in done else status
                    done.add(digest)
                if status != "ok":
                    report.skipped[status] += 1
                    continue
                writer.add_document(ids)
                report.documents += 1
                report.tokens += len(ids)
                report.text_tokens += len(ids) - len(encoder.prefix) - len(encoder.suffix)
                report.characters += chars
            bar.update()
        empty = [r for r in reports if r.documents == 0]
        if empty:  # raised inside the writers' context: no output files are left behind
            raise ToolError(_no_documents_message(config, empty[0], n))
    return PreprocessReport(n, time.monotonic() - start, reports)


def _no_documents_message(config: PreprocessConfig, report: DatasetReport, records: int) -> str:
    """Zero documents is an error that names the likely cause (a training run would fail)."""
    skipped = report.skipped
    if records == 0:
        cause = "the input is empty; pass a file with text"
    elif config.input_format == "jsonl" and skipped["bad_json"] >= max(records // 2, 1):
        cause = ("most records are not JSON; for plain text (one document per line) pass "
                 "--input-format text")
    elif skipped["missing_key"]:
        cause = (f"no record has the key '{report.key}'; check --json-keys against the "
                 f"input's field names")
    else:
        reasons = ", ".join(f"{r} {skipped[r]}" for r in SKIP_REASONS if skipped[r])
        cause = f"every record was skipped ({reasons}); relax --min-chars/--dedup or check the input"
    return (f"no documents written for '{report.key}' from {records} record(s) of "
            f"{', '.join(config.inputs)}: {cause}")


def _print_summary(config: PreprocessConfig, rep: PreprocessReport) -> None:
    bos = "prepended (--bos)" if config.bos else "not added (--no-bos, the default)"
    eod = "appended (--append-eod)" if config.append_eod else "not appended"
    print(f"preprocessed {rep.records:,} records from {len(config.inputs)} file(s) in "
          f"{rep.seconds:.1f} s with {config.workers} worker(s); BOS {bos}; EOD {eod}")
    for d in rep.datasets:
        print(f"  '{d.key}' -> {d.prefix}.bin/.idx: {d.documents:,} documents, "
              f"{d.tokens:,} tokens, {d.characters:,} characters, "
              f"{d.chars_per_token:.2f} characters/token")
        skipped = ", ".join(f"{r} {d.skipped[r]:,}" for r in SKIP_REASONS if d.skipped[r])
        print(f"    skipped: {skipped or 'none'}")


EXAMPLES = """\
  # jsonl with a "text" field, Llama tokenizer, EOD after every document
  python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
      --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model \\
      --output-prefix data/zh --append-eod --workers 2
  # -> data/zh_text_document.bin / .idx ; train with --data-path data/zh_text_document

  # plain Chinese text, one document per line, cleaned and deduplicated
  python tools/preprocess_data.py --input zh_news.txt --input-format text \\
      --tokenizer-model tokenizer.model --output-prefix data/news --append-eod \\
      --nfkc --collapse-whitespace --min-chars 10 --dedup
"""


def build_parser():
    p = make_parser("preprocess_data.py",
                    "Tokenise jsonl or plain-text corpora into Megatron .bin/.idx datasets.",
                    EXAMPLES)
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, help="input file(s), read in order")
    g.add_argument("--input-format", choices=INPUT_FORMATS, default="jsonl")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="jsonl keys to extract, one dataset each (default: text)")
    g.add_argument("--split-mode", choices=SPLIT_MODES, default="line",
                   help="text input: one document per line, or per blank-line paragraph")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", choices=TEXT_TOKENIZER_TYPES, default="SentencePieceTokenizer")
    g.add_argument("--tokenizer-model", default=None,
                   help="tokenizer.model file, or an HF tokenizer folder for HuggingFaceTokenizer/HFTokenizer")
    g.add_argument("--append-eod", action="store_true", help="append EOS to every document")
    bos = g.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="bos", action="store_true",
                     help="prepend BOS to every document")
    bos.add_argument("--no-bos", dest="bos", action="store_false",
                     help="do not prepend BOS (default, Megatron's convention)")
    p.set_defaults(bos=False)
    g = p.add_argument_group("cleaning")
    g.add_argument("--nfkc", action="store_true", help="Unicode NFKC (full-width → half-width)")
    g.add_argument("--collapse-whitespace", action="store_true",
                   help="collapse whitespace runs to one space, drop blank lines")
    g.add_argument("--min-chars", type=int, default=0,
                   help="skip documents shorter than this after cleaning")
    g.add_argument("--dedup", action="store_true", help="skip exact duplicates after cleaning")
    g.add_argument("--t2s", action="store_true",
                   help="traditional → simplified Chinese (needs OpenCC installed)")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--chunk-size", type=int, default=64, help="records per worker task")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args) -> PreprocessConfig:
    cleaning = CleaningConfig(nfkc=args.nfkc, collapse_whitespace=args.collapse_whitespace,
                              min_chars=args.min_chars, dedup=args.dedup, t2s=args.t2s)
    return PreprocessConfig(
        inputs=tuple(args.input), output_prefix=args.output_prefix,
        tokenizer_model=args.tokenizer_model, tokenizer_type=args.tokenizer_type,
        input_format=args.input_format, json_keys=tuple(args.json_keys),
        split_mode=args.split_mode, append_eod=args.append_eod, bos=args.bos,
        workers=args.workers, chunk_size=args.chunk_size, cleaning=cleaning,
        overwrite=args.overwrite, show_progress=not args.no_progress)


def _run(args) -> None:
    config = config_from_args(args)
    _print_summary(config, preprocess(config))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
