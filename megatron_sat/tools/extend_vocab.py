"""Chinese vocabulary extension of a Llama tokenizer, and the matching checkpoint resize.

Why one tool: the tokenizer and the checkpoint must change together (a checkpoint with
fewer rows than the tokenizer has ids crashes or, worse, silently aliases tokens), so
the same run that writes the merged tokenizer can resize the checkpoint to it.

Steps: hold out the corpus tail (or ``--eval-file``) for statistics, train a Chinese BPE
SentencePiece model on the rest (or take ``--zh-model``), merge its missing pieces into
the base ``tokenizer.model`` (:mod:`vocab_merge`), write a tokenizer folder that
sentencepiece and HF ``from_pretrained`` load with identical ids, and optionally resize a
checkpoint (:mod:`embedding_resize`).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from megatron_sat.tools.cli import ToolError, atomic_dir, check_output_free, make_parser, run_main
from megatron_sat.tools.embedding_resize import ResizeReport, check_resizable, resize_checkpoint
from megatron_sat.tools.vocab_merge import (SpmTrainConfig, merge_pieces, read_model_proto,
                                            tokens_per_char, train_chinese_spm,
                                            write_tokenizer_folder)


@dataclass(frozen=True)
class ExtendVocabConfig:
    base_tokenizer: str
    output_dir: str
    corpus: Tuple[str, ...] = ()
    zh_model: Optional[str] = None
    eval_file: Optional[str] = None
    heldout_fraction: float = 0.05
    max_eval_lines: int = 2000
    train: SpmTrainConfig = field(default_factory=SpmTrainConfig)
    resize_checkpoint: Optional[str] = None
    output_checkpoint: Optional[str] = None
    init_noise_std: float = 0.0
    seed: int = 1234
    make_vocab_size_divisible_by: Optional[int] = None
    overwrite: bool = False

    def __post_init__(self):
        problems = []
        if not self.corpus and not self.zh_model:
            problems.append("give --corpus to train a Chinese model, or --zh-model to merge one")
        if not 0.0 <= self.heldout_fraction < 0.5:
            problems.append("--heldout-fraction must be in [0, 0.5)")
        if (self.resize_checkpoint is None) != (self.output_checkpoint is None):
            problems.append("--resize-checkpoint and --output-checkpoint go together")
        if self.init_noise_std < 0:
            problems.append("--init-noise-std must be ≥ 0")
        if problems:
            raise ToolError("; ".join(problems))


@dataclass
class ExtendVocabReport:
    base_vocab_size: int
    new_vocab_size: int
    pieces_added: int
    eval_lines: int
    tokens_per_char_before: Optional[float]
    tokens_per_char_after: Optional[float]
    output_dir: Path
    seconds: float
    resize: Optional[ResizeReport] = None


def _read_lines(paths: Sequence[str]) -> List[str]:
    lines = []
    for p in paths:
        if not Path(p).is_file():
            raise ToolError(f"corpus file '{p}' not found; pass existing text files to --corpus")
        lines += [l.strip() for l in Path(p).read_text(encoding="utf-8-sig", errors="replace")
                  .splitlines() if l.strip()]
    return lines


def extend_vocab(config: ExtendVocabConfig) -> ExtendVocabReport:
    """Build the merged tokenizer folder (and resized checkpoint); return the statistics."""
    start = time.monotonic()
    outputs = [config.output_dir] + ([config.output_checkpoint] if config.output_checkpoint else [])
    inputs = [config.base_tokenizer, *config.corpus,
              *(p for p in (config.zh_model, config.resize_checkpoint) if p)]
    check_output_free(outputs, config.overwrite, inputs=inputs)
    base = read_model_proto(config.base_tokenizer)
    lines = _read_lines(config.corpus)
    n_eval = int(len(lines) * config.heldout_fraction) if not config.eval_file else 0
    train_lines, eval_lines = lines[: len(lines) - n_eval], lines[len(lines) - n_eval:]
    if config.eval_file:
        eval_lines = _read_lines([config.eval_file])
    eval_lines = eval_lines[: config.max_eval_lines]

    with tempfile.TemporaryDirectory(prefix="zh-spm-") as tmp:
        if config.zh_model:
            zh = read_model_proto(config.zh_model)
        else:
            print(f"training a {config.train.vocab_size}-piece Chinese BPE model on "
                  f"{len(train_lines):,} lines ...", file=sys.stderr, flush=True)
            zh = read_model_proto(train_chinese_spm(train_lines, Path(tmp) / "zh", config.train))
    merged = merge_pieces(base, zh)
    tok_desc = f"{config.output_dir}/tokenizer.model"
    if config.resize_checkpoint:
        check_resizable(config.resize_checkpoint, merged.vocab_size, tok_desc)
    with atomic_dir(config.output_dir, config.overwrite) as out:
        write_tokenizer_folder(out, merged.proto)
    before = tokens_per_char(base, eval_lines) if eval_lines else None
    after = tokens_per_char(merged.proto, eval_lines) if eval_lines else None
    report = ExtendVocabReport(merged.base_size, merged.vocab_size, len(merged.added),
                               len(eval_lines), before, after, Path(config.output_dir),
                               time.monotonic() - start)
    if config.resize_checkpoint:
        report.resize = resize_checkpoint(
            config.resize_checkpoint, config.output_checkpoint, merged.vocab_size,
            noise_std=config.init_noise_std, seed=config.seed,
            make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
            tokenizer_dir=config.output_dir, overwrite=config.overwrite,
            tokenizer_desc=tok_desc)
    return report


def _print_summary(r: ExtendVocabReport) -> None:
    print(f"merged tokenizer written to {r.output_dir} in {r.seconds:.1f} s")
    print(f"  pieces added: {r.pieces_added:,}; vocabulary {r.base_vocab_size:,} -> "
          f"{r.new_vocab_size:,} (ids 0..{r.base_vocab_size - 1} unchanged)")
    if r.tokens_per_char_before is not None:
        change = 1 - r.tokens_per_char_after / r.tokens_per_char_before
        print(f"  tokens per character on {r.eval_lines:,} held-out lines: "
              f"{r.tokens_per_char_before:.3f} -> {r.tokens_per_char_after:.3f} "
              f"({change:.1%} fewer tokens)")
    if r.resize:
        z = r.resize
        print(f"  resized {z.kind} checkpoint -> {z.output}: vocabulary {z.old_vocab_size:,} -> "
              f"{z.new_vocab_size:,}, stored rows {z.rows:,} (new rows = mean of old)")


EXAMPLES = """\
  # train a 20k-piece Chinese BPE model on a corpus and merge it into Llama's tokenizer
  python tools/extend_vocab.py --base-tokenizer Llama-2-7b-hf/tokenizer.model \\
      --corpus zh_news.txt zh_reviews.txt --vocab-size 20000 --output-dir tok-zh

  # ... and resize the HF checkpoint to match (new rows = mean of old rows)
  python tools/extend_vocab.py --base-tokenizer Llama-2-7b-hf/tokenizer.model \\
      --corpus zh_news.txt --output-dir tok-zh \\
      --resize-checkpoint Llama-2-7b-hf --output-checkpoint Llama-2-7b-zh-hf

  # merge an existing Chinese model; resize a megatron-sat checkpoint
  python tools/extend_vocab.py --base-tokenizer tokenizer.model --zh-model zh.model \\
      --eval-file heldout.txt --output-dir tok-zh \\
      --resize-checkpoint ckpt/llama2-tp2 --output-checkpoint ckpt/llama2-zh-tp2
"""


def build_parser():
    p = make_parser("extend_vocab.py",
                    "Extend a Llama tokenizer with Chinese pieces; optionally resize a checkpoint.",
                    EXAMPLES)
    p.add_argument("--base-tokenizer", required=True, help="base tokenizer.model (Llama-2)")
    p.add_argument("--corpus", nargs="+", default=[], help="Chinese text, one sample a line")
    p.add_argument("--zh-model", default=None, help="existing Chinese SentencePiece model")
    p.add_argument("--vocab-size", type=int, default=20000, help="Chinese model size (BPE)")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="at most this many lines are sampled for training")
    p.add_argument("--eval-file", default=None, help="held-out text for the statistics")
    p.add_argument("--heldout-fraction", type=float, default=0.05,
                   help="without --eval-file: corpus tail held out of training (default 0.05)")
    p.add_argument("--output-dir", required=True, help="tokenizer folder to write")
    p.add_argument("--resize-checkpoint", default=None,
                   help="HF folder or megatron-sat checkpoint to resize")
    p.add_argument("--output-checkpoint", default=None, help="where the resized checkpoint goes")
    p.add_argument("--init-noise-std", type=float, default=0.0,
                   help="std of Gaussian noise added to the mean-initialised rows")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="megatron-sat checkpoints: pad rows to a multiple of this (× TP); "
                        "default: the checkpoint's. HF folders always store the true size")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return p


def _run(args) -> None:
    train = SpmTrainConfig(vocab_size=args.vocab_size, character_coverage=args.character_coverage,
                           input_sentence_size=args.input_sentence_size)
    config = ExtendVocabConfig(
        base_tokenizer=args.base_tokenizer, output_dir=args.output_dir, corpus=tuple(args.corpus),
        zh_model=args.zh_model, eval_file=args.eval_file, heldout_fraction=args.heldout_fraction,
        train=train, resize_checkpoint=args.resize_checkpoint,
        output_checkpoint=args.output_checkpoint, init_noise_std=args.init_noise_std,
        seed=args.seed, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        overwrite=args.overwrite)
    _print_summary(extend_vocab(config))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
