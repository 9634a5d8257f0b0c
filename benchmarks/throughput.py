"""Side-by-side throughput of stock megatron-core layers, SAT layers and the ideal narrow model.

In one process, on the same shapes and inputs, it times a forward + backward step of a
stack of transformer layers for:

* ``dense``     stock megatron-core layers (the local Llama spec);
* ``sat-0``     SAT layers at omission rate 0 (must be the stock path, ≥ 0.99× dense);
* ``sat-ρ``     SAT layers at ρ ∈ ``--rates`` (maxip importance + Plackett–Luce sampling);
* ``ideal-ρ``   a dense stock model physically ``1 − ρ`` as wide: fewer heads (MHA), or the
                same groups with ``k_q`` query heads per group (GQA), and ``k`` channels.

Timing rounds are interleaved (every variant once per round, in a rotating order), so
machine noise hits all variants alike; medians are reported.  The realised fraction is
``(SAT speedup − 1) / (ideal speedup − 1)``.

``--naive`` adds ``naive-ρ`` rows: the same SAT layers with the slices taken by autograd
through ``index_select`` (the unoptimised ops), for before/after comparisons.

Outputs: a table on stdout, and ``<preset>-<device>-<dtype>.json``, ``.md`` and ``.png``
(speedup vs omission rate, SAT vs ideal; needs matplotlib) in ``--output-dir``.
``--end-to-end`` instead times whole ``pretrain_llama.py`` training steps.

Examples::

    python benchmarks/throughput.py --preset tiny
    python benchmarks/throughput.py --preset llama2-7b --device cuda --dtype bf16 \\
        --micro-batch 2 --seq-length 4096 --layers 4
    python benchmarks/throughput.py --preset tiny --end-to-end
    python benchmarks/throughput.py --end-to-end --e2e-model cpu-layers --rates 0.5 \\
        --micro-batch 2 --seq-length 512 --iters 6 --warmup 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
import logging  # noqa: E402

# megatron-core warns "Unknown MLP type" for every SAT layer it builds; not news here.
logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)

import torch  # noqa: E402

from bench_e2e import markdown_e2e, run_end_to_end  # noqa: E402
from bench_report import chart, device_name, markdown  # noqa: E402
from bench_shapes import (BENCH_PRESETS, BenchShape, build_block,  # noqa: E402,F401
                          layer_flops_per_token, narrowed, sat_config)


@dataclass
class Variant:
    name: str
    kind: str  # dense | sat | naive | ideal
    rho: float
    block: torch.nn.Module
    shape: BenchShape
    times: list = dataclasses.field(default_factory=list)
    cpu_times: list = dataclasses.field(default_factory=list)
    select_times: list = dataclasses.field(default_factory=list)
    memory_bytes: Optional[int] = None


# ----------------------------------------------------------------------------- timing
class naive_ops:
    """Swap the sliced ops for autograd through ``index_select`` (the pre-#5 path)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        from megatron_sat import ops

        if self.on:
            self.saved = ops.linear_rows, ops.linear_cols
            ops.linear_rows, ops.linear_cols = ops.linear_rows_reference, ops.linear_cols_reference

    def __exit__(self, *exc):
        from megatron_sat import ops

        if self.on:
            ops.linear_rows, ops.linear_cols = self.saved


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """Holds the shared inputs and runs one fwd+bwd step of a variant."""

    def __init__(self, shape: BenchShape, device: torch.device, dtype: torch.dtype, seed: int):
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        g = torch.Generator().manual_seed(seed)
        s, b, h = shape.seq_length, shape.micro_batch, shape.hidden
        self.device = device
        self.x = torch.randn(s, b, h, generator=g).to(device=device, dtype=dtype)
        self.dy = torch.randn(s, b, h, generator=g).to(device=device, dtype=dtype)
        rope = RotaryEmbedding(kv_channels=shape.head_dim, rotary_percent=1.0,
                               rotary_base=10000)
        self.rope = rope(s).to(device)  # [s, 1, 1, d]
        self.iteration = 0

    def step(self, v: Variant) -> tuple[float, float]:
        from megatron_sat.control import set_sat_iteration

        for p in v.block.parameters():
            p.grad = None
        x = self.x.detach().requires_grad_(True)
        if v.kind in ("sat", "naive"):
            set_sat_iteration(v.block, self.iteration)  # a fresh draw every step
        with naive_ops(v.kind == "naive"):
            sync(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            y = v.block(x, None, rotary_pos_emb=self.rope)
            y.backward(self.dy)
            sync(self.device)
            return time.perf_counter() - t0, time.process_time() - c0

    def selection_time(self, v: Variant) -> float:
        """Seconds spent choosing heads and channels in every layer (no compute)."""
        from megatron_sat.control import _sat_modules, set_sat_iteration

        set_sat_iteration(v.block, self.iteration)
        mods = list(_sat_modules(v.block))
        for m in mods:  # step() already chose this iteration's units: time a fresh choice
            m.sat_state.clear_selection()
        x = self.x
        sync(self.device)
        t0 = time.perf_counter()
        for m in mods:
            m.sat_select(x)
        sync(self.device)
        return time.perf_counter() - t0

    def memory(self, v: Variant) -> tuple[int, str]:
        """Peak memory of one step: CUDA max allocated, or bytes autograd saves on CPU."""
        for p in v.block.parameters():
            p.grad = None
        x = self.x.detach().requires_grad_(True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            v.block(x, None, rotary_pos_emb=self.rope).backward(self.dy)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base, "cuda-max-allocated-delta"
        seen, total = set(), 0

        def pack(t):
            nonlocal total
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in seen and not isinstance(t, torch.nn.Parameter):
                seen.add(key)
                total += st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = v.block(x, None, rotary_pos_emb=self.rope)
        params = {p.untyped_storage().data_ptr() for p in v.block.parameters()}
        y.backward(self.dy)
        grads = sum(p.grad.untyped_storage().nbytes() for p in v.block.parameters()
                    if p.grad is not None)
        del params
        return total + grads, "cpu-saved-activations+grads"


def median_ms(xs) -> float:
    return 1000.0 * statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- main
def run_layers(args) -> dict:
    from megatron_sat.parallel import initialize_parallel

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    base = BENCH_PRESETS[args.preset]
    shape = dataclasses.replace(
        base,
        layers=args.layers or base.layers,
        micro_batch=args.micro_batch or base.micro_batch,
        seq_length=args.seq_length or base.seq_length,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    initialize_parallel(1, seed=args.seed)
    torch.manual_seed(args.seed)
    from megatron_sat.core_attention import resolve_attention_backend

    args.attention = resolve_attention_backend(
        "unfused" if args.attention == "stock" else args.attention, device.type, dtype)

    variants: list[Variant] = []
    dense = build_block(shape, dtype, device, None, args.attention)
    variants.append(Variant("dense", "dense", 0.0, dense, shape))
    state = dense.state_dict()
    for rho in [0.0] + list(args.rates):
        blk = build_block(shape, dtype, device, sat_config(rho), args.attention)
        blk.load_state_dict(state)  # same weights as the dense stack
        variants.append(Variant(f"sat-{rho:g}", "sat", rho, blk, shape))
        if args.naive and rho > 0:
            variants.append(Variant(f"naive-{rho:g}", "naive", rho, blk, shape))
    for rho in args.rates:
        nshape = narrowed(shape, rho, rho)
        variants.append(Variant(f"ideal-{rho:g}", "ideal", rho,
                                build_block(nshape, dtype, device, None, args.attention), nshape))

    runner = Runner(shape, device, dtype, args.seed)
    n = len(variants)
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    for it in range(args.warmup + args.iters):
        runner.iteration = it
        order = [variants[(it + j) % n] for j in range(n)]  # rotate who goes first
        for v in order:
            t, c = runner.step(v)
            if it >= args.warmup:
                v.times.append(t)
                v.cpu_times.append(c)
        for v in variants:
            if v.kind == "sat" and v.rho > 0 and it >= args.warmup:
                v.select_times.append(runner.selection_time(v))
        if args.verbose:
            print(f"round {it + 1}/{args.warmup + args.iters} "
                  f"({time.perf_counter() - t_start:.1f}s)", file=sys.stderr)
    mem_kind = None
    for v in variants:
        with naive_ops(v.kind == "naive"):
            v.memory_bytes, mem_kind = runner.memory(v)

    tokens = shape.micro_batch * shape.seq_length
    t_dense = median_ms(variants[0].times)
    c_dense = median_ms(variants[0].cpu_times)
    ideal_cpu = {v.rho: median_ms(v.cpu_times) for v in variants if v.kind == "ideal"}
    ideal_ms = {v.rho: median_ms(v.times) for v in variants if v.kind == "ideal"}
    rows = []
    for v in variants:
        ms = median_ms(v.times)
        speed = t_dense / ms
        ideal_speed = t_dense / ideal_ms[v.rho] if v.rho in ideal_ms else None
        realised = None
        sparse = v.kind in ("sat", "naive") and v.rho > 0
        if sparse and ideal_speed is not None and ideal_speed != 1:
            realised = (speed - 1.0) / (ideal_speed - 1.0)
        q = shape.heads // shape.groups
        kq = kkv = km = 1.0  # dense and ideal: v.shape is already the executed width
        if sparse:
            nshape = narrowed(shape, v.rho, v.rho)
            kq = nshape.heads / shape.heads
            kkv = nshape.groups / shape.groups
            km = nshape.ffn / shape.ffn
        fl = layer_flops_per_token(v.shape, shape.seq_length, kq, kkv, km) * shape.layers * tokens
        # Paired per round: every variant of a round ran back to back, so a ratio within a
        # round cancels load that drifts between rounds; the median of those ratios.
        dense_r = variants[0].times
        paired = statistics.median(d / t for d, t in zip(dense_r, v.times))
        paired_realised = None
        if sparse and v.rho in ideal_ms:
            ideal_r = next(u.times for u in variants if u.kind == "ideal" and u.rho == v.rho)
            paired_realised = statistics.median(
                (d / t - 1.0) / (d / i - 1.0) for d, t, i in zip(dense_r, v.times, ideal_r)
                if d != i)
        rows.append({
            "variant": v.name, "kind": v.kind, "rho": v.rho,
            "paired_speedup": paired,
            "paired_realised_fraction": paired_realised,
            "median_ms": ms,
            "iqr_ms": [1000 * statistics.quantiles(v.times, n=4)[0],
                       1000 * statistics.quantiles(v.times, n=4)[2]] if len(v.times) > 1 else None,
            "tokens_per_s": tokens / (ms / 1000.0),
            "speedup_vs_dense": speed,
            "ideal_speedup": ideal_speed if sparse else None,
            "realised_fraction": realised,
            # CPU only: process CPU time, robust when other jobs share the cores.
            "cpu_time_ms": median_ms(v.cpu_times),
            "cpu_time_speedup": c_dense / median_ms(v.cpu_times),
            "cpu_time_realised_fraction": (
                (c_dense / median_ms(v.cpu_times) - 1) / (c_dense / ideal_cpu[v.rho] - 1)
                if sparse and v.rho in ideal_cpu and ideal_cpu[v.rho] != c_dense else None),
            "selection_ms": median_ms(v.select_times) if v.select_times else None,
            "tflops_executed": fl / (ms / 1000.0) / 1e12,
            "memory_mb": v.memory_bytes / 2**20 if v.memory_bytes is not None else None,
            "q_per_group": q,
        })
    sat0 = next(r for r in rows if r["variant"] == "sat-0")
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "preset": args.preset,
        "shape": dataclasses.asdict(shape),
        "dtype": args.dtype,
        "attention": args.attention,
        "iters": args.iters, "warmup": args.warmup,
        "memory_kind": mem_kind,
        "rate0_ratio": t_dense / sat0["median_ms"],
        "wall_s": time.perf_counter() - t_start,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rows": rows,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(BENCH_PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default 15 CPU, 30 CUDA)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--attention", default="sdpa",
                   choices=["auto", "flash", "sdpa", "unfused", "stock"],
                   help="attention backend of every variant (megatron_sat.core_attention; "
                        "dense and SAT run the same kernel); stock = unfused, megatron-core's "
                        "DotProductAttention")
    p.add_argument("--naive", action="store_true",
                   help="also time SAT through autograd index_select (the unoptimised ops)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU: with 2 OpenMP threads one busy "
                        "core stalls every GEMM and the medians stop meaning anything)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output-dir", default="benchmarks/out")
    p.add_argument("--end-to-end", action="store_true",
                   help="time full pretrain_llama.py training steps instead of layers")
    p.add_argument("--e2e-model", default="tiny",
                   help="a model preset, or cpu-layers / llama2-7b-4l (bench_e2e.E2E_PRESETS)")
    p.add_argument("--e2e-rounds", type=int, default=2,
                   help="end-to-end: rounds, each running every variant once (side by side)")
    p.add_argument("--e2e-extra", nargs=argparse.REMAINDER, default=[],
                   help="extra arguments passed to pretrain_llama.py (must come last)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.threads is None and not args.device.startswith("cuda") and not args.end_to_end:
        args.threads = 1
    if args.iters is None:
        args.iters = 30 if args.device.startswith("cuda") else 15
    return args


def main(argv=None):
    return main_with(parse_args(argv))


def main_with(args):
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.end_to_end:
        res = run_end_to_end(args)
        stem = f"e2e-{args.e2e_model}-{args.device.split(':')[0]}-{args.dtype}"
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
        md = markdown_e2e(res)
        (out / f"{stem}.md").write_text(md + "\n")
        print(md)
        return res
    res = run_layers(args)
    stem = f"{args.preset}-{args.device.split(':')[0]}-{args.dtype}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (out / f"{stem}.md").write_text(md + "\n")
    chart(res, out / f"{stem}.png")
    print(md)
    return res


if __name__ == "__main__":
    main()
