"""Helpers shared by the trainer tests, plus fast unit tests of the trainer's pieces.

The trainer tests run ``pretrain_llama.py`` as real processes (plain python, torchrun),
on tiny models and tiny synthetic ``.bin/.idx`` data written with megatron-core's own
``IndexedDatasetBuilder``: documents that repeat a short random motif, so a model can
learn them within a few steps and "loss falls" is a real signal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 512
TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "192",
        "--num-attention-heads", "4", "--vocab-size", str(VOCAB),
        "--make-vocab-size-divisible-by", "64", "--max-position-embeddings", "128",
        "--seq-length", "32", "--micro-batch-size", "2"]


def make_data(prefix: str, n_docs: int = 200, seed: int = 0) -> str:
    """Write ``prefix.bin/.idx`` of motif-repeating documents; returns ``prefix``."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(n_docs):
        motif = rng.integers(3, 64, size=int(rng.integers(4, 9)))  # few ids: fast to learn
        doc = np.concatenate([np.tile(motif, int(rng.integers(6, 14))), [2]])
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def run_trainer(args, launcher: str = "python", nproc: int = 1, timeout: int = 300,
                check: bool = True, env_extra: dict | None = None):
    """Run ``pretrain_llama.py`` in fresh processes; returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(env_extra or {})
    script = os.path.join(REPO, "pretrain_llama.py")
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", script]
    else:
        cmd = [sys.executable, script]
    proc = subprocess.run(cmd + [str(a) for a in args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- fast unit tests of the pieces -----------------------------------------------------

def test_flops_counts_gqa_and_sat_exactly():
    from megatron_sat.model import PRESETS
    from megatron_sat.training.flops import (KeptFractions, forward_flops_per_token,
                                             layer_forward_flops_per_token)

    shape = PRESETS["llama2-70b"]  # h=8192, 64 heads, 8 groups, f=28672
    h, hq, hkv, f, s = 8192, 8192, 1024, 28672, 4096
    dense = 2 * h * (hq + 2 * hkv) + 2 * hq * h + 2 * s * hq + 6 * h * f
    assert layer_forward_flops_per_token(shape, s) == dense
    kept = KeptFractions(attn_q=0.5, attn_kv=1.0, mlp=0.25)
    sat = 2 * h * (hq / 2 + 2 * hkv) + 2 * (hq / 2) * h + 2 * s * hq / 2 + 6 * h * f / 4
    assert layer_forward_flops_per_token(shape, s, kept) == sat
    total = forward_flops_per_token(shape, s, kept)
    assert total == 80 * sat + 2 * h * shape.padded_vocab_size(1)


def test_lr_schedules_megatron_semantics():
    from megatron_sat.training.configs import OptimizerConfig
    from megatron_sat.training.lr_schedule import lr_at

    # Megatron's warm-up: the step after n completed iterations runs at lr * n / W
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10)
    assert lr_at(cfg, 0, 110) == 0.0
    assert lr_at(cfg, 5, 110) == pytest.approx(0.5)
    assert lr_at(cfg, 10, 110) == pytest.approx(1.0)
    assert lr_at(cfg, 60, 110) == pytest.approx(0.55)
    assert lr_at(cfg, 110, 110) == pytest.approx(0.1)
    lin = OptimizerConfig(lr=1.0, min_lr=0.0, lr_decay_style="linear", lr_warmup_iters=0)
    assert lr_at(lin, 25, 100) == pytest.approx(0.75)
    # WSD: stable at the peak until the last 20 iterations, then linear to min_lr
    wsd = OptimizerConfig(lr=1.0, min_lr=0.0, lr_decay_style="WSD", lr_warmup_iters=10,
                          wsd_decay_iters=20, wsd_decay_style="linear")
    assert [lr_at(wsd, i, 100) for i in (50, 80, 90, 100)] == pytest.approx([1, 1, 0.5, 0])
    isr = OptimizerConfig(lr=1.0, min_lr=0.0, lr_decay_style="inverse-square-root",
                          lr_warmup_iters=4)
    assert lr_at(isr, 16, 100) == pytest.approx((4 / 16) ** 0.5)


def test_args_presets_overrides_and_contradictions():
    from megatron_sat.training.arguments import parse_args
    from megatron_sat.training.configs import ConfigError

    base = ["--data-path", "x", "--seq-length", "256"]
    cfg = parse_args(["--model", "llama2-70b", "--swiglu", "--normalization", "rmsnorm",
                      "--use-rotary-position-embeddings", "--disable-bias-linear",
                      "--untie-embeddings-and-output-weights", "--no-query-key-layer-scaling",
                      "--num-key-value-heads", "8", "--global-batch-size", "8",
                      "--sat", "--sat-schedule", "ladder", "--train-iters", "40"] + base,
                     world_size=2)
    assert cfg.shape.num_query_groups == 8 and cfg.shape.hidden_size == 8192
    assert cfg.batch.grad_accumulation_steps == 4 and cfg.sat.total_iters == 40
    cfg = parse_args(["--model", "tiny", "--num-layers", "3"] + base)
    assert cfg.shape.num_layers == 3 and cfg.shape.hidden_size == 128
    bad = [(["--normalization", "layernorm"], "RMSNorm"),
           (["--num-query-groups", "4", "--num-key-value-heads", "2"], "disagree"),
           (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size"),
           (["--global-batch-size", "3", "--micro-batch-size", "2"], "--global-batch-size"),
           (["--sat-metric", "wanda"], "without --sat")]
    for extra, needle in bad:
        with pytest.raises(ConfigError, match=needle):
            parse_args(["--model", "tiny", "--seq-length", "128", "--data-path", "x"] + extra,
                       world_size=3 if "3" in extra[-1:] else 1)
