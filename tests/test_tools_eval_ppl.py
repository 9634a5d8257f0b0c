"""tools/eval_ppl.py: HF and converted megatron-sat forms give the same perplexity, and
the sliding-window result equals a direct HF computation."""

import json
import math

import pytest
import torch

from tools_helpers import assert_one_line_error, demo_data, make_tiny_hf_llama  # noqa: F401

from megatron_sat.tools import eval_ppl
from megatron_sat.tools.convert_checkpoint import convert_hf_to_megatron


@pytest.fixture(scope="module")
def setup(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    model = make_tiny_hf_llama(root / "hf", vocab=32000, hidden=32, ffn=64, heads=4, kv_heads=2,
                               layers=2, max_pos=512)
    convert_hf_to_megatron(root / "hf", root / "mg", target_tp=2)
    zh = root / "zh"
    zh.mkdir()
    news = demo_data.zh_news.read_text(encoding="utf-8").splitlines()
    (zh / "a.txt").write_text("\n".join(news[:6]) + "\n", encoding="utf-8")
    (zh / "b.txt").write_text("\n".join(news[6:10]) + "\n", encoding="utf-8")
    en = root / "en.txt"
    en.write_text("\n".join(demo_data.en_botchan.read_text(encoding="utf-8")
                            .splitlines()[:30]) + "\n", encoding="utf-8")
    return root, model, [f"zh={zh}", f"en={en}"]


def test_hf_and_megatron_same_perplexity(setup, demo_data, tmp_path, capsys):
    root, _, data = setup
    results = {}
    for fmt in ("hf", "mg"):
        out = tmp_path / f"{fmt}.json"
        rc = eval_ppl.main(["--load", str(root / fmt), "--tokenizer-model",
                            str(demo_data.tokenizer_model), "--data", *data, "--seq-length", "64",
                            "--stride", "32", "--micro-batch-size", "3", "--output-json",
                            str(out), "--no-progress"])
        assert rc == 0
        results[fmt] = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert "zh" in table and "en" in table and "bits/char" in table
    assert results["hf"]["format"] == "hf" and results["mg"]["format"] == "megatron"
    for dom in ("zh", "en"):
        a, b = results["hf"]["domains"][dom], results["mg"]["domains"][dom]
        assert a["tokens"] == b["tokens"] > 100
        assert abs(a["ppl"] - b["ppl"]) / a["ppl"] < 1e-4
    assert len(results["hf"]["domains"]["zh"]["files"]) == 2


def test_sliding_window_matches_direct_hf_computation(setup, demo_data):
    import sentencepiece as spm

    root, model, _ = setup
    sp = spm.SentencePieceProcessor(model_file=str(demo_data.tokenizer_model))
    lines = demo_data.en_botchan.read_text(encoding="utf-8").splitlines()[:30]
    stream = []
    for line in lines:
        if line.strip():
            stream += [sp.bos_id()] + sp.encode(line)
    ids = torch.tensor(stream)
    # reference: one full-context forward over the whole stream
    assert len(ids) <= 512
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
    tgt = ids[1:]
    nll = -logp[:-1].gather(-1, tgt[:, None])[:, 0]
    keep = tgt != sp.bos_id()
    want = math.exp(float(nll[keep].mean()))
    # windows as long as the stream: eval_ppl must reproduce it exactly
    cfg = eval_ppl.EvalConfig(load=str(root / "hf"), data=(f"en={root / 'en.txt'}",),
                              tokenizer_model=str(demo_data.tokenizer_model),
                              seq_length=len(ids), stride=len(ids), show_progress=False)
    got = eval_ppl.evaluate(cfg)["domains"]["en"]
    assert got["tokens"] == int(keep.sum())
    assert abs(got["ppl"] - want) / want < 1e-6
    # short windows only lose context: every token is still scored once
    cfg = eval_ppl.EvalConfig(load=str(root / "hf"), data=(f"en={root / 'en.txt'}",),
                              tokenizer_model=str(demo_data.tokenizer_model),
                              seq_length=32, stride=8, show_progress=False)
    assert eval_ppl.evaluate(cfg)["domains"]["en"]["tokens"] == int(keep.sum())


def test_windows_tile_every_target_once():
    for n, L, s in ((100, 64, 32), (10, 64, 32), (65, 64, 64), (200, 16, 5)):
        seen = []
        for b, e, first in eval_ppl.windows(n, L, s):
            assert e - b <= L and b < first <= e
            seen += list(range(first, e))
        assert seen == list(range(1, n))


def test_bad_inputs(setup, tmp_path, capsys):
    root, _, data = setup
    rc = eval_ppl.main(["--load", str(root / "hf"), "--data", *data, "--tokenizer-model",
                        str(tmp_path / "missing.model")])
    assert_one_line_error(rc, capsys.readouterr().err, "tokenizer", "--tokenizer-model")
    rc = eval_ppl.main(["--load", str(tmp_path), "--data", *data])
    assert_one_line_error(rc, capsys.readouterr().err, "neither an HF folder")
