"""Resume on another number of GPUs: a DP=2 ZeRO-1 checkpoint resumes at DP=1 and DP=4.

The reference is a DP=2 ZeRO-1 run that never stopped (6 iterations, saving at 3). The
resumed runs load the iteration-3 checkpoint at DP=1 with ZeRO-0 and at DP=4 with ZeRO-3
(other stages too), run iterations 4-6 with the same global batch, and must give the
reference's losses to 1e-6 relative (fp32; only the order of the DP reductions differs).
DeepSpeed's own loader would raise ZeRORuntimeException here; the trainer re-shards the
full optimizer state it stores per TP rank (reshard.py). Dense on purpose: with SAT the
importance scores are averaged over the DP group's data, so another DP size selects
other sub-networks and the curve continues but is not the same one.
"""

import pytest

from test_train_common import TINY, make_data, read_metrics, run_trainer


def _losses(path):
    return {r["iteration"]: r["lm_loss"] for r in read_metrics(path) if r["kind"] == "train"}


def _flags(data: str, tmp_path, iters: int) -> list:
    """The trainer flags both re-sharding tests share (micro-batch 1, global batch 4)."""
    return TINY[:-2] + ["--micro-batch-size", "1", "--data-path", data, "--split", "90,10,0",
                        "--data-cache-path", tmp_path / "cache", "--global-batch-size", "4",
                        "--train-iters", str(iters), "--lr", "5e-3", "--lr-warmup-iters", "1",
                        "--log-interval", "1", "--eval-iters", "0"]


def test_resume_dp2_checkpoint_at_dp1_and_dp4(tmp_path):
    data = make_data(str(tmp_path / "data"))
    common = _flags(data, tmp_path, iters=6)
    run_trainer(common + ["--zero-stage", "1", "--save", tmp_path / "ckpt", "--save-interval", "3",
                          "--metrics-file", tmp_path / "dp2.jsonl"], launcher="torchrun", nproc=2)
    ref = _losses(tmp_path / "dp2.jsonl")
    # keep only the iteration-3 checkpoint, as a run that stopped there would have left
    (tmp_path / "ckpt" / "latest").write_text("iter_0000003\n")
    for nproc, zero in ((1, 0), (4, 3)):
        out = tmp_path / f"dp{nproc}.jsonl"
        proc = run_trainer(common + ["--zero-stage", zero, "--load", tmp_path / "ckpt",
                                     "--metrics-file", out],
                           launcher="torchrun" if nproc > 1 else "python", nproc=nproc)
        assert f"optimizer re-sharded from DP=2 ZeRO-1 to DP={nproc} ZeRO-{zero}" in proc.stdout
        got = _losses(out)
        assert sorted(got) == [4, 5, 6]
        for it in (4, 5, 6):
            assert got[it] == pytest.approx(ref[it], rel=1e-6, abs=0), (nproc, it, got, ref)
    # control: without the optimizer state the curve differs (the test can fail)
    proc = run_trainer(common + ["--zero-stage", "1", "--load", tmp_path / "ckpt",
                                 "--no-load-optim", "--metrics-file", tmp_path / "noopt.jsonl"],
                       launcher="torchrun", nproc=2)
    assert "--no-load-optim: optimizer not loaded" in proc.stdout
    noopt = _losses(tmp_path / "noopt.jsonl")
    assert sorted(noopt) == [4, 5, 6]  # Megatron's meaning: iteration and data kept
    assert noopt[4] == pytest.approx(ref[4], rel=1e-6)  # same weights, same batch
    assert abs(noopt[5] - ref[5]) > 1e-4 * abs(ref[5])  # fresh Adam moments change step 4


def test_resume_dp2_zero0_checkpoint_at_dp1_zero2(tmp_path):
    """ZeRO-0 keeps the full optimizer state in DeepSpeed's model-state file, which is
    re-sharded from there (no second copy is stored; ckpt_format.py)."""
    data = make_data(str(tmp_path / "data"))
    common = _flags(data, tmp_path, iters=5)
    run_trainer(common + ["--zero-stage", "0", "--save", tmp_path / "ckpt", "--save-interval", "3",
                          "--metrics-file", tmp_path / "ref.jsonl"], launcher="torchrun", nproc=2)
    ref = _losses(tmp_path / "ref.jsonl")
    (tmp_path / "ckpt" / "latest").write_text("iter_0000003\n")
    assert not (tmp_path / "ckpt" / "iter_0000003" / "optim").exists()
    proc = run_trainer(common + ["--zero-stage", "2", "--load", tmp_path / "ckpt",
                                 "--metrics-file", tmp_path / "dp1.jsonl"])
    assert "optimizer re-sharded from DP=2 ZeRO-0 to DP=1 ZeRO-2" in proc.stdout
    got = _losses(tmp_path / "dp1.jsonl")
    assert sorted(got) == [4, 5]
    for it in (4, 5):
        assert got[it] == pytest.approx(ref[it], rel=1e-6, abs=0), (it, got, ref)
