"""The documented workflow end to end, with an HF Llama whose architecture fields differ
from every default (issue 12):

HF Llama (rms_norm_eps 1e-6, rope_theta 500000, max_position_embeddings 512)
→ extend_vocab --resize-checkpoint → convert_checkpoint hf-to-megatron TP=2
→ pretrain_llama.py --load … --finetune (no shape or vocabulary flags; TP=2, torchrun)
→ convert_checkpoint megatron-to-hf.

Every config field survives except the vocabulary size; logits match transformers at
each step; the extended tokenizer gives the same ids in transformers and sentencepiece
on 600 held-out real review lines (runs of spaces, full-width text, mixed Chinese/English).
"""

import json

import torch
from dist_utils import run_distributed

from test_train_common import run_trainer
from tools_helpers import demo_data, hf_logits, make_tiny_hf_llama, megatron_logits_tp  # noqa: F401

BASE_VOCAB = 32000
ARCH = dict(rms_norm_eps=1e-6, rope_theta=500000.0, max_pos=512)


def test_hf_extend_convert_train_export(tmp_path, demo_data):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from megatron_sat.tools import convert_checkpoint, extend_vocab, preprocess_data
    from megatron_sat.tools.ckpt_format import load_megatron_checkpoint

    make_tiny_hf_llama(tmp_path / "hf", vocab=BASE_VOCAB, hidden=64, ffn=96, heads=4,
                       kv_heads=2, layers=2, **ARCH)
    news = demo_data.zh_news.read_text(encoding="utf-8").splitlines()
    (tmp_path / "corpus.txt").write_text("\n".join(news[:4000]), encoding="utf-8")
    assert extend_vocab.main([
        "--base-tokenizer", str(demo_data.tokenizer_model), "--corpus",
        str(tmp_path / "corpus.txt"), "--vocab-size", "5000", "--output-dir",
        str(tmp_path / "tok"), "--resize-checkpoint", str(tmp_path / "hf"),
        "--output-checkpoint", str(tmp_path / "hf_zh")]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model"))
    vocab = sp.get_piece_size()
    assert vocab > BASE_VOCAB

    # tokenizer agreement on held-out real lines (never seen by the Chinese BPE training)
    reviews = [l for l in demo_data.zh_reviews.read_text(encoding="utf-8").splitlines()
               if l.strip()][-600:]
    assert sum("  " in l for l in reviews) >= 5  # whitespace runs are exercised
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    mism = [l for l in reviews if hf_tok.encode(l, add_special_tokens=False) != sp.encode(l)]
    assert mism == [], mism[:3]

    # one vocabulary rule: the HF folder holds the tokenizer's true size
    cfg_zh = json.loads((tmp_path / "hf_zh" / "config.json").read_text())
    assert cfg_zh["vocab_size"] == vocab
    stream = sp.encode("".join(news[-30:]))
    ids = torch.tensor([stream[:24], stream[24:48]])
    assert ids.max() >= BASE_VOCAB  # new pieces are used
    old_ids = ids.clamp(max=BASE_VOCAB - 1)
    assert torch.allclose(hf_logits(tmp_path / "hf", old_ids),
                          hf_logits(tmp_path / "hf_zh", old_ids)[..., :BASE_VOCAB], atol=1e-5)

    assert convert_checkpoint.main(["hf-to-megatron", "--load-dir", str(tmp_path / "hf_zh"),
                                    "--save-dir", str(tmp_path / "mg"), "--target-tp", "2"]) == 0
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                            for t in news[4000:4400]), encoding="utf-8")
    assert preprocess_data.main(["--input", str(docs), "--tokenizer-model",
                                 str(tmp_path / "tok" / "tokenizer.model"), "--output-prefix",
                                 str(tmp_path / "zh"), "--append-eod", "--no-progress"]) == 0
    proc = run_trainer(["--load", tmp_path / "mg", "--finetune", "--save", tmp_path / "run",
                        "--tokenizer-model", tmp_path / "tok" / "tokenizer.model",
                        "--data-path", tmp_path / "zh_text_document", "--split", "95,5,0",
                        "--tensor-model-parallel-size", 2, "--seq-length", 32,
                        "--micro-batch-size", 1, "--global-batch-size", 1,
                        "--train-iters", 2, "--lr", "1e-3", "--eval-iters", 0],
                       launcher="torchrun", nproc=2)
    assert "loaded weights from" in proc.stdout
    trained = load_megatron_checkpoint(tmp_path / "run")
    assert trained.tp == 2 and trained.shape == load_megatron_checkpoint(tmp_path / "mg").shape
    assert convert_checkpoint.main(["megatron-to-hf", "--load-dir", str(tmp_path / "run"),
                                    "--save-dir", str(tmp_path / "hf_back")]) == 0

    back = json.loads((tmp_path / "hf_back" / "config.json").read_text())
    orig = json.loads((tmp_path / "hf" / "config.json").read_text())
    differ = {k: (orig[k], back.get(k)) for k in orig if back.get(k) != orig[k]}
    assert differ == {"vocab_size": (BASE_VOCAB, vocab)}, differ
    assert back["rms_norm_eps"] == 1e-6 and back["max_position_embeddings"] == 512
    assert back["rope_parameters"]["rope_theta"] == 500000.0

    run_distributed(megatron_logits_tp, 2, [(str(tmp_path / "mg"), str(tmp_path / "a.pt")),
                                            (str(tmp_path / "run"), str(tmp_path / "b.pt"))],
                    ids, tmp_path=tmp_path)
    before, after = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert (before - hf_logits(tmp_path / "hf_zh", ids)).abs().max() < 1e-4
    assert (after - hf_logits(tmp_path / "hf_back", ids)).abs().max() < 1e-4
    assert (after - before).abs().max() > 1e-3  # training really changed the model
