"""Checkpoints move between the two integrations: a model continually pre-trained with
pretrain_llama.py (SAT on), converted to HF, fine-tunes with sft_llama.py (SAT on)."""

import json

import numpy as np
import torch

from hf_helpers import make_tokenizer, sentiment_files
from test_train_common import run_trainer
from tools_helpers import demo_data  # noqa: F401


def test_pretrain_convert_then_sft(demo_data, tmp_path, capsys):
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_sat.hf.sft_main import main as sft_main
    from megatron_sat.tools import convert_checkpoint as cc

    tok = make_tokenizer(demo_data, tmp_path / "tok")
    sp = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))
    builder = IndexedDatasetBuilder(str(tmp_path / "news.bin"), dtype=np.uint16)
    for line in demo_data.zh_news.read_text(encoding="utf-8").splitlines()[:300]:
        ids = sp.encode(line) + [sp.eos_id()]
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
    builder.finalize(str(tmp_path / "news.idx"))
    run_trainer(["--num-layers", 2, "--hidden-size", 64, "--ffn-hidden-size", 128,
                 "--num-attention-heads", 4, "--num-query-groups", 2, "--seq-length", 32,
                 "--max-position-embeddings", 128, "--make-vocab-size-divisible-by", 64,
                 "--tokenizer-model", tok / "tokenizer.model", "--data-path", tmp_path / "news",
                 "--split", "98,2,0", "--data-cache-path", tmp_path / "cache",
                 "--micro-batch-size", 2, "--train-iters", 4, "--lr", 1e-3, "--zero-stage", 0,
                 "--save", tmp_path / "ckpt", "--save-interval", 4, "--eval-interval", 0,
                 "--sat", "--sat-metric", "maxip", "--sat-decay-start", 2])
    assert cc.main(["megatron-to-hf", "--load-dir", str(tmp_path / "ckpt"), "--save-dir",
                    str(tmp_path / "hf"), "--tokenizer-dir", str(tok)]) == 0
    train, held = sentiment_files(demo_data, tmp_path / "data", n_train=16, n_eval=8)
    out = tmp_path / "sft"
    code = sft_main(["--model_name_or_path", str(tmp_path / "hf"), "--train_file", str(train),
                     "--eval_file", str(held), "--output_dir", str(out), "--max_steps", "3",
                     "--per_device_train_batch_size", "2", "--report_to", "none",
                     "--use_cpu", "--save_strategy", "no", "--sat", "--sat-decay-start", "1",
                     "--sat-selections-file", str(tmp_path / "sel.jsonl")])
    assert code == 0, capsys.readouterr().err[-2000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 3 and np.isfinite(results["eval_loss"])
    first = json.loads((tmp_path / "sel.jsonl").read_text().splitlines()[0])
    assert len(first["attn"][0][1][0]) == 1  # GQA q=2 at ρ=0.5: 1 query head per group
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    after = AutoModelForCausalLM.from_pretrained(str(out))
    assert before.config.num_key_value_heads == 2
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)
