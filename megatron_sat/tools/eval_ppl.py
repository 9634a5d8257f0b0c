"""Sliding-window perplexity of an HF or megatron-sat checkpoint, per text domain.

Why per domain: continual pre-training on Chinese should lower Chinese perplexity
without wrecking English; one number per domain (Skywork-benchmark style) shows both.
Why bits per character too: perplexity per *token* is not comparable across
tokenizers, so after vocabulary extension compare ``bits/char``.

Each domain's documents are tokenised (BOS prepended unless ``--no-bos``) and
concatenated into one stream.  Windows of ``--seq-length`` tokens advance by
``--stride``; every target token is scored exactly once, with at least
``seq_length - stride`` tokens of context (except in the first window).  BOS targets are
not scored.  With ``--max-tokens`` the character count (for bits/char) includes the
whole last document, so bits/char is then approximate.  A megatron-sat checkpoint is merged to TP=1 and run in this one process;
its vocabulary padding is trimmed from the logits, so HF and megatron-sat forms of one
model give the same perplexity.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_sat.tools.cli import Progress, ToolError, check_output_free, make_parser, run_main
from megatron_sat.tools.text_tokenizer import TEXT_TOKENIZER_TYPES, TextTokenizer, load_tokenizer

SPLIT_MODES = ("line", "paragraph", "file")
FORMATS = ("auto", "hf", "megatron")


@dataclass(frozen=True)
class EvalConfig:
    load: str
    data: Tuple[str, ...]  # "path" or "name=path"; a path is a file or a folder
    tokenizer_model: Optional[str] = None
    tokenizer_type: str = "SentencePieceTokenizer"
    checkpoint_format: str = "auto"
    seq_length: int = 1024
    stride: Optional[int] = None  # default seq_length // 2
    micro_batch_size: int = 2
    split_mode: str = "line"
    bos: bool = True
    max_tokens: Optional[int] = None  # per domain, to bound the cost
    output_json: Optional[str] = None
    overwrite: bool = False
    show_progress: bool = True

    def __post_init__(self):
        problems = []
        if self.seq_length < 2:
            problems.append("--seq-length must be at least 2")
        if not 1 <= self.effective_stride <= self.seq_length:
            problems.append("--stride must be between 1 and --seq-length")
        if self.micro_batch_size < 1:
            problems.append("--micro-batch-size must be at least 1")
        if self.split_mode not in SPLIT_MODES:
            problems.append(f"--split-mode must be one of {SPLIT_MODES}")
        if self.checkpoint_format not in FORMATS:
            problems.append(f"--checkpoint-format must be one of {FORMATS}")
        if not self.data:
            problems.append("--data needs at least one file or folder")
        if problems:
            raise ToolError("; ".join(problems))

    @property
    def effective_stride(self) -> int:
        return self.stride if self.stride is not None else max(1, self.seq_length // 2)


@dataclass
class DomainResult:
    name: str
    files: List[str] = field(default_factory=list)
    documents: int = 0
    characters: int = 0
    tokens: int = 0  # scored target tokens
    nll: float = 0.0  # summed, nats

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_char(self) -> float:
        return self.nll / math.log(2) / self.characters if self.characters else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl": self.ppl, "bits_per_char": self.bits_per_char}


# ---------------------------------------------------------------------------- data
def resolve_domains(entries: Sequence[str]) -> List[Tuple[str, List[Path]]]:
    """``name=path`` or ``path`` → (domain name, files); a folder means its files, sorted."""
    domains = []
    for entry in entries:
        name, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files = [p]
        else:
            raise ToolError(f"--data '{path}' not found; pass existing text files or folders")
        if not files:
            raise ToolError(f"--data folder '{path}' has no files")
        domains.append((name or p.stem, files))
    names = [n for n, _ in domains]
    if len(set(names)) != len(names):
        raise ToolError(f"domain names repeat ({names}); name them with --data NAME=PATH")
    return domains


def read_documents(path: Path, split_mode: str) -> List[str]:
    """Documents of a file: lines, blank-line paragraphs, or the whole file; ``.jsonl``
    files give their records' ``text`` fields."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for line in text.splitlines():
            try:
                value = json.loads(line).get("text") if line.strip() else None
            except (ValueError, AttributeError):
                value = None
            if isinstance(value, str) and value.strip():
                docs.append(value)
        return docs
    if split_mode == "file":
        return [text] if text.strip() else []
    if split_mode == "paragraph":
        return [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    return [line for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------- models
LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids [b, s] -> logits [b, s, vocab]


def _hf_model(path: str) -> Tuple[LogitsFn, int, Callable[[], None]]:
    from transformers import LlamaForCausalLM

    from megatron_sat.tools.hf_llama import check_hf_weights, read_hf_config, shape_from_hf_config

    shape = shape_from_hf_config(read_hf_config(path))
    check_hf_weights(path)
    try:
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except Exception as exc:  # noqa: BLE001 - transformers' errors are multi-frame
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise ToolError(f"transformers cannot load '{path}' ({first}); check the folder") from None
    if torch.cuda.is_available():  # score on the GPU when there is one, like the megatron path
        model = model.cuda()
    dev = next(model.parameters()).device
    return (lambda ids: model(ids.to(dev)).logits), shape.vocab_size, lambda: None


def _megatron_model(path: str, seq_length: int) -> Tuple[LogitsFn, int, Callable[[], None]]:
    import torch.distributed as dist

    from megatron_sat.model import build_gpt_model
    from megatron_sat.parallel import destroy_parallel, initialize_parallel
    from megatron_sat.tools import llama_layout
    from megatron_sat.tools.ckpt_format import load_megatron_checkpoint, load_state_dict_into

    ckpt = load_megatron_checkpoint(path)
    ranks = ckpt.rank_models()
    if ckpt.tp > 1:
        ranks = llama_layout.reshard(ranks, ckpt.shape, 1)
    started_here = not dist.is_initialized()
    initialize_parallel(1)
    model = build_gpt_model(ckpt.shape, tp=1, seq_length=max(seq_length, 2))
    load_state_dict_into(model, {k: v.float() if v.is_floating_point() else v
                                 for k, v in ranks[0].items() if torch.is_tensor(v)})
    model.eval()
    vocab = ckpt.shape.vocab_size

    dev = next(model.parameters()).device  # build_gpt_model puts it on the GPU if any

    def logits(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(dev)
        pos = torch.arange(ids.shape[1], device=dev).unsqueeze(0).expand_as(ids)
        return model(ids, pos, None)[..., :vocab]  # [b, s, padded] -> [b, s, vocab]

    return logits, vocab, (destroy_parallel if started_here else (lambda: None))


def detect_format(config: EvalConfig) -> str:
    """``hf`` or ``megatron`` for ``--load`` (cheap: looks at file names only)."""
    from megatron_sat.tools.ckpt_format import is_megatron_checkpoint
    from megatron_sat.tools.hf_llama import is_hf_checkpoint

    if config.checkpoint_format != "auto":
        return config.checkpoint_format
    if is_megatron_checkpoint(config.load):
        return "megatron"
    if is_hf_checkpoint(config.load):
        return "hf"
    raise ToolError(f"'{config.load}' is neither an HF folder (config.json) nor a "
                    f"megatron-sat checkpoint (latest/meta.json); check --load")


def load_model(config: EvalConfig, fmt: str) -> Tuple[LogitsFn, int, Callable[[], None]]:
    """``(logits_fn, true vocab size, close)`` for the checkpoint in format ``fmt``."""
    if fmt == "hf":
        return _hf_model(config.load)
    return _megatron_model(config.load, config.seq_length)


# ---------------------------------------------------------------------------- scoring
def windows(n: int, seq_length: int, stride: int) -> List[Tuple[int, int, int]]:
    """``(begin, end, first_target)`` per window over ``n`` tokens; targets tile ``1..n-1``."""
    out, prev_end, begin = [], 1, 0
    while prev_end < n:
        begin = min(begin, prev_end - 1)  # the first target's predecessor is in the window
        end = min(begin + seq_length, n)
        out.append((begin, end, prev_end))
        prev_end, begin = end, begin + stride
    return out


@torch.no_grad()
def score_stream(logits_fn: LogitsFn, tokens: torch.Tensor, config: EvalConfig,
                 ignore_id: Optional[int], bar: Progress) -> Tuple[float, int]:
    """Summed NLL (nats) and scored-token count of one token stream."""
    wins = windows(len(tokens), config.seq_length, config.effective_stride)
    nll, count = 0.0, 0
    i = 0
    while i < len(wins):
        length = wins[i][1] - wins[i][0]
        batch = [wins[i]]
        while (len(batch) < config.micro_batch_size and i + len(batch) < len(wins)
               and wins[i + len(batch)][1] - wins[i + len(batch)][0] == length):
            batch.append(wins[i + len(batch)])
        ids = torch.stack([tokens[b:e] for b, e, _ in batch])  # [b, s]
        logp = torch.log_softmax(logits_fn(ids).float(), dim=-1)  # [b, s, v]
        for row, (b, e, first) in enumerate(batch):
            tgt = tokens[first:e].to(logp.device)  # targets at absolute positions first..e-1
            pred = logp[row, first - b - 1: e - b - 1]  # predicted from the previous position
            lp = pred.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            keep = tgt != ignore_id if ignore_id is not None else torch.ones_like(tgt, dtype=torch.bool)
            nll -= float(lp[keep].double().sum())
            count += int(keep.sum())
        i += len(batch)
        bar.update(len(batch))
    return nll, count


def evaluate(config: EvalConfig) -> Dict[str, object]:
    """Perplexity per domain; returns the JSON-able result (also written to output_json)."""
    if config.output_json:
        check_output_free([config.output_json], config.overwrite)
    domains = resolve_domains(config.data)
    tok_path = config.tokenizer_model
    if tok_path is None and (Path(config.load) / "tokenizer.model").is_file():
        tok_path = str(Path(config.load) / "tokenizer.model")
    fmt = detect_format(config)
    tokenizer: TextTokenizer = load_tokenizer(config.tokenizer_type, tok_path)
    logits_fn, vocab, close = load_model(config, fmt)
    try:
        if tokenizer.vocab_size > vocab:
            raise ToolError(f"tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's "
                            f"vocabulary is {vocab}; pass the checkpoint's own tokenizer, or "
                            f"resize it with tools/extend_vocab.py --resize-checkpoint")
        results, start = [], time.monotonic()
        for name, files in domains:
            res = DomainResult(name, [str(f) for f in files])
            stream: List[int] = []
            for f in files:
                for doc in read_documents(f, config.split_mode):
                    ids = tokenizer.encode(doc)
                    stream += ([tokenizer.bos_id] if config.bos else []) + ids
                    res.documents += 1
                    res.characters += len(doc)
                    if config.max_tokens and len(stream) >= config.max_tokens:
                        break
                if config.max_tokens and len(stream) >= config.max_tokens:
                    stream = stream[: config.max_tokens]
                    break
            tokens = torch.tensor(stream, dtype=torch.long)
            n_win = len(windows(len(tokens), config.seq_length, config.effective_stride))
            bar = Progress(f"eval {name}", n_win, "windows", config.show_progress)
            try:
                res.nll, res.tokens = score_stream(
                    logits_fn, tokens, config, tokenizer.bos_id if config.bos else None, bar)
            finally:
                bar.close()
            results.append(res)
    finally:
        close()
    total_tokens = sum(r.tokens for r in results)
    out = {"checkpoint": config.load, "format": fmt, "tokenizer": tok_path,
           "seq_length": config.seq_length, "stride": config.effective_stride,
           "bos": config.bos, "seconds": time.monotonic() - start,
           "domains": {r.name: r.to_dict() for r in results},
           "overall": {"tokens": total_tokens,
                       "ppl": math.exp(sum(r.nll for r in results) / total_tokens)
                       if total_tokens else float("nan")}}
    if config.output_json:
        Path(config.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output_json).write_text(json.dumps(out, indent=2) + "\n")
    return out


def format_table(result: Dict[str, object]) -> str:
    lines = [f"{'domain':<16} {'docs':>7} {'tokens':>10} {'ppl':>10} {'bits/char':>10}"]
    for name, d in result["domains"].items():
        lines.append(f"{name:<16} {d['documents']:>7,} {d['tokens']:>10,} {d['ppl']:>10.3f} "
                     f"{d['bits_per_char']:>10.4f}")
    o = result["overall"]
    lines.append(f"{'all':<16} {'':>7} {o['tokens']:>10,} {o['ppl']:>10.3f}")
    return "\n".join(lines)


EXAMPLES = """\
  # two domains (files or folders), HF checkpoint with its tokenizer.model inside
  python tools/eval_ppl.py --load Llama-2-7b-hf --data zh=data/zh_news.txt en=data/en/ \\
      --seq-length 1024 --stride 512 --output-json ppl.json

  # a megatron-sat checkpoint (any TP; merged to one process), capped at 50k tokens/domain
  python tools/eval_ppl.py --load ckpt/run1 --tokenizer-model tokenizer.model \\
      --data zh_news.txt zh_reviews.txt --max-tokens 50000
"""


def build_parser():
    p = make_parser("eval_ppl.py", "Sliding-window perplexity per text domain.", EXAMPLES)
    p.add_argument("--load", required=True, help="HF folder or megatron-sat checkpoint")
    p.add_argument("--checkpoint-format", choices=FORMATS, default="auto")
    p.add_argument("--data", nargs="+", required=True,
                   help="text/jsonl files or folders, optionally NAME=PATH; one domain each")
    p.add_argument("--tokenizer-type", choices=TEXT_TOKENIZER_TYPES, default="SentencePieceTokenizer")
    p.add_argument("--tokenizer-model", default=None,
                   help="default: tokenizer.model inside --load, if present")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--stride", type=int, default=None, help="default: seq-length / 2")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--split-mode", choices=SPLIT_MODES, default="line",
                   help="documents are lines (default), blank-line paragraphs, or files")
    bos = p.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="bos", action="store_true",
                     help="prepend BOS to each document (default)")
    bos.add_argument("--no-bos", dest="bos", action="store_false")
    p.set_defaults(bos=True)
    p.add_argument("--max-tokens", type=int, default=None, help="cap tokens per domain")
    p.add_argument("--output-json", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-json")
    p.add_argument("--no-progress", action="store_true")
    return p


def _run(args) -> None:
    config = EvalConfig(
        load=args.load, data=tuple(args.data), tokenizer_model=args.tokenizer_model,
        tokenizer_type=args.tokenizer_type, checkpoint_format=args.checkpoint_format,
        seq_length=args.seq_length, stride=args.stride, micro_batch_size=args.micro_batch_size,
        split_mode=args.split_mode, bos=args.bos, max_tokens=args.max_tokens,
        output_json=args.output_json, overwrite=args.overwrite,
        show_progress=not args.no_progress)
    result = evaluate(config)
    print(f"perplexity of {config.load} ({result['format']}), seq-length {config.seq_length}, "
          f"stride {config.effective_stride}, BOS {'on' if config.bos else 'off'}")
    print(format_table(result))
    if config.output_json:
        print(f"wrote {config.output_json}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
