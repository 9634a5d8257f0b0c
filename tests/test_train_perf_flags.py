"""The trainer's performance flags: attention backend, recomputation, sequence
parallelism and the ``--timing-log-level`` split (issue 9).

One real ``pretrain_llama.py`` run (bf16, SAT, full recomputation, eval and checkpoints)
checks that the JSONL time split adds up to the iteration time, that the backend in use
is recorded in the header, the JSONL and ``meta.json``, and that HFU counts the
recomputed forward.  Bad combinations are checked in process (``parse_args``) and once
through the entry point for the one-line form.
"""

import json
import os

import pytest

from megatron_sat.training.arguments import parse_args
from megatron_sat.training.configs import ConfigError
from test_train_common import TINY, make_data, read_metrics, run_trainer


def test_bf16_sat_recompute_run_time_split_and_backend_record(tmp_path):
    data = make_data(str(tmp_path / "data"), n_docs=120)
    metrics = tmp_path / "m.jsonl"
    proc = run_trainer(TINY + [
        "--data-path", data, "--split", "90,10,0", "--global-batch-size", "4",
        "--train-iters", "16", "--lr", "3e-3", "--log-interval", "4", "--eval-interval", "8",
        "--eval-iters", "2", "--save", str(tmp_path / "ckpt"), "--save-interval", "8",
        "--metrics-file", str(metrics), "--bf16", "--sat", "--sat-schedule", "constant",
        "--timing-log-level", "1", "--recompute-granularity", "full",
        "--recompute-method", "uniform", "--recompute-num-layers", "1",
        "--peak-tflops", "1.0"])
    recs = read_metrics(str(metrics))
    run = [r for r in recs if r["kind"] == "run"]
    assert run and run[0]["attention_backend"] == "sdpa"  # auto on CPU
    assert "attention_backend: sdpa" in proc.stdout
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 4
    parts = ("data", "forward", "sat_selection", "backward", "optimizer")
    for r in train:
        split = sum(r[f"time_{k}_ms"] for k in parts)
        assert abs(split - r["ms_per_iter"]) <= 0.05 * r["ms_per_iter"], r
        assert r["time_sat_selection_ms"] > 0
        # HFU counts the recomputed forward: (3 + 1) / 3 of the layers' model FLOPs.
        assert r["hw_tflops_per_gpu"] > r["tflops_per_gpu"] and r["hfu"] > r["mfu"]
    # Eval and checkpoint at iteration 8 show up, outside the iteration times.
    assert train[2]["time_eval_ms"] > 0 and train[2]["time_checkpoint_ms"] > 0
    assert "not in tokens/s" in proc.stdout and "HFU:" in proc.stdout
    # Megatron's timer names (timers.log rows), after Megatron's log line
    assert "forward-compute ...." in proc.stdout and "save-checkpoint ...." in proc.stdout
    assert train[-1]["lm_loss"] < train[0]["lm_loss"]  # bf16 SAT training learns
    with open(tmp_path / "ckpt" / "iter_0000016" / "meta.json") as f:
        meta = json.load(f)
    assert meta["attention_backend"] == "sdpa" and meta["recompute_granularity"] == "full"
    summary = [r for r in recs if r["kind"] == "summary"][0]
    assert summary["time_checkpoint_s_total"] > 0 and summary["attention_backend"] == "sdpa"


def _base(tmp_path):
    return TINY + ["--data-path", str(tmp_path / "d")]


@pytest.mark.parametrize("extra, world, needle", [
    (["--attention-backend", "flash"], 1, "needs a CUDA GPU"),
    (["--use-flash-attn"], 1, "needs a CUDA GPU"),
    (["--use-flash-attn", "--attention-backend", "unfused"], 1, "contradicts"),
    (["--sequence-parallel"], 1, "--sequence-parallel needs --tensor-model-parallel-size"),
    (["--recompute-method", "uniform"], 1, "without --recompute-granularity"),
    (["--recompute-num-layers", "1"], 1, "without --recompute-granularity"),
    (["--recompute-granularity", "full"], 1, "needs --recompute-method"),
    (["--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "3"], 1, "between 1 and --num-layers 2"),
    (["--timing-log-level", "3"], 1, "must be 0, 1 or 2"),
])
def test_bad_performance_flags_are_one_line_errors(tmp_path, extra, world, needle):
    with pytest.raises(ConfigError) as e:
        parse_args(_base(tmp_path) + extra, world_size=world)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_good_performance_flags_parse(tmp_path):
    cfg = parse_args(_base(tmp_path) + ["--tensor-model-parallel-size", "2",
                                        "--sequence-parallel", "--recompute-granularity",
                                        "selective", "--attention-backend", "unfused"],
                     world_size=2)
    assert cfg.perf.sequence_parallel and cfg.perf.model_settings()["sequence_parallel"]
    assert cfg.perf.resolved_backend("cpu", False) == "unfused"


def test_flash_on_cpu_through_the_entry_point_is_one_line(tmp_path):
    data = make_data(str(tmp_path / "data"), n_docs=20)
    proc = run_trainer(TINY + ["--data-path", data, "--use-flash-attn"], check=False)
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("pretrain_llama.py: error:")]
    assert proc.returncode == 2 and len(err) == 1 and "flash" in err[0]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "ckpt")


def test_hardware_flops_count_recomputation_exactly():
    from megatron_sat.model import LlamaShape
    from megatron_sat.training.flops import (KeptFractions, Recompute,
                                             layer_forward_flops_per_token,
                                             recompute_flops_per_token)

    shape = LlamaShape(6, 256, 704, 8, 2, vocab_size=1000)
    kept = KeptFractions(0.5, 1.0, 0.5)
    layer = layer_forward_flops_per_token(shape, 512, kept)
    assert recompute_flops_per_token(shape, 512, kept, Recompute()) == 0
    assert recompute_flops_per_token(shape, 512, kept, Recompute("full", "uniform", 2)) \
        == 6 * layer
    assert recompute_flops_per_token(shape, 512, kept, Recompute("full", "block", 2)) \
        == 2 * layer
    # selective: QKᵀ and AV of the kept query heads, causal half, every layer.
    assert recompute_flops_per_token(shape, 512, kept, Recompute("selective")) \
        == 6 * 4 * 512 * 256 * 0.5 * 0.5
