"""User mistakes end in one line naming the problem and the fix; faults end cleanly.

Bad input is checked before any heavy work, so each case costs one process start-up.
``WORLD_SIZE`` is set in the environment to play a multi-process launch: validation
happens before any process group is formed.
"""

import json
import os
import signal
import subprocess
import sys

import torch

from test_train_common import REPO, TINY, make_data, read_metrics, run_trainer


def _one_line_error(proc, needle):
    assert proc.returncode != 0
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("pretrain_llama.py: error:")]
    assert len(err) == 1 and needle in err[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    return err[0]


# what torchrun exports for rank 0 of 2 (parsing fails before any rendezvous)
TORCH_WORLD_2 = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def test_bad_input_one_line_errors(tmp_path):
    data = make_data(str(tmp_path / "data"), n_docs=40)
    ok = TINY + ["--data-path", data, "--split", "90,10,0", "--train-iters", "2"]
    cases = [
        (["--data-path", str(tmp_path / "missing")], {}, "missing.bin and"),
        (["--num-attention-heads", "3", "--hidden-size", "48", "--num-query-groups", "3",
          "--tensor-model-parallel-size", "2"], TORCH_WORLD_2, "does not divide"),
        (["--global-batch-size", "5"], TORCH_WORLD_2, "not divisible by"),
    ]
    for extra, env, needle in cases:
        proc = run_trainer(ok + extra, check=False, env_extra=env)
        line = _one_line_error(proc, needle)
        assert "--" in line  # names the flag to change

    # a converter-format checkpoint of another shape (4 layers instead of 2)
    from megatron_sat.model import LlamaShape
    from megatron_sat.tools.ckpt_format import save_megatron_checkpoint

    other = LlamaShape(num_layers=4, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4,
                       num_query_groups=4, vocab_size=512, make_vocab_size_divisible_by=64,
                       max_position_embeddings=128)
    save_megatron_checkpoint(tmp_path / "hf_converted", [{}], other)
    proc = run_trainer(ok + ["--load", tmp_path / "hf_converted", "--finetune"], check=False)
    _one_line_error(proc, "another model shape (checkpoint vs flags: num_layers 4 vs 2)")


def test_nan_streak_aborts_with_checkpoint(tmp_path):
    data = make_data(str(tmp_path / "data"), n_docs=60)
    proc = run_trainer(TINY + ["--data-path", data, "--split", "90,10,0", "--train-iters", "20",
                               "--global-batch-size", "2", "--eval-iters", "0",
                               "--log-interval", "1", "--inject-nan-iters", "1,2,3",
                               "--max-skipped-iters", "3", "--save", tmp_path / "ckpt"],
                       check=False)
    assert proc.returncode == 3
    _one_line_error(proc, "3 iterations in a row had a NaN/inf loss")
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000004"
    rows = [r for r in read_metrics(tmp_path / "ckpt" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["skipped_iters"] for r in rows] == [0, 1, 2, 3]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    data = make_data(str(tmp_path / "data"), n_docs=60)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    args = TINY + ["--data-path", data, "--split", "90,10,0", "--train-iters", "1000",
                   "--global-batch-size", "2", "--eval-iters", "0", "--log-interval", "1",
                   "--save", tmp_path / "ckpt"]
    err = open(tmp_path / "stderr.log", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "pretrain_llama.py")]
                            + [str(a) for a in args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=err)
    for line in proc.stdout:
        if "] iteration " in line:  # Megatron's line: " [timestamp] iteration ..."
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    rc = proc.wait(timeout=120)
    err.close()
    assert rc == 0, out[-2000:] + (tmp_path / "stderr.log").read_text()[-3000:]
    assert "SIGTERM received: stopped cleanly" in out
    tag = (tmp_path / "ckpt" / "latest").read_text().strip()
    meta = json.loads((tmp_path / "ckpt" / tag / "meta.json").read_text())
    assert 1 <= meta["iteration"] < 1000 and tag == f"iter_{meta['iteration']:07d}"
