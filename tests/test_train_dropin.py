"""Drop-in for Megatron-DeepSpeed users: their launch script's flags, logs and TensorBoard
tags, checkpoints without shape flags, the example scripts without a hostfile, one-line
errors for what we cannot honour.

The flag list below is written from Megatron-DeepSpeed's
``examples_deepspeed/pretrain_llama2_distributed.sh`` (every flag it passes to
``pretrain_gpt.py``, its ``ds_args`` and its activation-checkpointing block), shrunk to CPU
sizes with PP = 1 and ``gloo``, and run with ``pretrain_llama.py`` plus ``--sat``.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_train_common import REPO, make_data, read_metrics, run_trainer


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A real SentencePiece model (vocabulary 100) trained on synthetic words."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    lines = [" ".join("".join(rng.choice(letters, size=int(rng.integers(2, 7))))
                      for _ in range(12)) for _ in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines),
                                   model_prefix=str(folder / "tokenizer"), vocab_size=100,
                                   model_type="unigram", minloglevel=2)
    return str(folder / "tokenizer.model")


def mds_llama2_flags(tmp_path, tok, data, activation_checkpoint: bool) -> list:
    """pretrain_llama2_distributed.sh's command line at CPU scale (TP=2, PP=1, ZeRO 0)."""
    ckpt, ds_config = tmp_path / "ckpt", tmp_path / "deepspeed.json"
    gbs, mbs, zero = 4, 2, 0
    ds_config.write_text(json.dumps({"train_batch_size": gbs, "train_micro_batch_size_per_gpu": mbs,
                                     "steps_per_print": 1, "zero_optimization": {"stage": zero},
                                     "bf16": {"enabled": True}}))
    ds_args = ["--zero-stage=0", "--deepspeed_config=" + str(ds_config), "--deepspeed"]
    if activation_checkpoint:
        ds_args = ["--recompute-granularity", "full", "--recompute-method", "uniform",
                   "--deepspeed-activation-checkpointing"] + ds_args
    return [
        "--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 1,
        "--num-layers", 2, "--hidden-size", 64, "--ffn-hidden-size", 176,
        "--num-attention-heads", 4, "--micro-batch-size", mbs, "--global-batch-size", gbs,
        "--seq-length", 32, "--max-position-embeddings", 32, "--train-iters", 3,
        "--save", ckpt, "--load", ckpt, "--data-path", "1", data, "--data-impl", "mmap",
        "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", tok,
        "--split", "949,50,1", "--distributed-backend", "gloo", "--lr", "3e-4",
        "--lr-decay-style", "cosine", "--min-lr", "3e-5", "--weight-decay", 0.1,
        "--clip-grad", 1, "--lr-warmup-iters", 1, "--optimizer", "adam", "--adam-beta1", 0.9,
        "--adam-beta2", 0.95, "--log-interval", 1, "--save-interval", 10000,
        "--eval-interval", 1000, "--eval-iters", 2, "--bf16", "--no-query-key-layer-scaling",
        "--attention-dropout", 0, "--hidden-dropout", 0, "--use-rotary-position-embeddings",
        "--untie-embeddings-and-output-weights", "--swiglu", "--normalization", "rmsnorm",
        "--disable-bias-linear", "--num-key-value-heads", 2, *ds_args,
    ]


MEGATRON_TAGS = {"lm loss", "lm loss vs samples", "learning-rate", "learning-rate vs samples",
                 "grad-norm", "grad-norm vs samples", "batch-size", "loss-scale",
                 "iteration-time", "lm loss validation", "lm loss validation vs samples",
                 "lm loss validation ppl", "sat/kept_mlp", "sat/attn_omission_rate",
                 "throughput/tokens_per_sec", "throughput/dense_equiv_tokens_per_sec"}


@pytest.mark.parametrize("activation_checkpoint", [False, True])
def test_megatron_deepspeed_llama2_script_trains_with_sat(tmp_path, spm_model,
                                                         activation_checkpoint):
    data = make_data(str(tmp_path / "data"), n_docs=600)  # 949,50,1 needs a non-empty test third
    args = mds_llama2_flags(tmp_path, spm_model, data, activation_checkpoint) + [
        "--sat", "--tensorboard-dir", tmp_path / "tb"]
    proc = run_trainer(args, launcher="torchrun", nproc=2)
    out = proc.stdout
    assert "world of 2 processes (torch launcher): TP 2 x DP 1" in out
    assert "--data-impl mmap: data are read as memory-mapped" in out
    assert "--distributed-backend gloo" in out and "--optimizer adam: AdamW" in out
    lines = [ln for ln in out.splitlines() if "] iteration " in ln]
    assert len(lines) == 3
    assert "learning rate: 0.000000E+00" in lines[0]  # Megatron warm-up: step 1 at lr 0
    assert "learning rate: 3.000000E-04" in lines[1]
    assert "number of skipped iterations:   0 | number of nan iterations:   0 |" in lines[2]
    assert open(tmp_path / "ckpt" / "latest").read().strip() == "iter_0000003"
    rows = [r for r in read_metrics(tmp_path / "tb" / "metrics.jsonl") if r["kind"] == "train"]
    assert all(np.isfinite(r["lm_loss"]) for r in rows) and rows[0]["kept_mlp"] < 1.0
    if activation_checkpoint:
        assert "recompute" in out  # accepted and reported (see megatron_compat.py)
        return
    # TensorBoard: Megatron's tag names, read back with tensorboard's own event reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert MEGATRON_TAGS <= tags, MEGATRON_TAGS - tags
    assert [e.step for e in acc.Scalars("lm loss")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("lm loss vs samples")] == [4, 8, 12]
    assert [e.value for e in acc.Scalars("lm loss")] == pytest.approx(
        [r["lm_loss"] for r in rows], rel=1e-6)


def test_finetune_from_converted_checkpoint_without_shape_flags(tmp_path):
    from tools_helpers import make_tiny_hf_llama, run_tool

    make_tiny_hf_llama(tmp_path / "hf", heads=4, kv_heads=2, hidden=64, ffn=96, vocab=300)
    conv = run_tool("convert_checkpoint.py", "hf-to-megatron", "--load-dir", tmp_path / "hf",
                    "--save-dir", tmp_path / "meg", "--target-tp", "1")
    assert conv.returncode == 0, conv.stderr
    data = make_data(str(tmp_path / "data"))
    proc = run_trainer(["--load", tmp_path / "meg", "--finetune", "--data-path", data,
                        "--split", "90,10,0", "--data-cache-path", tmp_path / "cache",
                        "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "2",
                        "--log-interval", "1", "--eval-iters", "0"])
    assert "model shape from the checkpoint in --load" in proc.stdout
    assert ("num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, "
            "num_query_groups=2, vocab_size=300") in proc.stdout
    assert "loaded weights from" in proc.stdout and proc.stdout.count("] iteration ") == 2


def test_example_script_launches_locally_without_hostfile(tmp_path, spm_model):
    data = make_data(str(tmp_path / "data"), n_docs=300)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", NUM_GPUS="2",
               HOSTFILE=str(tmp_path / "no_hostfile"), LOAD="", SAVE=str(tmp_path / "save"),
               TOKENIZER=spm_model, DATA_PATH=data, DATA_CACHE=str(tmp_path / "cache"),
               TRAIN_ITERS="2", SEQ_LENGTH="32", MICRO_BATCH="1", GLOBAL_BATCH="2",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    tiny = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176",
            "--num-attention-heads", "4", "--vocab-size", "128", "--max-position-embeddings",
            "64", "--lr-warmup-iters", "0", "--eval-iters", "1", "--log-interval", "1"]
    proc = subprocess.run(["bash", "examples/llama2/pretrain_llama2_7b_sat.sh", *tiny], cwd=REPO,
                          env=env, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launching 2 processes on this node" in proc.stderr
    assert "world of 2 processes (torch launcher): TP 1 x DP 2" in proc.stdout
    assert proc.stdout.count("] iteration ") == 2
    assert open(tmp_path / "save" / "latest").read().strip() == "iter_0000002"


@pytest.mark.parametrize("argv,needle", [
    (["--pipeline-model-parallel-size", "2"], "--zero-stage 3"),
    (["--hidden-dropout", "0.1"], "--hidden-dropout 0.1 is not supported"),
    (["--tokenizer-type", "BertWordPieceLowerCase"], "--tokenizer-type: invalid choice"),
    (["--use-distributed-optimizer", "--zero-stage", "0"], "--use-distributed-optimizer"),
    (["--lr-decay-style", "WSD"], "--lr-wsd-decay-iters"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"], "--lr-warmup-fraction"),
    (["--use-checkpoint-args", "--load", "/nonexistent"], "--load /nonexistent does not exist"),
    (["--use-checkpoint-args", "--load", "/nonexistent", "--save", "/nonexistent"],
     "--use-checkpoint-args: no megatron-sat checkpoint"),
])
def test_unsupported_flags_are_one_line_errors(argv, needle, capsys, monkeypatch):
    from megatron_sat.training.main import main

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    rc = main(["--model", "tiny", "--data-path", "x", "--seq-length", "64"] + argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert err.startswith("pretrain_llama.py: error: ")


def test_megatron_aliases_and_tokenizer_types_shared_with_tools(spm_model):
    from megatron_sat.tools.text_tokenizer import load_tokenizer
    from megatron_sat.training.arguments import parse_args

    base = ["--model", "tiny", "--data-path", "x", "--seq-length", "64", "--train-iters", "100"]
    cfg = parse_args(base + ["--use-distributed-optimizer", "--num-key-value-heads", "2",
                             "--lr-warmup-fraction", "0.1", "--eod-mask-loss",
                             "--no-pipeline-parallel", "--wandb-project", "p",
                             "--wandb-exp-name", "e", "--wandb-save-dir", "/tmp/w"])
    assert cfg.engine.zero_stage == 1 and cfg.shape.num_query_groups == 2
    assert cfg.optimizer.lr_warmup_iters == 10 and cfg.data.eod_mask_loss
    assert cfg.logging.wandb_project == "p" and cfg.logging.wandb_save_dir == "/tmp/w"
    assert parse_args(base[:2] + ["--mock-data", "--seq-length", "64"]).data.mock
    for t in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        assert parse_args(base + ["--tokenizer-type", t, "--tokenizer-model", spm_model]
                          ).shape.vocab_size == 100
        assert load_tokenizer(t, spm_model).vocab_size == 100  # the tools read the same names


def test_use_checkpoint_args_takes_the_shape_from_meta_json(tmp_path):
    from megatron_sat.model import PRESETS
    from megatron_sat.training.arguments import parse_args

    shape = PRESETS["tinyllama-1.1b"].to_dict()
    (tmp_path / "iter_0000010").mkdir()
    (tmp_path / "iter_0000010" / "meta.json").write_text(json.dumps(
        {"format": "megatron-sat", "format_version": 1, "iteration": 10, "shape": shape, "tp": 1,
         "padded_vocab_size": shape["vocab_size"]}))
    (tmp_path / "latest").write_text("iter_0000010\n")
    base = ["--data-path", "x", "--seq-length", "64", "--load", str(tmp_path)]
    assert parse_args(base).shape.to_dict() == shape  # no shape flags: from the checkpoint
    cfg = parse_args(base + ["--use-checkpoint-args", "--num-layers", "3"])
    assert cfg.shape.to_dict() == shape  # the checkpoint wins, as in Megatron
    assert any("over the flags num_layers" in n for n in cfg.notes)
    assert parse_args(base + ["--num-layers", "3", "--model", "tiny"]).shape.num_layers == 3
