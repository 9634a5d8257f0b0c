"""End-to-end mode of ``throughput.py``: time whole ``pretrain_llama.py`` training steps.

Why subprocesses: the trainer is measured exactly as users launch it (DeepSpeed engine,
optimizer step, data loader), each variant on the same random-token Megatron dataset.

Side by side: ``--e2e-rounds`` rounds, each running every variant once (dense first in
even rounds, last in odd ones), so load that drifts over the run hits all variants; the
per-iteration times of all rounds are pooled and medians quoted, and the paired speedup
is the median of the per-round ratios.  Every run logs ``--timing-log-level 1``, so the
table also shows where the time goes (data, forward, SAT selection, backward, optimizer).

**End-to-end realised fraction**: ``(speedup − 1) / (bound − 1)`` where ``bound`` is the
FLOP-only speedup — dense model FLOPs per iteration ÷ SAT model FLOPs per iteration, as
``training/flops.py`` counts them for the trainer's log (LM head, attention core and the
layers' kept fractions included; optimizer, norms and data loading count 0).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench_report import device_name, fmt

REPO = Path(__file__).resolve().parents[1]
SPLIT = ("data", "forward", "sat_selection", "backward", "optimizer")

# Trainer shapes for end-to-end runs: (base preset, flag overrides).
E2E_PRESETS = {
    # CPU, layer-heavy: the 4 layers' model FLOPs are ~13x the LM head's (vocab 2048).
    "cpu-layers": ("tiny", ["--num-layers", "4", "--hidden-size", "512",
                            "--ffn-hidden-size", "1408", "--num-attention-heads", "8",
                            "--num-query-groups", "8", "--vocab-size", "2048",
                            "--max-position-embeddings", "4096"]),
    # GPU: Llama-2-7B width, 4 layers, the real 32000-token LM head.
    "llama2-7b-4l": ("llama2-7b", ["--num-layers", "4"]),
}


def write_random_dataset(prefix: Path, vocab: int, n_docs: int, doc_len: int, seed: int) -> None:
    """A Megatron ``.bin/.idx`` pair of random tokens (REFERENCE §3 layout), for timing only."""
    import numpy as np
    import struct

    rng = np.random.default_rng(seed)
    dtype, code = (np.uint16, 8) if vocab < 65500 else (np.int32, 4)
    docs = rng.integers(3, vocab, size=(n_docs, doc_len)).astype(dtype)
    docs[:, -1] = 2  # end of document
    prefix.parent.mkdir(parents=True, exist_ok=True)
    docs.tofile(str(prefix) + ".bin")
    sizes = np.full(n_docs, doc_len, dtype=np.int32)
    pointers = np.arange(n_docs, dtype=np.int64) * doc_len * np.dtype(dtype).itemsize
    with open(str(prefix) + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", n_docs))
        f.write(struct.pack("<Q", n_docs + 1))
        f.write(sizes.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(n_docs + 1, dtype=np.int64).tobytes())


def _model_flags(name: str) -> tuple[list, int]:
    """``pretrain_llama.py`` shape flags and the vocabulary size for an e2e model name."""
    from megatron_sat.model import PRESETS

    base, extra = E2E_PRESETS.get(name, (name, []))
    if base not in PRESETS:
        raise SystemExit(f"--e2e-model {name}: not one of {sorted(PRESETS)} or "
                         f"{sorted(E2E_PRESETS)}")
    vocab = PRESETS[base].vocab_size
    if "--vocab-size" in extra:
        vocab = int(extra[extra.index("--vocab-size") + 1])
    return ["--model", base] + extra, vocab


def _run_variant(args, cmd, metrics: Path, name: str) -> list[dict]:
    if metrics.exists():
        metrics.unlink()
    print("+", " ".join(cmd), file=sys.stderr)
    env = dict(os.environ)
    if not args.device.startswith("cuda"):  # same thread policy as the layer benchmark
        env["OMP_NUM_THREADS"] = str(args.threads or 1)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"pretrain_llama.py failed for {name} (rc={proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in recs if r.get("kind") == "train"][args.warmup:]
    if not train:
        raise SystemExit(f"{metrics}: no timed iterations after {args.warmup} warm-up")
    run = next((r for r in recs if r.get("kind") == "run"), {})
    for r in train:
        r["attention_backend"] = run.get("attention_backend")
    return train


def run_end_to_end(args) -> dict:
    """Time full ``pretrain_llama.py`` steps (DeepSpeed optimizer step included).

    Each variant is one subprocess per round on the same random-token data; the
    per-iteration time and split come from the trainer's ``--metrics-file``
    (``--log-interval 1``); the first ``--warmup`` iterations of each run are dropped.
    """
    script = REPO / "pretrain_llama.py"
    if not script.exists():
        raise SystemExit(f"--end-to-end needs {script}, which does not exist in this checkout")
    out_dir = Path(args.output_dir).resolve()
    seq = args.seq_length or 256
    mb = args.micro_batch or 2
    iters = args.warmup + args.iters
    shape_flags, vocab = _model_flags(args.e2e_model)
    prefix = out_dir / "e2e-data" / "random_text_document"
    write_random_dataset(prefix, vocab, n_docs=max(64, 2 * iters * mb), doc_len=seq + 1,
                         seed=args.seed)
    variants = [None] + list(args.rates)
    records = {rho: [] for rho in variants}
    per_round = {rho: [] for rho in variants}
    load = [round(os.getloadavg()[0], 2)]
    for rnd in range(args.e2e_rounds):
        order = variants if rnd % 2 == 0 else list(reversed(variants))
        for rho in order:
            name = "dense" if rho is None else f"sat-{rho:g}"
            cmd = [sys.executable, str(script), *shape_flags,
                   "--train-iters", str(iters), "--log-interval", "1",
                   "--micro-batch-size", str(mb), "--global-batch-size", str(mb),
                   "--seq-length", str(seq), "--data-path", str(prefix), "--split", "100,0,0",
                   "--data-cache-path", str(out_dir / "e2e-cache"), "--eval-iters", "0",
                   "--metrics-file", str(out_dir / f"e2e-{name}.jsonl"), "--seed", str(args.seed),
                   "--timing-log-level", "1", "--attention-backend", args.attention]
            if args.dtype == "bf16":
                cmd.append("--bf16")
            if rho is not None:
                cmd += ["--sat", "--sat-schedule", "constant", "--sat-attn-omission-rate",
                        str(rho), "--sat-mlp-omission-rate", str(rho)]
            cmd += args.e2e_extra
            recs = _run_variant(args, cmd, out_dir / f"e2e-{name}.jsonl", name)
            records[rho] += recs
            per_round[rho].append(statistics.median(r["ms_per_iter"] for r in recs))
        load.append(round(os.getloadavg()[0], 2))
    rows = []
    for rho in variants:
        recs = records[rho]
        med = statistics.median(r["ms_per_iter"] for r in recs)
        # Model FLOPs of one iteration, per GPU, as the trainer counts them (flops.py).
        flops = statistics.median(r["tflops_per_gpu"] * r["ms_per_iter"] for r in recs) * 1e9
        row = {"variant": "dense" if rho is None else f"sat-{rho:g}", "rho": rho or 0.0,
               "median_ms": med, "iterations": len(recs), "flops_per_iter": flops,
               "tokens_per_s": mb * seq / (med / 1e3),
               "attention_backend": recs[0].get("attention_backend"),
               "split_ms": {k: statistics.median(r.get(f"time_{k}_ms", 0.0) for r in recs)
                            for k in SPLIT},
               "median_cpu_ms": statistics.median(r.get("time_cpu_ms", 0.0) for r in recs),
               "mem_max_allocated_mb": max((r.get("mem_max_allocated_mb") or 0) for r in recs)
               or None}
        rows.append(row)
    dense = rows[0]
    for rho, r in zip(variants, rows):
        r["per_round_median_ms"] = per_round[rho]
        r["speedup_vs_dense"] = dense["median_ms"] / r["median_ms"]
        r["paired_speedup"] = statistics.median(
            d / t for d, t in zip(per_round[None], per_round[rho]))
        r["flop_bound"] = dense["flops_per_iter"] / r["flops_per_iter"]
        r["realised_fraction"] = r["paired_realised_fraction"] = None
        r["cpu_time_speedup"] = dense["median_cpu_ms"] / max(r["median_cpu_ms"], 1e-9)
        r["cpu_time_realised_fraction"] = None
        if rho is not None and r["flop_bound"] > 1.0:
            r["cpu_time_realised_fraction"] = (r["cpu_time_speedup"] - 1) / (r["flop_bound"] - 1)
            r["realised_fraction"] = (r["speedup_vs_dense"] - 1) / (r["flop_bound"] - 1)
            r["paired_realised_fraction"] = (r["paired_speedup"] - 1) / (r["flop_bound"] - 1)
    return {"mode": "end-to-end", "date": datetime.date.today().isoformat(),
            "device": device_name(torch.device(args.device)), "model": args.e2e_model,
            "model_flags": shape_flags, "micro_batch": mb, "seq_length": seq,
            "dtype": args.dtype, "rounds": args.e2e_rounds, "iters": args.iters,
            "warmup": args.warmup, "load_average_1min": load,
            "command": " ".join([Path(sys.executable).name] + sys.argv), "rows": rows}


def markdown_e2e(res: dict) -> str:
    rows = res["rows"]
    lines = [f"**end-to-end `pretrain_llama.py {' '.join(res['model_flags'])}`** — "
             f"{res['date']}, {res['device']}, {res['dtype']}, attention "
             f"{rows[0]['attention_backend']}, micro-batch {res['micro_batch']} × "
             f"{res['seq_length']} (one process, optimizer step included); "
             f"{res['rounds']} rounds × {res['iters']} timed iterations per variant after "
             f"{res['warmup']} warm-up; 1-min load average per round boundary "
             f"{res['load_average_1min']}", "",
             f"Command: `{res['command']}`", "",
             "| variant | median ms/iter | tokens/s | speedup | paired speedup | FLOP-only "
             "bound | realised | paired realised | CPU-time speedup | CPU-time realised | data "
             "| forward | SAT selection | backward | optimizer | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["split_ms"]
        lines.append(
            f"| {r['variant']} | {r['median_ms']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['speedup_vs_dense']:.3f}× | {r['paired_speedup']:.3f}× | "
            f"{r['flop_bound']:.3f}× | {fmt(r['realised_fraction'], '.2f')} | "
            f"{fmt(r['paired_realised_fraction'], '.2f')} | {r['cpu_time_speedup']:.3f}× | "
            f"{fmt(r['cpu_time_realised_fraction'], '.2f')} | "
            + " | ".join(f"{s[k]:.1f}" for k in SPLIT)
            + f" | {fmt(r['mem_max_allocated_mb'], '.0f')} |")
    lines += ["", "Per-round median ms/iter: " + "; ".join(
        f"{r['variant']} " + " ".join(f"{x:.0f}" for x in r["per_round_median_ms"])
        for r in rows) + "."]
    lines += ["", "Time split columns: median ms per iteration (`--timing-log-level 1`). "
              "FLOP-only bound: dense ÷ SAT model FLOPs per iteration (training/flops.py). "
              "Realised = (speedup − 1) / (bound − 1). CPU-time: the trainer process's CPU "
              "time per iteration instead of wall time (what other jobs on a shared CPU "
              "do not inflate; meaningless on GPU). Peak MB: CUDA max allocated (GPU only)."]
    return "\n".join(lines)
