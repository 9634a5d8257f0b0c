"""tools/fetch_demo_data.py: real files, pinned checksums, idempotent second run."""

from tools_helpers import demo_data  # noqa: F401

from megatron_sat.tools import fetch_demo_data as fd


def test_fetched_files_verified_and_idempotent(demo_data):
    for asset in fd.ASSETS:
        path = demo_data.cache_dir / asset.name
        assert fd.sha256_file(path) == asset.sha256
    mtimes = {a.name: (demo_data.cache_dir / a.name).stat().st_mtime_ns for a in fd.ASSETS}
    logs = []
    again = fd.fetch_demo_data(demo_data.cache_dir, log=logs.append)  # must not download
    assert again == demo_data
    assert all(line.startswith("ok ") for line in logs) and len(logs) == len(fd.ASSETS)
    assert mtimes == {a.name: (demo_data.cache_dir / a.name).stat().st_mtime_ns
                      for a in fd.ASSETS}
    assert fd.demo_paths(demo_data.cache_dir) == demo_data


def test_demo_text_content(demo_data):
    news = demo_data.zh_news.read_text(encoding="utf-8").splitlines()
    assert news[0] == "迈向充满希望的新世纪——一九九八年新年讲话(附图片1张)"
    assert not any("/n " in l or "/v " in l for l in news[:200])  # tags stripped
    assert "１" not in "".join(news[:200])  # NFKC folded full-width digits
    assert len(demo_data.zh_reviews.read_text(encoding="utf-8").splitlines()) > 30000
    assert "Botchan" in demo_data.en_botchan.read_text(encoding="utf-8")[:200]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(demo_data.tokenizer_model))
    assert (sp.get_piece_size(), sp.bos_id(), sp.eos_id()) == (32000, 1, 2)


def test_strip_pos_tags_handles_brackets():
    line = "[中国/ns  政府/n]nt  宣布/v  ，/w  １９９８年/t"
    assert fd.strip_pos_tags(line) == "中国政府宣布，１９９８年"


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv(fd.CACHE_ENV, str(tmp_path / "c"))
    assert fd.default_cache_dir() == tmp_path / "c"
    assert fd.demo_paths().tokenizer_model == tmp_path / "c" / "tokenizer.model"
