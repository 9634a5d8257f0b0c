"""End-to-end mode of ``throughput.py``: time whole ``pretrain_llama.py`` training steps.

Why subprocesses: the trainer is measured exactly as users launch it (DeepSpeed engine,
optimizer step, data loader), each variant on the same random-token Megatron dataset.
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

from bench_report import device_name

REPO = Path(__file__).resolve().parents[1]


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


def run_end_to_end(args) -> dict:
    """Time full ``pretrain_llama.py`` steps (DeepSpeed optimizer step included).

    Each variant is one subprocess on the same random-token data; the per-iteration
    time comes from the trainer's ``--metrics-file`` (``kind == "train"`` records,
    ``--log-interval 1``); the first ``--warmup`` iterations are dropped.
    """
    script = REPO / "pretrain_llama.py"
    if not script.exists():
        raise SystemExit(f"--end-to-end needs {script}, which does not exist in this checkout")
    from megatron_sat.model import PRESETS

    out_dir = Path(args.output_dir).resolve()
    seq = args.seq_length or 256
    mb = args.micro_batch or 2
    iters = args.warmup + args.iters
    shape = PRESETS[args.e2e_model]
    prefix = out_dir / "e2e-data" / "random_text_document"
    write_random_dataset(prefix, shape.vocab_size, n_docs=max(64, 2 * iters * mb),
                         doc_len=seq + 1, seed=args.seed)
    rows = []
    for rho in [None] + list(args.rates):
        name = "dense" if rho is None else f"sat-{rho:g}"
        metrics = out_dir / f"e2e-{name}.jsonl"
        if metrics.exists():
            metrics.unlink()
        cmd = [sys.executable, str(script), "--model", args.e2e_model,
               "--train-iters", str(iters), "--log-interval", "1",
               "--micro-batch-size", str(mb), "--global-batch-size", str(mb),
               "--seq-length", str(seq), "--data-path", str(prefix), "--split", "100,0,0",
               "--data-cache-path", str(out_dir / "e2e-cache"), "--eval-iters", "0",
               "--metrics-file", str(metrics), "--seed", str(args.seed)]
        if args.dtype == "bf16":
            cmd.append("--bf16")
        if rho is not None:
            cmd += ["--sat", "--sat-schedule", "constant", "--sat-attn-omission-rate", str(rho),
                    "--sat-mlp-omission-rate", str(rho)]
        cmd += args.e2e_extra
        print("+", " ".join(cmd), file=sys.stderr)
        env = dict(os.environ)
        if not args.device.startswith("cuda"):  # same thread policy as the layer benchmark
            env["OMP_NUM_THREADS"] = str(args.threads or 1)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"pretrain_llama.py failed for {name} (rc={proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        ms = [r["ms_per_iter"] for r in recs if r.get("kind") == "train"][args.warmup:]
        if not ms:
            raise SystemExit(f"{metrics}: no timed iterations after {args.warmup} warm-up")
        med = statistics.median(ms)
        rows.append({"variant": name, "rho": rho or 0.0, "median_ms": med,
                     "iterations": len(ms), "tokens_per_s": mb * seq / (med / 1e3)})
    for r in rows:
        r["speedup_vs_dense"] = rows[0]["median_ms"] / r["median_ms"]
    return {"mode": "end-to-end", "date": datetime.date.today().isoformat(),
            "device": device_name(torch.device(args.device)), "model": args.e2e_model,
            "micro_batch": mb, "seq_length": seq, "dtype": args.dtype,
            "command": " ".join([Path(sys.executable).name] + sys.argv), "rows": rows}


def markdown_e2e(res: dict) -> str:
    lines = [f"**end-to-end `pretrain_llama.py --model {res['model']}`** — {res['date']}, "
             f"{res['device']}, {res['dtype']}, micro-batch {res['micro_batch']} × "
             f"{res['seq_length']} (one process, optimizer step included)", "",
             f"Command: `{res['command']}`", "",
             "| variant | median ms/iter | tokens/s | speedup |", "|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['variant']} | {r['median_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['speedup_vs_dense']:.3f}× |")
    return "\n".join(lines)
