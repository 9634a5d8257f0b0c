"""tools/extend_vocab.py on the real Chinese news and the Llama-style base tokenizer:
base ids unchanged, HF ≡ sentencepiece ids, ≥40% fewer Chinese tokens, resized
checkpoints keep their old rows bit for bit."""

import json

import pytest
import torch

from tools_helpers import assert_one_line_error, demo_data, make_tiny_hf_llama  # noqa: F401

from megatron_sat.tools import extend_vocab as ev
from megatron_sat.tools.vocab_merge import SpmTrainConfig, read_model_proto

# 8000 pieces cut tokens by ~38% on this held-out news; 16000 by ~45% (REFERENCE §2 says
# "about half"). The test uses 16000 for a margin over the 40% bar.
ZH_VOCAB = 16000
MIXED = ["Hello world, 你好世界！This is 中英文 mixed text, 123 个测试。",
         "据新华社北京1月24日电(记者毛磊) Llama-2 模型在 Chinese corpora 上继续预训练。",
         "The quick brown fox 跳过了 the lazy dog; 价格 3.5 元/kg, e-mail: a@b.cn",
         "《水知道答案》这本书我一口气买了5本 because it's great!",
         "多行文本\n第二行 second line\tand a tab"]


@pytest.fixture(scope="module")
def extended(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    make_tiny_hf_llama(root / "hf", vocab=32000, hidden=32, ffn=64, heads=4, kv_heads=2,
                       layers=1)
    config = ev.ExtendVocabConfig(
        base_tokenizer=str(demo_data.tokenizer_model), output_dir=str(root / "tok"),
        corpus=(str(demo_data.zh_news),), heldout_fraction=0.05,
        train=SpmTrainConfig(vocab_size=ZH_VOCAB), resize_checkpoint=str(root / "hf"),
        output_checkpoint=str(root / "hf_zh"), init_noise_std=0.0)
    report = ev.extend_vocab(config)
    return root, report


def test_base_ids_unchanged_and_pieces_appended(extended, demo_data):
    root, report = extended
    base = read_model_proto(demo_data.tokenizer_model)
    merged = read_model_proto(root / "tok" / "tokenizer.model")
    assert report.base_vocab_size == 32000 and len(base.pieces) == 32000
    for old, new in zip(base.pieces, merged.pieces[:32000]):
        assert (old.piece, old.score, old.type) == (new.piece, new.score, new.type)
    assert len(merged.pieces) == 32000 + report.pieces_added == report.new_vocab_size
    assert report.pieces_added > 10000
    assert len({p.piece for p in merged.pieces}) == len(merged.pieces)  # no duplicates
    assert merged.trainer_spec.bos_id == 1 and merged.trainer_spec.eos_id == 2


def test_hf_and_sentencepiece_ids_agree(extended, demo_data):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    root, _ = extended
    sp = spm.SentencePieceProcessor(model_file=str(root / "tok" / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(root / "tok"))
    assert len(hf) == sp.get_piece_size()
    news = demo_data.zh_news.read_text(encoding="utf-8").splitlines()[-300:]
    # runs of spaces included: tokenizer.json's merges follow sentencepiece's scores
    en = demo_data.en_botchan.read_text(encoding="utf-8").splitlines()[:200]
    for text in MIXED + news + en:
        ids = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.encode(text) == [sp.bos_id()] + ids  # add_bos_token stated in the config
    assert any(i >= 32000 for i in sp.encode(MIXED[0]))
    from transformers import LlamaTokenizer, LlamaTokenizerFast

    for cls in (LlamaTokenizer, LlamaTokenizerFast):
        tok = cls.from_pretrained(str(root / "tok"))
        assert [tok.encode(t, add_special_tokens=False) for t in MIXED] == \
            [sp.encode(t) for t in MIXED]


def test_chinese_tokens_per_char_drop_40_percent(extended, demo_data):
    import sentencepiece as spm

    root, report = extended
    heldout = demo_data.zh_news.read_text(encoding="utf-8").splitlines()[-900:]
    chars = sum(len(l) for l in heldout)
    before, after = (sum(len(ids) for ids in spm.SentencePieceProcessor(model_file=str(m))
                         .encode(heldout)) / chars
                     for m in (demo_data.tokenizer_model, root / "tok" / "tokenizer.model"))
    assert after <= 0.6 * before, (before, after)
    assert report.tokens_per_char_after <= 0.6 * report.tokens_per_char_before


def test_resized_hf_checkpoint_keeps_old_rows(extended):
    from megatron_sat.tools.hf_llama import load_hf_state_dict

    root, report = extended
    old, new = load_hf_state_dict(root / "hf"), load_hf_state_dict(root / "hf_zh")
    rows = report.resize.rows
    assert rows == report.new_vocab_size  # one rule: HF folders hold the true vocabulary
    assert json.loads((root / "hf_zh" / "config.json").read_text())["vocab_size"] == rows
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert new[k].shape == (rows, old[k].shape[1])
        assert torch.equal(new[k][:32000], old[k])
        assert torch.allclose(new[k][32000:], old[k].mean(0).expand(rows - 32000, -1))
    for k in old:
        if k not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(old[k], new[k])
    assert (root / "hf_zh" / "tokenizer.model").is_file()


def test_resize_megatron_checkpoint_tp2(extended, tmp_path):
    from megatron_sat.tools.ckpt_format import load_megatron_checkpoint
    from megatron_sat.tools.convert_checkpoint import convert_hf_to_megatron
    from megatron_sat.tools.embedding_resize import resize_checkpoint

    root, report = extended
    convert_hf_to_megatron(root / "hf", tmp_path / "mg", target_tp=2)
    resize_checkpoint(tmp_path / "mg", tmp_path / "mg_zh", report.new_vocab_size,
                      noise_std=0.01, seed=3)
    old, new = load_megatron_checkpoint(tmp_path / "mg"), load_megatron_checkpoint(tmp_path / "mg_zh")
    assert new.shape.vocab_size == report.new_vocab_size
    assert new.padded_vocab_size == new.shape.padded_vocab_size(2) >= report.new_vocab_size
    assert new.meta["vocab_extension"]["old_vocab_size"] == 32000
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        a = torch.cat([old.model(r)[key] for r in range(2)])[:32000]
        b = torch.cat([new.model(r)[key] for r in range(2)])
        assert b.shape[0] == new.padded_vocab_size
        assert torch.equal(b[:32000], a)
        extra = b[32000:report.new_vocab_size]
        assert (extra - a.mean(0)).abs().max() < 0.1 and extra.std(0).mean() > 0  # mean + noise
        assert torch.count_nonzero(b[report.new_vocab_size:]) == 0  # padding rows


def test_vocabulary_smaller_than_checkpoint_is_refused(demo_data, tmp_path, capsys):
    make_tiny_hf_llama(tmp_path / "big", vocab=50000, hidden=16, ffn=32, heads=2, kv_heads=2,
                       layers=1)
    rc = ev.main(["--base-tokenizer", str(demo_data.tokenizer_model), "--zh-model",
                  str(demo_data.tokenizer_model), "--eval-file", str(demo_data.zh_news),
                  "--output-dir", str(tmp_path / "tok"), "--resize-checkpoint",
                  str(tmp_path / "big"), "--output-checkpoint", str(tmp_path / "out")])
    assert_one_line_error(rc, capsys.readouterr().err, "smaller than the checkpoint's")
    assert not (tmp_path / "tok").exists() and not (tmp_path / "out").exists()


def test_missing_base_tokenizer_and_existing_output(tmp_path, demo_data, capsys):
    rc = ev.main(["--base-tokenizer", str(tmp_path / "none.model"), "--zh-model",
                  str(demo_data.tokenizer_model), "--output-dir", str(tmp_path / "t")])
    assert_one_line_error(rc, capsys.readouterr().err, "not found", "tokenizer.model")
    (tmp_path / "t").mkdir()
    rc = ev.main(["--base-tokenizer", str(demo_data.tokenizer_model), "--zh-model",
                  str(demo_data.tokenizer_model), "--output-dir", str(tmp_path / "t")])
    assert_one_line_error(rc, capsys.readouterr().err, "already exists", "--overwrite")
