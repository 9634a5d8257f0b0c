"""Micro-benchmark of SAT's sliced linear ops: optimised autograd Functions vs index_select.

Times forward + backward of ``linear_rows`` (fused QKV / gate+up) and ``linear_cols``
(output projection / down) at one omission rate, interleaved, medians, next to the
dense ``F.linear`` of the full and of the physically narrower weight.  Isolates the
gather/scatter overhead that the layer benchmark only sees inside a whole step.

    python benchmarks/ops_micro.py --preset tiny --rho 0.5
    python benchmarks/ops_micro.py --preset llama2-7b --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_sat import ops  # noqa: E402
from megatron_sat.selection import num_kept  # noqa: E402
from throughput import BENCH_PRESETS, sync  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(BENCH_PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"])
    p.add_argument("--rho", type=float, default=0.5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    s = BENCH_PRESETS[args.preset]
    n = s.micro_batch * s.seq_length
    f_k = num_kept(s.ffn, args.rho)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, s.hidden, generator=g).to(dev, dtype)
    w1 = torch.randn(2 * s.ffn, s.hidden, generator=g).to(dev, dtype).requires_grad_(True)
    w2 = torch.randn(s.hidden, s.ffn, generator=g).to(dev, dtype).requires_grad_(True)
    kept = torch.sort(torch.randperm(s.ffn, generator=g)[:f_k]).values.to(dev)
    rows = torch.cat([kept, kept + s.ffn])
    w1n = torch.randn(2 * f_k, s.hidden, generator=g).to(dev, dtype).requires_grad_(True)
    w2n = torch.randn(s.hidden, f_k, generator=g).to(dev, dtype).requires_grad_(True)
    dy1 = torch.randn(n, 2 * f_k, generator=g).to(dev, dtype)
    dy2 = torch.randn(n, s.hidden, generator=g).to(dev, dtype)
    xk = torch.randn(n, f_k, generator=g).to(dev, dtype).requires_grad_(True)
    xi = x.clone().requires_grad_(True)

    def mlp_like(rows_fn, cols_fn):
        def run():
            w1.grad = w2.grad = xi.grad = xk.grad = None
            rows_fn(xi, w1, rows).backward(dy1)
            cols_fn(xk, w2, kept).backward(dy2)
        return run

    def narrow():
        w1n.grad = w2n.grad = xi.grad = xk.grad = None
        F.linear(xi, w1n).backward(dy1)
        F.linear(xk, w2n).backward(dy2)

    cases = {
        "optimised (autograd.Function, gather layout)": mlp_like(ops.linear_rows, ops.linear_cols),
        "naive (autograd through index_select)": mlp_like(ops.linear_rows_reference,
                                                          ops.linear_cols_reference),
        "ideal (dense F.linear on narrow weights)": narrow,
    }
    times = {k: [] for k in cases}
    for it in range(args.iters + 3):
        for name, fn in cases.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            if it >= 3:
                times[name].append(time.perf_counter() - t0)
    print(f"{args.preset} MLP-shaped ops, rho={args.rho}, {n} tokens, {dtype}, {dev}; "
          f"median of {args.iters} (fwd+bwd of fc1 rows + fc2 cols)")
    ideal = statistics.median(times["ideal (dense F.linear on narrow weights)"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:45s} {1e3 * m:9.2f} ms   overhead vs ideal {1e3 * (m - ideal):+8.2f} ms")


if __name__ == "__main__":
    main()
