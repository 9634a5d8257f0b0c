"""The throughput benchmark's bookkeeping: ideal shapes, FLOPs, and a one-round smoke run.

No timing is asserted here (timing never goes in tests).
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import throughput as bench  # noqa: E402


def test_ideal_shape_mha_narrows_heads_and_channels():
    s = bench.BENCH_PRESETS["llama2-7b"]
    n = bench.narrowed(s, 0.5, 0.25)
    assert (n.heads, n.groups, n.head_dim, n.hidden) == (16, 16, 128, 4096)
    assert n.ffn == 8256  # round-half-up of 0.75 * 11008


def test_ideal_shape_gqa_keeps_groups():
    s = bench.BENCH_PRESETS["tinyllama-1.1b"]  # 32 query heads in 4 groups
    n = bench.narrowed(s, 0.75, 0.5)
    assert (n.groups, n.heads) == (4, 8)  # 2 query heads kept per group
    s70 = bench.BENCH_PRESETS["llama2-70b-tp8"]  # 8 query heads, 1 group
    assert bench.narrowed(s70, 0.5, 0.5).heads == 4


def test_flops_agree_with_trainer_accounting():
    from megatron_sat.model import LlamaShape
    from megatron_sat.training import flops

    shape = LlamaShape(1, 2048, 5632, 32, 4)
    b = bench.BenchShape(2048, 5632, 32, 4, 64, 1, 1, 4096)
    ours = bench.layer_flops_per_token(b, 4096)
    theirs = 3 * flops.layer_forward_flops_per_token(shape, 4096)
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_one_round_smoke(tmp_path, megatron_single):
    args = bench.parse_args(["--preset", "tiny", "--layers", "1", "--seq-length", "32",
                             "--micro-batch", "1", "--iters", "2", "--warmup", "0",
                             "--rates", "0.5", "--naive", "--output-dir", str(tmp_path)])
    res = bench.main_with(args)
    names = [r["variant"] for r in res["rows"]]
    assert names == ["dense", "sat-0", "sat-0.5", "naive-0.5", "ideal-0.5"]
    saved = json.loads((tmp_path / "tiny-cpu-fp32.json").read_text())
    assert saved["rows"][2]["realised_fraction"] is not None
    assert (tmp_path / "tiny-cpu-fp32.md").read_text().startswith("**tiny**")
    assert all(r["memory_mb"] > 0 for r in saved["rows"])
    assert saved["memory_kind"] == "cpu-saved-activations+grads"
