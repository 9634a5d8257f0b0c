"""Every tool: ``--help`` with examples; HF I/O edge cases (shards, tied embeddings)."""

import importlib

import pytest
import torch

from tools_helpers import demo_data, make_tiny_hf_llama  # noqa: F401

TOOLS = ["fetch_demo_data", "preprocess_data", "extend_vocab", "convert_checkpoint", "eval_ppl"]


@pytest.mark.parametrize("tool", TOOLS)
def test_help_has_examples(tool, capsys):
    mod = importlib.import_module(f"megatron_sat.tools.{tool}")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "examples:" in out and f"{tool}.py" in out


def test_fetch_cli_verifies_cache(demo_data, capsys):
    from megatron_sat.tools import fetch_demo_data

    assert fetch_demo_data.main(["--cache-dir", str(demo_data.cache_dir)]) == 0
    out = capsys.readouterr().out
    assert str(demo_data.tokenizer_model) in out and "verified" in out


def test_sharded_safetensors_roundtrip(tmp_path):
    from megatron_sat.tools.hf_llama import load_hf_state_dict, read_hf_config, save_hf_checkpoint

    make_tiny_hf_llama(tmp_path / "hf", vocab=64, hidden=16, ffn=32, heads=2, kv_heads=1)
    sd, cfg = load_hf_state_dict(tmp_path / "hf"), read_hf_config(tmp_path / "hf")
    save_hf_checkpoint(tmp_path / "sharded", sd, cfg, max_shard_bytes=8000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    back = load_hf_state_dict(tmp_path / "sharded")
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_tied_embeddings_become_untied_output(tmp_path):
    from megatron_sat.tools import llama_layout
    from megatron_sat.tools.hf_llama import load_hf_checkpoint

    make_tiny_hf_llama(tmp_path / "hf", vocab=64, hidden=16, ffn=32, heads=2, kv_heads=1)
    shape, _, sd = load_hf_checkpoint(tmp_path / "hf")
    del sd["lm_head.weight"]  # what a tied checkpoint stores
    (rank,) = llama_layout.hf_to_megatron(sd, shape, tp=1)
    assert torch.equal(rank["output_layer.weight"][:64], sd["model.embed_tokens.weight"])
    assert rank["output_layer.weight"].data_ptr() != rank["embedding.word_embeddings.weight"].data_ptr()
