"""tools/preprocess_data.py: Megatron .bin/.idx that megatron-core reads, equal to
sentencepiece's own encodings; broken records counted per reason; workers byte-identical."""

import json
import struct

import numpy as np
import pytest

from tools_helpers import assert_one_line_error, demo_data, run_tool  # noqa: F401

from megatron_sat.tools import preprocess_data


def _read_dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix), mmap=True)
    return [np.asarray(ds[i]).tolist() for i in range(len(ds))], ds


def _sp(path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def test_jsonl_roundtrip_equals_sentencepiece(tmp_path, demo_data):
    docs = ["迈向充满希望的新世纪", "Hello world, this is English.", "中英 mixed 文本 123。",
            "第二行\n有换行"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d, "id": i}, ensure_ascii=False) + "\n"
                           for i, d in enumerate(docs)), encoding="utf-8")
    sp = _sp(demo_data.tokenizer_model)
    for flags, bos, eod in (([], False, False), (["--append-eod", "--bos"], True, True)):
        prefix = tmp_path / f"out{len(flags)}"
        assert preprocess_data.main(["--input", str(src), "--tokenizer-model",
                                     str(demo_data.tokenizer_model), "--output-prefix",
                                     str(prefix), "--no-progress", *flags]) == 0
        got, ds = _read_dataset(f"{prefix}_text_document")
        want = [([sp.bos_id()] if bos else []) + sp.encode(d) + ([sp.eos_id()] if eod else [])
                for d in docs]
        assert got == want
        assert ds.index.dtype == np.uint16  # vocab 32000 < 65500
        assert list(ds.document_indices) == list(range(len(docs) + 1))


def test_idx_header_layout(tmp_path, demo_data):
    src = tmp_path / "in.txt"
    src.write_text("一\n二三\n", encoding="utf-8")
    preprocess_data.main(["--input", str(src), "--input-format", "text", "--tokenizer-model",
                          str(demo_data.tokenizer_model), "--output-prefix", str(tmp_path / "o"),
                          "--no-progress"])
    raw = (tmp_path / "o_text_document.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, seqs, doc_entries = struct.unpack("<QBQQ", raw[9:34])
    assert (version, code, seqs, doc_entries) == (1, 8, 2, 3)
    sizes = np.frombuffer(raw, np.int32, 2, 34)
    pointers = np.frombuffer(raw, np.int64, 2, 34 + 8)
    doc_idx = np.frombuffer(raw, np.int64, 3, 34 + 8 + 16)
    assert pointers.tolist() == [0, 2 * int(sizes[0])]
    assert doc_idx.tolist() == [0, 1, 2]
    assert len(raw) == 34 + 8 + 16 + 24


def test_broken_records_are_counted_and_skipped(tmp_path, demo_data):
    good = ["第一条好数据", "second good record", "第三条"]
    lines = [
        json.dumps({"text": good[0]}, ensure_ascii=False).encode(),
        b'{"text": "unterminated',  # bad JSON
        json.dumps({"body": "no text key"}).encode(),  # missing key
        b'{"text": "bad \xff\xfe utf8"}',  # invalid UTF-8
        json.dumps({"text": good[1]}).encode(),
        json.dumps({"text": ""}).encode(),  # empty
        json.dumps({"text": "   "}).encode(),  # empty after strip
        b"[1, 2, 3]",  # not an object -> missing key
        json.dumps({"text": 5}).encode(),  # not a string -> missing key
        b"not json at all",  # bad JSON
        json.dumps({"text": good[2]}, ensure_ascii=False).encode(),
    ]
    src = tmp_path / "broken.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    cfg = preprocess_data.PreprocessConfig(
        inputs=(str(src),), output_prefix=str(tmp_path / "b"),
        tokenizer_model=str(demo_data.tokenizer_model), append_eod=True, show_progress=False)
    report = preprocess_data.preprocess(cfg)
    d = report.datasets[0]
    assert report.records == len(lines)
    assert dict(d.skipped) == {"bad_json": 2, "missing_key": 3, "invalid_utf8": 1, "empty": 2}
    assert d.documents == 3
    sp = _sp(demo_data.tokenizer_model)
    got, _ = _read_dataset(tmp_path / "b_text_document")
    assert got == [sp.encode(g) + [sp.eos_id()] for g in good]
    assert d.characters == sum(len(g) for g in good)
    assert d.text_tokens == sum(len(sp.encode(g)) for g in good)


def test_workers_byte_identical_with_cleaning(tmp_path, demo_data):
    lines = demo_data.zh_reviews.read_text(encoding="utf-8").splitlines()[:1500]
    src = tmp_path / "rev.txt"
    src.write_text("\n".join(lines + lines[:50] + ["", "短"]) + "\n", encoding="utf-8")
    outs = []
    for w in (1, 2):
        prefix = tmp_path / f"w{w}"
        rc = preprocess_data.main(
            ["--input", str(src), "--input-format", "text", "--tokenizer-model",
             str(demo_data.tokenizer_model), "--output-prefix", str(prefix), "--append-eod",
             "--nfkc", "--collapse-whitespace", "--min-chars", "2", "--dedup",
             "--workers", str(w), "--chunk-size", "16", "--no-progress"])
        assert rc == 0
        outs.append([(tmp_path / f"w{w}_text_document{s}").read_bytes() for s in (".bin", ".idx")])
    assert outs[0] == outs[1]
    got, _ = _read_dataset(tmp_path / "w1_text_document")
    assert len(got) == len(set(lines)) - (1 if "短" in lines else 0)


def test_paragraph_mode_and_hf_tokenizer(tmp_path, demo_data):
    from megatron_sat.tools.vocab_merge import read_model_proto, write_tokenizer_folder

    tok_dir = tmp_path / "tok"
    write_tokenizer_folder(tok_dir, read_model_proto(demo_data.tokenizer_model))
    paras = ["第一段第一行\n第一段第二行", "Second paragraph,\nwith two lines."]
    src = tmp_path / "p.txt"
    src.write_text("\n\n\n".join(paras) + "\n", encoding="utf-8")
    preprocess_data.main(["--input", str(src), "--input-format", "text", "--split-mode",
                          "paragraph", "--tokenizer-type", "HFTokenizer", "--tokenizer-model",
                          str(tok_dir), "--output-prefix", str(tmp_path / "p"), "--no-progress"])
    got, _ = _read_dataset(tmp_path / "p_text_document")
    sp = _sp(demo_data.tokenizer_model)
    assert got == [sp.encode(p) for p in paras]


def test_bad_input_errors(tmp_path, demo_data, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "x"}\n')
    base = ["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--no-progress"]
    assert_one_line_error(preprocess_data.main(base + ["--tokenizer-model", str(tmp_path / "nope")]),
                          capsys.readouterr().err, "tokenizer", "--tokenizer-model")
    assert preprocess_data.main(base + ["--tokenizer-model", str(demo_data.tokenizer_model)]) == 0
    capsys.readouterr()
    assert_one_line_error(preprocess_data.main(base + ["--tokenizer-model",
                                                       str(demo_data.tokenizer_model)]),
                          capsys.readouterr().err, "already exists", "--overwrite")
    assert preprocess_data.main(base + ["--overwrite", "--tokenizer-model",
                                        str(demo_data.tokenizer_model)]) == 0
    try:
        import opencc  # noqa: F401
    except ImportError:
        capsys.readouterr()
        rc = preprocess_data.main(base + ["--overwrite", "--t2s", "--tokenizer-model",
                                          str(demo_data.tokenizer_model)])
        assert_one_line_error(rc, capsys.readouterr().err, "OpenCC", "pip install")


def test_cli_help_and_script_error(capsys):
    with pytest.raises(SystemExit) as exc:
        preprocess_data.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "examples:" in out and "--no-bos" in out
    res = run_tool("preprocess_data.py", "--input", "/nonexistent.jsonl", "--output-prefix",
                   "/tmp/x", "--tokenizer-model", "/nonexistent.model")
    assert_one_line_error(res.returncode, res.stderr, "not found")
