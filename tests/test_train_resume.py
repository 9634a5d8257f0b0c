"""Exact resume: N iterations in one go == N/2, save, fresh process, --load, N/2 more.

fp32 on CPU, SAT with temperature sampling on and a LORS rate change inside the second
half, so the test covers weights, Adam state, data position, the SAT schedule and the
per-iteration selection seeds. Per-iteration losses must be identical, not close.
Global batch 4 = micro-batch 2 x 2 accumulation steps (DP = 1 in both cases), so the
resumed run also rebuilds the one-selection-per-iteration cache shared by both
micro-batches (SAT_SPEC §3 rev 2).
"""

import os

import pytest

from test_train_common import TINY, make_data, read_metrics, run_trainer

ITERS = 8
SAT = ["--sat", "--sat-metric", "maxip", "--sat-selection", "sampling",
       "--sat-schedule", "ladder", "--sat-decay-start", "4", "--sat-ladder-rungs", "2"]


def _losses(metrics_file):
    return {r["iteration"]: r["lm_loss"] for r in read_metrics(metrics_file)
            if r["kind"] == "train"}


@pytest.mark.parametrize("tp,zero", [(1, 3), (2, 1)])
def test_exact_resume(tmp_path, tp, zero):
    data = make_data(str(tmp_path / "data"))
    common = TINY + SAT + ["--data-path", data, "--split", "90,10,0",
                           "--data-cache-path", tmp_path / "cache",
                           "--global-batch-size", "4", "--train-iters", ITERS,
                           "--lr", "5e-3", "--lr-warmup-iters", "2", "--log-interval", "1",
                           "--eval-iters", "0", "--tensor-model-parallel-size", tp,
                           "--zero-stage", zero]
    launch = dict(launcher="torchrun" if tp > 1 else "python", nproc=tp)
    micro = int(TINY[TINY.index("--micro-batch-size") + 1])
    assert 4 // micro == 2  # world = TP, so DP = 1: 2 accumulation steps per iteration
    run_trainer(common + ["--metrics-file", tmp_path / "full.jsonl"], **launch)
    run_trainer(common + ["--save", tmp_path / "ckpt", "--exit-interval", ITERS // 2,
                          "--metrics-file", tmp_path / "a.jsonl"], **launch)
    assert open(tmp_path / "ckpt" / "latest").read().strip() == "iter_0000004"
    proc = run_trainer(common + ["--load", tmp_path / "ckpt",
                                 "--metrics-file", tmp_path / "b.jsonl"], **launch)
    assert "resumed from" in proc.stdout
    full, first, second = (_losses(tmp_path / f) for f in ("full.jsonl", "a.jsonl", "b.jsonl"))
    assert sorted(first) == [1, 2, 3, 4] and sorted(second) == [5, 6, 7, 8]
    for it in range(1, ITERS + 1):
        assert (first if it <= 4 else second)[it] == full[it], (it, full, first, second)
    # the LORS rate really changes inside the resumed half (0.25 at t=4, 0 from t=5)
    rates = {r["iteration"]: r["attn_omission_rate"] for r in read_metrics(tmp_path / "b.jsonl")
             if r["kind"] == "train"}
    assert rates[5] == 0.25 and rates[6] == 0.0
    if tp == 1:  # weights-only start from the saved checkpoint (converter-format weights)
        proc = run_trainer(common + ["--load", tmp_path / "ckpt", "--finetune",
                                     "--metrics-file", tmp_path / "ft.jsonl"], **launch)
        assert "loaded weights from" in proc.stdout
        ft = _losses(tmp_path / "ft.jsonl")
        assert sorted(ft) == list(range(1, ITERS + 1))  # restarts at iteration 0
        assert ft[1] < full[1] - 0.5  # starts from trained weights, not from scratch
