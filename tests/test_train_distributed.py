"""A real multi-process run: TP=1 x DP=2 with ZeRO-1 (torchrun, gloo) on a weighted blend
of two datasets, with a NaN step skipped, every throughput-log field present, TensorBoard
and JSONL written, and the loss falling.

(TP=2 x DP=1 with ZeRO-1 and TP=1 with ZeRO-3 run in test_train_resume.py.)
"""

import glob
import re

from test_train_common import TINY, make_data, read_metrics, run_trainer

# Megatron-LM's fields, in its order, then the SAT extras
LOG_FIELDS = ["iteration", "consumed samples:", "elapsed time per iteration (ms):",
              "throughput per GPU (TFLOP/s/GPU):", "learning rate:", "global batch size:",
              "lm loss:", "loss scale:", "grad norm:", "number of skipped iterations:",
              "number of nan iterations:", "consumed tokens:", "samples per second:",
              "tokens per second:", "tokens per GPU per second:", "TFLOP/s per GPU:",
              "dense-equiv tokens per second:", "MFU:", "omission rate attn/mlp:"]


def test_dp2_zero1_sat_nan_skip_and_log(tmp_path):
    a = make_data(str(tmp_path / "a"), seed=1)
    b = make_data(str(tmp_path / "b"), n_docs=100, seed=2)
    proc = run_trainer(TINY + [
        "--data-path", "0.7", a, "0.3", b, "--split", "90,10,0", "--data-cache-path", tmp_path / "cache",
        "--global-batch-size", "8", "--train-iters", "12", "--lr", "1e-2",
        "--lr-warmup-iters", "2", "--log-interval", "2", "--eval-interval", "6",
        "--eval-iters", "2", "--zero-stage", "1", "--sat", "--sat-decay-start", "4",
        "--inject-nan-iters", "2", "--tensorboard-dir", tmp_path / "tb",
        "--peak-tflops", "1.0"], launcher="torchrun", nproc=2)
    lines = [ln for ln in proc.stdout.splitlines() if re.match(r" \[[-0-9 :]+\] iteration ", ln)]
    assert len(lines) == 6
    for ln in lines:
        positions = [ln.index(field) for field in LOG_FIELDS]
        assert positions == sorted(positions), ln
    # the NaN step is the 3rd (t = 2): counted in the 2nd interval only, as in Megatron
    assert "number of skipped iterations:   1 | number of nan iterations:   1 |" in lines[1]
    assert all("number of skipped iterations:   0 |" in ln for ln in lines[:1] + lines[2:])
    assert "MFU: n/a" not in lines[-1]  # --peak-tflops given
    rows = [r for r in read_metrics(tmp_path / "tb" / "metrics.jsonl") if r["kind"] == "train"]
    assert rows[-1]["skipped_iters"] == 1  # the injected NaN step (t = 2) was skipped
    assert rows[0]["global_batch_size"] == 8 and rows[-1]["consumed_tokens"] == 12 * 8 * 32
    assert rows[0]["kept_mlp"] < 1.0 and rows[-1]["kept_mlp"] == 1.0  # LORS ends dense
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 0.1, [r["lm_loss"] for r in rows]
    valid = [r for r in read_metrics(tmp_path / "tb" / "metrics.jsonl") if r["kind"] == "valid"]
    assert len(valid) == 2 and valid[-1]["lm_loss"] < valid[0]["lm_loss"]
    summary = [r for r in read_metrics(tmp_path / "tb" / "metrics.jsonl")
               if r["kind"] == "summary"][0]
    assert len(summary["phases"]) >= 3 and summary["overall"]["tokens_per_sec"] > 0
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert "throughput summary" in proc.stdout
