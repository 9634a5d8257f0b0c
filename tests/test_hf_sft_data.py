"""SFT data: the loss sees only response tokens; malformed records are counted per reason
and good records are never lost; packing keeps examples apart."""

import json

import pytest
import torch

from hf_helpers import make_tokenizer
from tools_helpers import demo_data  # noqa: F401
from megatron_sat.hf.sft_data import (IGNORE_INDEX, SFTCollator, SFTDataConfig,
                                      load_sft_jsonl, pack_examples)


@pytest.fixture(scope="module")
def tok(demo_data, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = make_tokenizer(demo_data, tmp_path_factory.mktemp("tok"))
    return AutoTokenizer.from_pretrained(str(folder))


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_masking_hand_built(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "评论：很好\n情感是？", "output": "正面"},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    (ex,), report = load_sft_jsonl(path, tok, SFTDataConfig(max_seq_length=64), log=None)
    prompt = [tok.bos_token_id] + enc(tok, "评论：很好\n情感是？\n")
    response = enc(tok, "正面") + [tok.eos_token_id]
    assert ex["input_ids"] == prompt + response
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + response
    # the model's loss counts exactly the response tokens: compare with a hand-made loss
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2))
    batch = SFTCollator(0)([ex])
    out = model(**batch)
    logits = out.logits[0, :-1]  # position i predicts token i + 1
    n = len(prompt)
    manual = torch.nn.functional.cross_entropy(logits[n - 1:], torch.tensor(response))
    torch.testing.assert_close(out.loss, manual)


def test_chat_messages_mask_every_assistant_turn(tok, tmp_path):
    rec = {"messages": [{"role": "system", "content": "分类"},
                        {"role": "user", "content": "好书"}, {"role": "assistant", "content": "正面"},
                        {"role": "user", "content": "差评"}, {"role": "assistant", "content": "负面"}]}
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    (ex,), _ = load_sft_jsonl(path, tok, SFTDataConfig(max_seq_length=128), log=None)
    trained = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX]
    eos = tok.eos_token_id
    assert trained == enc(tok, "正面") + [eos] + enc(tok, "负面") + [eos]
    assert tok.decode(ex["input_ids"], skip_special_tokens=True).count("user:") == 2


def test_malformed_records_counted_good_ones_kept(tok, tmp_path):
    good = [{"instruction": f"评论：第{i}个\n情感是？", "output": "正面" if i % 2 else "负面"}
            for i in range(7)]
    bad = ['{"instruction": "x", "output": ', '[1, 2]', '{"instruction": "x"}',
           '{"instruction": "x", "output": 3}', '{"instruction": "x", "output": "  "}',
           '{"text": "pretraining text"}', '{"messages": []}',
           '{"messages": [{"role": "user", "content": "hi"}]}',
           '{"messages": [{"role": "bot", "content": "hi"}]}', '',
           json.dumps({"instruction": "长" * 200, "output": "正面"}, ensure_ascii=False)]
    lines = []
    for i, g in enumerate(good):  # interleave good and bad lines
        lines.append(json.dumps(g, ensure_ascii=False))
        if i < len(bad):
            lines.append(bad[i])
    lines += bad[len(good):]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8") + b"\xff\xfe bad bytes\n")
    logged = []
    examples, report = load_sft_jsonl(path, tok, SFTDataConfig(max_seq_length=48),
                                      log=logged.append)
    assert report.examples == len(examples) == len(good)
    for ex, g in zip(examples, good):  # every good record, in order, with its answer
        answer = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX]
        assert answer == enc(tok, g["output"]) + [tok.eos_token_id]
    assert dict(report.skipped) == {
        "invalid JSON": 1, "not a JSON object": 1, "missing 'output'": 1,
        "'output' is not a string": 1, "empty 'output'": 1,
        "neither Alpaca (instruction/output) nor chat (messages)": 1,
        "'messages' is not a non-empty list": 1, "no non-empty assistant turn": 1,
        "a message role is not system/user/assistant": 1, "blank line": 1,
        "response beyond max_seq_length": 1, "not UTF-8": 1}
    assert report.lines == len(good) + len(bad) + 1
    assert "7 examples" in logged[0] and "1 invalid JSON" in logged[0]


def test_packing_keeps_examples_apart(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    exs = [{"input_ids": [1, 5 + i, 6 + i, 2][: 3 + i % 2], "labels": [-100, 5 + i, 6 + i, 2][: 3 + i % 2]}
           for i in range(5)]
    rows = pack_examples(exs, max_len=8)
    assert [len(r["input_ids"]) for r in rows] == [7, 7, 3]
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1, 2, 3]
    batch = SFTCollator(0)(rows)
    assert "attention_mask" not in batch and batch["position_ids"][2].tolist() == [0, 1, 2, 0, 1, 2, 3]
    # logits of a packed row equal those of each example alone (no attention across)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, use_cache=False)).eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        alone = model(input_ids=torch.tensor([exs[1]["input_ids"]])).logits
    torch.testing.assert_close(packed[0, 3:7], alone[0])


def test_config_validation():
    with pytest.raises(ValueError, match="max_seq_length=1 must be.*prompt_template='x'"):
        SFTDataConfig(max_seq_length=1, prompt_template="x")
