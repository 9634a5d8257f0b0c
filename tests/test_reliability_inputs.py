"""Every bad input file or flag ends in at most two stderr lines naming it, a non-zero exit
and no traceback, across the trainer and the five tools (issue 12).

The trainer checks every input before it starts a process group (``main._preflight``),
so its cases run in-process through ``main(argv)`` like the tools': an exception escaping
would fail the test, which is what "no traceback" means.  Inputs are real: megatron-core
``.bin/.idx`` data, the demo SentencePiece model, a tiny HF Llama saved by transformers
and converted by the converter, then damaged the way copies get damaged.
"""

import json
import os
import shutil

import pytest
import torch

from test_train_common import TINY, make_data
from tools_helpers import demo_data, make_tiny_hf_llama  # noqa: F401

LFS = "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 499723\n"
MARKER = "pickle_ran.txt"


class _Evil:
    """Pickles to a call of ``exec`` that would create MARKER: it must never run."""

    def __init__(self, folder):
        self.code = f"open({str(folder / MARKER)!r}, 'w').write('ran')"

    def __reduce__(self):
        return (exec, (self.code,))


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_data):
    from megatron_sat.tools.convert_checkpoint import convert_hf_to_megatron
    from megatron_sat.tools.indexed_writer import IndexedDatasetWriter

    root = tmp_path_factory.mktemp("bad")
    w = {"root": root, "tok": str(demo_data.tokenizer_model)}
    w["data"] = make_data(str(root / "data"), n_docs=40)
    make_tiny_hf_llama(root / "hf", hidden=64, ffn=192, heads=4, kv_heads=4, layers=2,
                       vocab=512, max_pos=128)
    convert_hf_to_megatron(root / "hf", root / "ckpt", target_tp=1,
                           make_vocab_size_divisible_by=64)
    (root / "lfs.model").write_text(LFS)
    (root / "text.model").write_text("just some text, not a model\n" * 20)
    for name, docs in (("empty", []), ("small", [[5, 6, 7, 8, 2]])):
        with IndexedDatasetWriter(root / name, 512) as wr:
            for d in docs:
                wr.add_document(d)
    for name, damage in (("badmagic", "idx"), ("truncbin", "bin")):
        for ext in (".bin", ".idx"):
            shutil.copy(w["data"] + ext, root / (name + ext))
        if damage == "idx":
            with open(root / (name + ".idx"), "r+b") as f:
                f.write(b"NOTANIDX!")
        else:
            _truncate(root / (name + ".bin"))
    (root / "ds_bad.json").write_text('{"zero_optimization": {"stage": 1},}')
    (root / "ds_list.json").write_text("[1, 2]")

    def ckpt_copy(name):
        dst = root / name
        shutil.copytree(root / "ckpt", dst)
        return dst

    ckpt_copy("latest_missing")
    (root / "latest_missing" / "latest").write_text("iter_0000009\n")
    ckpt_copy("meta_bad")
    (root / "meta_bad" / "iter_0000000" / "meta.json").write_text('{"format": "megatron-s')
    _truncate(ckpt_copy("trunc_weights") / "iter_0000000" / "mp_rank_00" / "model.pt")
    evil = ckpt_copy("evil") / "iter_0000000" / "mp_rank_00" / "model.pt"
    torch.save({"model": {"x": _Evil(root)}, "shape": {}}, evil)
    # a trainer-format checkpoint whose RNG file is a malicious pickle
    res = ckpt_copy("evil_resume") / "iter_0000000"
    meta = json.loads((res / "meta.json").read_text())
    meta.update(format="megatron-sat-train", weights="deepspeed")
    (res / "meta.json").write_text(json.dumps(meta))
    shutil.move(res / "mp_rank_00" / "model.pt", res / "mp_rank_00_model_states.pt")
    (res / "rng").mkdir()
    torch.save({"torch": _Evil(root)}, res / "rng" / "rank_00000.pt")
    ckpt_copy("save_taken")
    # HF folders damaged three ways
    for name in ("hf_trunc", "hf_badcfg", "hf_index"):
        shutil.copytree(root / "hf", root / name)
    _truncate(root / "hf_trunc" / "model.safetensors")
    (root / "hf_badcfg" / "config.json").write_text("{not json")
    (root / "hf_index" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    (root / "plain.txt").write_text("第一行文本\n第二行文本\n", encoding="utf-8")
    (root / "docs.jsonl").write_text('{"content": "迈向新世纪"}\n', encoding="utf-8")
    return w


def _trainer_cases(w):
    r, ck = w["root"], str(w["root"] / "ckpt")
    novocab = [a for i, a in enumerate(TINY) if "--vocab-size" not in TINY[max(i - 1, 0):i + 1]]
    return [
        (["--tokenizer-model", r / "lfs.model"], "git-lfs"),
        (["--tokenizer-model", r / "text.model"], "not a SentencePiece model"),
        (["--data-path", r / "badmagic"], "bad magic"),
        (["--data-path", r / "truncbin"], "truncbin.bin' is truncated"),
        (["--data-path", r / "empty"], "no documents"),
        (["--data-path", r / "small"], "fewer than one sample"),
        (["--deepspeed_config", r / "ds_bad.json"], "ds_bad.json' is not valid JSON"),
        (["--deepspeed_config", r / "ds_list.json"], "holds a JSON list"),
        (["--load", r / "nowhere"], "nowhere does not exist"),
        (["--load", r / "hf"], "holds no megatron-sat checkpoint"),
        (["--load", r / "latest_missing", "--finetune"], "--ckpt-step 0"),
        (["--load", r / "meta_bad", "--finetune"], "meta.json' is not valid JSON"),
        (["--load", ck, "--finetune", "--ckpt-step", "7"], "--ckpt-step 7"),
        (["--load", r / "trunc_weights", "--finetune"], "model.pt' is unreadable"),
        (["--load", r / "evil", "--finetune"], "could run code"),
        (["--load", r / "evil_resume"], "could run code"),
        (["--load", ck, "--finetune", "--save", r / "save_taken"], "--overwrite-save"),
        (["--load", ck, "--finetune", "--num-layers", "3"], "num_layers 2 vs 3"),
        (novocab[:0] + ["--load", ck, "--finetune", "--tokenizer-model", w["tok"]],
         "32000 pieces"),
    ], novocab


def _assert_clean_failure(rc, err, needle):
    assert rc not in (0, None), err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 2, err
    assert needle in err, err


def test_trainer_bad_inputs(world, capsys):
    from megatron_sat.training.main import main

    cases, novocab = _trainer_cases(world)
    for extra, needle in cases:
        base = novocab if "32000 pieces" in needle else TINY
        args = base + ["--data-path", world["data"], "--split", "90,10,0",
                       "--train-iters", "2"] + [str(a) for a in extra]
        rc = main([str(a) for a in args])
        _assert_clean_failure(rc, capsys.readouterr().err, needle)
    assert not (world["root"] / MARKER).exists()  # the malicious pickles never ran


def test_tool_bad_inputs(world, capsys):
    from megatron_sat.tools import (convert_checkpoint, eval_ppl, extend_vocab,
                                    fetch_demo_data, preprocess_data)

    r, tok = world["root"], world["tok"]
    out = r / "outputs"
    cases = [
        (preprocess_data, ["--input", r / "plain.txt", "--tokenizer-model", tok,
                           "--output-prefix", out / "p1", "--no-progress"], "--input-format text"),
        (preprocess_data, ["--input", r / "docs.jsonl", "--tokenizer-model", tok,
                           "--output-prefix", out / "p2", "--no-progress"], "--json-keys"),
        (preprocess_data, ["--input", r / "docs.jsonl", "--tokenizer-model", r / "lfs.model",
                           "--output-prefix", out / "p3", "--no-progress"], "git-lfs"),
        (convert_checkpoint, ["hf-to-megatron", "--load-dir", r / "hf_index", "--save-dir",
                              out / "c1"], "missing shard"),
        (convert_checkpoint, ["hf-to-megatron", "--load-dir", r / "hf_trunc", "--save-dir",
                              out / "c2"], "model.safetensors' is unreadable"),
        (convert_checkpoint, ["hf-to-megatron", "--load-dir", r / "hf_badcfg", "--save-dir",
                              out / "c3"], "config.json' is not valid JSON"),
        (convert_checkpoint, ["megatron-to-hf", "--load-dir", r / "trunc_weights",
                              "--save-dir", out / "c4"], "model.pt' is unreadable"),
        (convert_checkpoint, ["megatron-to-hf", "--load-dir", r / "evil", "--save-dir",
                              out / "c5"], "could run code"),
        (extend_vocab, ["--base-tokenizer", r / "text.model", "--zh-model", tok,
                        "--output-dir", out / "e1"], "text.model"),
        (extend_vocab, ["--base-tokenizer", tok, "--zh-model", tok, "--output-dir", out / "e2",
                        "--resize-checkpoint", r / "hf_badcfg", "--output-checkpoint",
                        out / "e2c"], "not valid JSON"),
        (eval_ppl, ["--load", r / "latest_missing", "--data", r / "plain.txt",
                    "--tokenizer-model", tok, "--no-progress"], "iter_0000009"),
        (eval_ppl, ["--load", r / "hf_trunc", "--data", r / "plain.txt",
                    "--tokenizer-model", tok, "--no-progress"], "unreadable"),
        (fetch_demo_data, ["--cache-dir", r / "plain.txt"], "plain.txt"),
    ]
    for tool, argv, needle in cases:
        rc = tool.main([str(a) for a in argv])
        _assert_clean_failure(rc, capsys.readouterr().err, needle)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written was left
    assert not (r / MARKER).exists()
    assert len(cases) + len(_trainer_cases(world)[0]) >= 20


def test_bom_crlf_jsonl_loses_no_record(tmp_path, demo_data):
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_sat.tools import preprocess_data

    docs = ["迈向充满希望的新世纪", "Hello world.", "中英 mixed 文本 123。"]
    body = "\r\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs) + "\r\n"
    src = tmp_path / "win.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert preprocess_data.main(["--input", str(src), "--tokenizer-model",
                                 str(demo_data.tokenizer_model), "--output-prefix",
                                 str(tmp_path / "o"), "--no-progress"]) == 0
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    sp = spm.SentencePieceProcessor(model_file=str(demo_data.tokenizer_model))
    assert [list(map(int, ds[i])) for i in range(len(ds))] == [sp.encode(d) for d in docs]


def test_file_checks_refuse_malicious_pickle_and_keep_safe_loads(tmp_path):
    from megatron_sat.tools.cli import ToolError
    from megatron_sat.tools.file_checks import load_torch_file

    torch.save({"w": torch.ones(3), "n": 1}, tmp_path / "ok.pt")
    assert torch.equal(load_torch_file(tmp_path / "ok.pt", "f", "fix")["w"], torch.ones(3))
    torch.save([_Evil(tmp_path)], tmp_path / "evil.pt")
    with pytest.raises(ToolError, match="exec.*could run code"):
        load_torch_file(tmp_path / "evil.pt", "f", "fix")
    assert not (tmp_path / MARKER).exists()
    assert os.path.getsize(tmp_path / "evil.pt") > 0
