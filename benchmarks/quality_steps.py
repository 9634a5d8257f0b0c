"""The quality study's building blocks: cached stages, CLI runs, data split, checks.

Why a separate file: ``quality_study.py`` reads as the pipeline (which CLI runs when, on
what); the mechanics it leans on (subprocess logging, stage caching by content hash, the
train/held-out split, the unigram baseline and the HF round-trip check) live here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import unicodedata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StudyError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- helpers
def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Runner:
    """Runs CLIs as subprocesses, each with its full output kept in a log file."""

    def __init__(self, work: str, verbose: bool):
        self.work, self.verbose = work, verbose
        self.env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = REPO + os.pathsep + self.env.get("PYTHONPATH", "")

    def __call__(self, script: str, args: list, log: str) -> None:
        cmd = [sys.executable, os.path.join(REPO, script)] + [str(a) for a in args]
        t0 = time.time()
        with open(log, "w") as f:
            f.write("$ " + shlex.join(cmd) + "\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=f,
                                  stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            with open(log) as f:
                tail = "".join(f.readlines()[-15:])
            raise StudyError(f"{script} failed (exit {proc.returncode}); full log {log}:\n{tail}")
        if self.verbose:
            print(f"     {script} {' '.join(str(a) for a in args[:1])}... "
                  f"({time.time() - t0:.0f} s)", flush=True)


class Stage:
    """A cached step: ``<work>/<name>-<key>/`` holds its outputs and ``done.json``."""

    def __init__(self, work: str, name: str, spec: dict):
        self.key = _key(spec)
        self.dir = os.path.join(work, f"{name}-{self.key}")
        self.marker = os.path.join(self.dir, "done.json")
        self.name = name

    @property
    def done(self) -> bool:
        return os.path.isfile(self.marker)

    def result(self) -> dict:
        with open(self.marker) as f:
            return json.load(f)

    def start(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)  # a half-finished earlier attempt
        os.makedirs(self.dir)

    def finish(self, result: dict) -> dict:
        tmp = self.marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, self.marker)
        return result

    def path(self, *parts) -> str:
        return os.path.join(self.dir, *parts)


# ---------------------------------------------------------------------------- stages
def split_text(src: str, train_out: str, heldout_out: str, train_lines: int,
               heldout_lines: int, extra: str | None = None) -> dict:
    """Every 20th non-empty line is held out (up to ``heldout_lines``); the rest trains.

    Both sides are NFKC-normalised here, so training and evaluation see the same text.
    """
    train, held = [], []
    with open(src, encoding="utf-8") as f:
        lines = [unicodedata.normalize("NFKC", ln).strip() for ln in f]
    for i, line in enumerate(x for x in lines if x):
        if i % 20 == 0 and len(held) < heldout_lines:
            held.append(line)
        elif not train_lines or len(train) < train_lines:
            train.append(line)
    if extra:
        with open(extra, encoding="utf-8") as f:
            train += [x for x in (unicodedata.normalize("NFKC", ln).strip() for ln in f) if x]
    for path, part in ((train_out, train), (heldout_out, held)):
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(part) + "\n")
    return {"train_lines": len(train), "heldout_lines": len(held)}


def preprocess(run: Runner, text: str, tokenizer: str, prefix: str, log: str) -> str:
    run("tools/preprocess_data.py", ["--input", text, "--input-format", "text",
                                     "--tokenizer-model", tokenizer, "--output-prefix", prefix,
                                     "--append-eod", "--workers", "1", "--no-progress"], log)
    return prefix + "_text_document"


def eval_ppl(run: Runner, load: str, tokenizer: str, domains: dict, preset, out: str,
             log: str) -> dict:
    args = ["--load", load, "--tokenizer-model", tokenizer, "--data"]
    args += [f"{k}={v}" for k, v in domains.items()]
    args += ["--seq-length", preset.seq_length, "--max-tokens", preset.eval_tokens,
             "--micro-batch-size", 8,
             "--output-json", out, "--no-progress"]
    run("tools/eval_ppl.py", args, log)
    with open(out) as f:
        res = json.load(f)
    return {k: {"ppl": d["ppl"], "bits_per_char": d["bits_per_char"], "tokens": d["tokens"]}
            for k, d in res["domains"].items()}


def trainer_flags(preset, tokenizer: str, data: str, iters: int, lr: float, seed: int,
                  work: str) -> list:
    """Flags shared by base and CPT runs: shape, batch, cosine LR with 5% warm-up."""
    return list(preset.model) + [
        "--seq-length", preset.seq_length, "--max-position-embeddings", preset.seq_length,
        "--micro-batch-size", preset.micro_batch_size,
        "--global-batch-size", preset.global_batch_size, "--tokenizer-model", tokenizer,
        "--data-path", data, "--split", "98,2,0", "--data-cache-path",
        os.path.join(work, "data_cache"), "--train-iters", iters, "--lr", lr,
        "--min-lr", lr / 10, "--lr-decay-style", "cosine",
        "--lr-warmup-iters", max(1, iters // 20), "--weight-decay", "0.1",
        "--clip-grad", "1.0", "--zero-stage", "0", "--seed", 1234 + seed,
        *preset.extra_flags]


def hf_trip_check(megatron_ckpt: str, hf_dir: str, vocab: int, seq: int) -> float:
    """Max |logit difference| between the trained checkpoint and its HF conversion,
    computed by megatron-core and by HF transformers on the same random ids."""
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")  # megatron-core's Apex/TE notices
    transformers.utils.logging.disable_progress_bar()
    from transformers import LlamaForCausalLM

    from megatron_sat.model import build_gpt_model
    from megatron_sat.parallel import destroy_parallel, initialize_parallel
    from megatron_sat.tools.ckpt_format import load_megatron_checkpoint, load_state_dict_into

    ids = torch.randint(0, vocab, (2, min(seq, 32)), generator=torch.Generator().manual_seed(0))
    ck = load_megatron_checkpoint(megatron_ckpt)
    initialize_parallel(1)
    try:
        model = build_gpt_model(ck.shape, tp=1, seq_length=seq)
        load_state_dict_into(model, {k: v.float() for k, v in ck.model(0).items()
                                     if torch.is_tensor(v) and v.is_floating_point()})
        model.eval()
        dev = next(model.parameters()).device  # megatron-core builds on the GPU if any
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        with torch.no_grad():
            ours = model(ids.to(dev), pos.to(dev), None)[..., :vocab].cpu()  # [b, s, vocab]
    finally:
        destroy_parallel()
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits[..., :vocab]
    return float((ours.float() - ref.float()).abs().max())


def unigram_ppl(train_prefix: str, heldout: str, tokenizer: str, max_tokens: int,
                vocab: int) -> float:
    """Add-one unigram model from the training tokens, scored on the held-out text exactly
    as eval_ppl scores it (BOS per line, BOS targets not scored, same token cap)."""
    import math

    import numpy as np

    from megatron_sat.tools.eval_ppl import read_documents
    from megatron_sat.tools.text_tokenizer import load_tokenizer
    from pathlib import Path

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(train_prefix)
    counts = np.bincount(np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64),
                         minlength=vocab)[:vocab].astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    tok = load_tokenizer("SentencePieceTokenizer", tokenizer)
    stream = []
    for doc in read_documents(Path(heldout), "line"):
        stream += [tok.bos_id] + tok.encode(doc)
        if len(stream) >= max_tokens:
            break
    targets = [t for t in stream[1:max_tokens] if t != tok.bos_id]
    return math.exp(-float(np.mean(logp[targets])))


def checkpoint_vocab(path: str) -> int:
    from megatron_sat.tools.ckpt_format import load_megatron_checkpoint

    return int(load_megatron_checkpoint(path).shape.vocab_size)


def tokenizer_vocab(tokenizer: str) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=tokenizer).get_piece_size()


def machine() -> dict:
    import platform

    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": dev,
            "threads": os.environ.get("OMP_NUM_THREADS", "all cores"),
            "torch": torch.__version__}
