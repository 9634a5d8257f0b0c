"""Shared by the HF SFT tests: a tiny real tokenizer and Llama folder, sentiment jsonl."""

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def make_tokenizer(demo_data, folder, vocab_size=2000):
    from megatron_sat.hf.sentiment_task import train_task_tokenizer

    lines = demo_data.zh_reviews.read_text(encoding="utf-8").splitlines()
    return train_task_tokenizer(lines[::20], folder, vocab_size=vocab_size,
                                character_coverage=0.98)


def make_model(folder, tok_dir, heads=4, kv_heads=2, hidden=32, ffn=48, layers=2, seed=0):
    """A tiny random ``LlamaForCausalLM`` saved with its tokenizer (a real HF folder)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def sentiment_files(demo_data, folder, n_train=64, n_eval=16):
    from megatron_sat.hf.sentiment_task import sentiment_splits, write_jsonl

    train, held = sentiment_splits(demo_data.zh_reviews, n_train, n_eval, max_chars=30)
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, folder / "train.jsonl")
    write_jsonl(held, folder / "eval.jsonl")
    return folder / "train.jsonl", folder / "eval.jsonl"


def run_sft(args, nproc=1, timeout=600, env_extra=None):
    """``sft_llama.py`` in fresh processes (torchrun for 2), the way users launch it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           **(env_extra or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT"):  # left by an in-process megatron / accelerate set-up
        env.pop(k, None)
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "sft_llama.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), str(REPO / "sft_llama.py")]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(REPO))


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
