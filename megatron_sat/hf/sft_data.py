"""Supervised fine-tuning data: jsonl records → token ids with the loss on the response only.

Why here and not in ``datasets``: the two things SFT users get burnt by are silent — a
prompt that leaks into the loss, and records that vanish.  So every record is either
turned into an example whose prompt labels are ``-100`` (``IGNORE_INDEX``), or skipped
and *counted by reason*, the way ``tools/preprocess_data.py`` reports bad documents;
good records are never dropped.

Record formats (one JSON object per line; blank lines are skipped and counted):

- Alpaca: ``{"instruction": str, "input": str (optional), "output": str}``;
- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  with at least one assistant turn; every assistant turn is trained on.  With a
  tokenizer that has a ``chat_template`` the conversation is rendered by it; otherwise
  by the plain ``role: content`` format below.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

IGNORE_INDEX = -100
# Prompt templates for Alpaca records: (prompt with input, prompt without input).
PROMPT_TEMPLATES = {
    "plain": ("{instruction}\n{input}\n", "{instruction}\n"),
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
        "### Response:\n"),
}
ROLES = ("system", "user", "assistant")

Segment = Tuple[str, bool]  # (text, trained on)


class MalformedRecord(ValueError):
    """A record that cannot become an example; ``str(exc)`` is the reason (a counter key)."""


@dataclass(frozen=True)
class SFTDataConfig:
    """How records become examples.

    Attributes:
        max_seq_length: examples are cut to this many tokens (from the right); an
            example with no response token left is skipped ("response beyond max_seq_length").
        prompt_template: ``plain`` or ``alpaca`` (Alpaca records only).
        packing: concatenate examples into rows of ``max_seq_length`` tokens with
            ``position_ids`` restarting per example, so attention never crosses examples.
    """

    max_seq_length: int = 2048
    prompt_template: str = "plain"
    packing: bool = False

    def __post_init__(self):
        problems = []
        if not isinstance(self.max_seq_length, int) or self.max_seq_length < 2:
            problems.append(f"max_seq_length={self.max_seq_length!r} must be an integer >= 2")
        if self.prompt_template not in PROMPT_TEMPLATES:
            problems.append(f"prompt_template={self.prompt_template!r} is not one of "
                            f"{', '.join(PROMPT_TEMPLATES)}")
        if problems:
            raise ValueError("invalid SFT data settings: " + "; ".join(problems))


@dataclass
class LoadReport:
    """What happened to every line of an input file."""

    path: str
    lines: int = 0
    examples: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common()) or "none"
        return (f"{self.path}: {self.lines} lines -> {self.examples} examples "
                f"({self.truncated} truncated to max_seq_length); skipped: {reasons}")


def _string_field(rec: dict, name: str, required: bool = True) -> str:
    if name not in rec or rec[name] is None:
        if required:
            raise MalformedRecord(f"missing '{name}'")
        return ""
    if not isinstance(rec[name], str):
        raise MalformedRecord(f"'{name}' is not a string")
    return rec[name]


def alpaca_segments(rec: dict, template: str) -> List[Segment]:
    instruction = _string_field(rec, "instruction")
    inp = _string_field(rec, "input", required=False)
    output = _string_field(rec, "output")
    if not instruction.strip():
        raise MalformedRecord("empty 'instruction'")
    if not output.strip():
        raise MalformedRecord("empty 'output'")
    with_input, without = PROMPT_TEMPLATES[template]
    prompt = (with_input if inp.strip() else without).format(instruction=instruction, input=inp)
    return [(prompt, False), (output, True)]


def _check_messages(rec: dict) -> List[dict]:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise MalformedRecord("'messages' is not a non-empty list")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise MalformedRecord("a message is not {role, content: str}")
        if m.get("role") not in ROLES:
            raise MalformedRecord("a message role is not system/user/assistant")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise MalformedRecord("no non-empty assistant turn")
    return msgs


def chat_segments(msgs: Sequence[dict], tokenizer=None) -> List[Segment]:
    """Segments of a conversation; assistant contents are the trained ones."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return _template_segments(msgs, tokenizer)
    segs: List[Segment] = []
    for m in msgs:
        if m["role"] == "assistant":
            segs += [("assistant: ", False), (m["content"], True), ("\n", False)]
        else:
            segs.append((f"{m['role']}: {m['content']}\n", False))
    return segs


def _template_segments(msgs: Sequence[dict], tokenizer) -> List[Segment]:
    """Split the chat-template rendering at assistant turns by rendering prefixes."""
    def render(part, gen):
        return tokenizer.apply_chat_template(list(part), tokenize=False,
                                             add_generation_prompt=gen)

    segs: List[Segment] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt, full = render(msgs[:i], True), render(msgs[:i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise MalformedRecord("chat template is not prefix-stable for this conversation")
        segs += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segs


def record_segments(line: str, template: str, tokenizer=None) -> List[Segment]:
    """One jsonl line → segments, or :class:`MalformedRecord` naming the reason."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MalformedRecord("invalid JSON") from None
    if not isinstance(rec, dict):
        raise MalformedRecord("not a JSON object")
    if "messages" in rec:
        return chat_segments(_check_messages(rec), tokenizer)
    if "instruction" in rec or "output" in rec:
        return alpaca_segments(rec, template)
    raise MalformedRecord("neither Alpaca (instruction/output) nor chat (messages)")


def tokenize_segments(segs: Sequence[Segment], tokenizer, max_len: int,
                      add_eos: bool = True) -> Tuple[List[int], List[int], bool]:
    """``(input_ids, labels, truncated)``; prompt labels are ``IGNORE_INDEX``.

    BOS (when the tokenizer has one and a chat template did not already render it)
    starts the example; EOS ends each trained segment so the model learns to stop.
    """
    ids: List[int] = []
    labels: List[int] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and not getattr(tokenizer, "chat_template", None):
        ids.append(bos)
        labels.append(IGNORE_INDEX)
    eos = getattr(tokenizer, "eos_token_id", None)
    for text, trained in segs:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if trained and add_eos and eos is not None:
            piece = piece + [eos]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    truncated = len(ids) > max_len
    return ids[:max_len], labels[:max_len], truncated


def load_sft_jsonl(path, tokenizer, cfg: SFTDataConfig, log=print
                   ) -> Tuple[List[Dict[str, List[int]]], LoadReport]:
    """Read a jsonl file into examples ``{input_ids, labels}``; malformed lines are counted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {path} does not exist; give a .jsonl file "
                                f"with Alpaca (instruction/input/output) or chat (messages) records")
    report = LoadReport(str(path))
    examples = []
    with open(path, "rb") as f:
        for raw in f:
            report.lines += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                report.skipped["not UTF-8"] += 1
                continue
            if not line.strip():
                report.skipped["blank line"] += 1
                continue
            try:
                segs = record_segments(line, cfg.prompt_template, tokenizer)
            except MalformedRecord as exc:
                report.skipped[str(exc)] += 1
                continue
            ids, labels, truncated = tokenize_segments(segs, tokenizer, cfg.max_seq_length)
            if all(l == IGNORE_INDEX for l in labels):
                report.skipped["response beyond max_seq_length"] += 1
                continue
            report.truncated += truncated
            examples.append({"input_ids": ids, "labels": labels})
    report.examples = len(examples)
    if log is not None:
        log(report.summary())
    return examples, report


def pack_examples(examples: Iterable[Dict[str, List[int]]], max_len: int
                  ) -> List[Dict[str, List[int]]]:
    """Greedy first-fit-in-order packing into rows of at most ``max_len`` tokens.

    Each row carries ``position_ids`` that restart at 0 for every example: transformers
    builds a block-diagonal causal mask from them (no attention across examples), and
    the first label of every example is a prompt token (``-100``), so no loss crosses a
    boundary either.  Examples are never split.
    """
    rows, cur = [], {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_len:
            rows.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += ex["labels"]
        cur["position_ids"] += list(range(n))
    if cur["input_ids"]:
        rows.append(cur)
    return rows


class SFTCollator:
    """Right-pads a list of examples into a batch of tensors.

    Unpacked: ``input_ids``, ``attention_mask`` (0 on padding), ``labels`` (``-100`` on
    padding).  Packed (rows have ``position_ids``): no ``attention_mask`` — transformers
    derives the per-example mask from ``position_ids`` — and padding gets its own
    restarting positions so it forms a separate, label-free block.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        self.pad = int(pad_token_id)
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: Sequence[Dict[str, List[int]]]):
        import torch

        n = max(len(r["input_ids"]) for r in rows)
        if self.multiple:
            n = -(-n // self.multiple) * self.multiple
        packed = "position_ids" in rows[0]
        ids = torch.full((len(rows), n), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        batch = {"input_ids": ids, "labels": labels}
        if packed:
            batch["position_ids"] = torch.zeros((len(rows), n), dtype=torch.long)
        else:
            batch["attention_mask"] = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            if packed:
                batch["position_ids"][i, :k] = torch.tensor(r["position_ids"])
                batch["position_ids"][i, k:] = torch.arange(n - k)
            else:
                batch["attention_mask"][i, :k] = 1
        return batch
