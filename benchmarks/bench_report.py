"""Reporting for ``throughput.py``: device names, the markdown table and the PNG chart.

Why separate: the measurement code stays readable, and the tables in RESULTS.md are
produced by exactly one formatter.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{model}, {os.cpu_count()} cores"


def fmt(x, spec):
    return "–" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    s = res["shape"]
    cpu = not res["device_type"] == "cuda"
    lines = [
        f"**{res['preset']}** — {res['date']}, {res['device']}, torch {res['torch']}, "
        f"{res['threads']} threads, {res['dtype']}, attention={res['attention']}",
        "",
        f"Shape per layer: hidden {s['hidden']}, ffn {s['ffn']}, {s['heads']} heads / "
        f"{s['groups']} groups × {s['head_dim']}; {s['layers']} layers, micro-batch "
        f"{s['micro_batch']} × {s['seq_length']} tokens; {res['iters']} timed rounds after "
        f"{res['warmup']} warm-up, interleaved.",
        "",
        f"Command: `{res['command']}`",
        "",
        "| variant | ρ | median fwd+bwd ms | tokens/s | speedup | ideal speedup | realised "
        "| paired speedup | paired realised | selection ms | TFLOP/s | memory MB |"
        + (" CPU-time speedup | CPU-time realised |" if cpu else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cpu else ""),
    ]
    for r in res["rows"]:
        line = (
            f"| {r['variant']} | {r['rho']:g} | {r['median_ms']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['speedup_vs_dense']:.3f}× | {fmt(r['ideal_speedup'], '.3f')} | "
            f"{fmt(r['realised_fraction'], '.2f')} | {r['paired_speedup']:.3f}× | "
            f"{fmt(r['paired_realised_fraction'], '.2f')} | {fmt(r['selection_ms'], '.2f')} | "
            f"{r['tflops_executed']:.3f} | {fmt(r['memory_mb'], '.1f')} |")
        if cpu:
            line += (f" {r['cpu_time_speedup']:.3f}× | "
                     f"{fmt(r['cpu_time_realised_fraction'], '.2f')} |")
        lines.append(line)
    lines += ["", f"Memory: {res['memory_kind']}. Speedup: median stock-dense time / median "
                  "variant time; realised = (SAT speedup − 1) / (ideal speedup − 1). "
                  "Paired: the median over rounds of the same ratios taken within each round. "
                  "CPU-time: process CPU time instead of wall time (insensitive to other jobs)."]
    lines += [f"Rate-0 SAT vs stock: {res['rate0_ratio']:.3f}× "
                  f"(dense time / SAT-0 time). Wall time {res['wall_s']:.0f} s; 1-min load "
                  f"average {res['load_average_1min'][0]} before, {res['load_average_1min'][1]} "
                  f"after (the machine has {os.cpu_count()} cores)."]
    return "\n".join(lines)


def chart(res: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG chart (pip install matplotlib)", file=sys.stderr)
        return False
    rows = res["rows"]
    sat = [(0.0, 1.0)] + [(r["rho"], r["speedup_vs_dense"]) for r in rows
                          if r["kind"] == "sat" and r["rho"] > 0]
    ideal = [(0.0, 1.0)] + [(r["rho"], r["speedup_vs_dense"]) for r in rows
                            if r["kind"] == "ideal"]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.plot(*zip(*ideal), "o--", label="ideal (physically narrower dense)")
    ax.plot(*zip(*sat), "s-", label="SAT (maxip + sampling)")
    top = max(r for r, _ in ideal + sat)
    grid = [top * i / 50 for i in range(51)]
    ax.plot(grid, [1 / (1 - r) for r in grid], ":", color="grey", label="1/(1−ρ) (FLOPs only)")
    naive = [(r["rho"], r["speedup_vs_dense"]) for r in rows if r["kind"] == "naive"]
    if naive:
        ax.plot(*zip(*([(0.0, 1.0)] + naive)), "x:", label="SAT, naive index_select ops")
    ax.set_xlabel("omission rate ρ")
    ax.set_ylabel("fwd+bwd speedup vs stock dense")
    ax.set_title(f"{res['preset']} — {res['device'][:40]}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
