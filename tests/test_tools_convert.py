"""tools/convert_checkpoint.py against HF transformers: logits equality at TP=1 and TP=2
(2 real gloo processes), bit-exact round trips with vocabulary padding trimmed, errors."""

import json

import pytest
import torch
from dist_utils import run_distributed

from tools_helpers import (assert_one_line_error, hf_logits, make_tiny_hf_llama,  # noqa: F401
                           megatron_logits_tp, run_tool)

from megatron_sat.tools import convert_checkpoint as cc
from megatron_sat.tools.ckpt_format import load_megatron_checkpoint, load_state_dict_into
from megatron_sat.tools.hf_llama import load_hf_state_dict

VOCAB = 300  # not a multiple of 128: padding is exercised (304 → 384 at TP=1, 512 at TP=2)
MODELS = {"mha": dict(heads=4, kv_heads=4), "gqa": dict(heads=8, kv_heads=4)}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, kw) in enumerate(MODELS.items()):
        make_tiny_hf_llama(root / name, vocab=VOCAB, seed=i, **kw)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_to_megatron_tp1_logits_match_hf(name, hf_models, ids, tmp_path, megatron_single):
    from megatron_sat.model import build_gpt_model

    cc.convert_hf_to_megatron(hf_models[name], tmp_path / "mg", target_tp=1)
    ckpt = load_megatron_checkpoint(tmp_path / "mg")
    assert ckpt.shape.vocab_size == VOCAB and ckpt.padded_vocab_size == 384
    assert ckpt.meta["shape"]["num_query_groups"] == MODELS[name]["kv_heads"]
    model = build_gpt_model(ckpt.shape, tp=1).eval()
    load_state_dict_into(model, ckpt.model(0))
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        got = model(ids, pos, None)[..., :VOCAB]
    want = hf_logits(hf_models[name], ids)
    assert want.abs().max() > 1.0  # logits are not trivially small
    assert (got - want).abs().max() < 1e-4


def test_hf_to_megatron_tp2_logits_match_hf(hf_models, ids, tmp_path):
    jobs = []
    for name in MODELS:
        cc.convert_hf_to_megatron(hf_models[name], tmp_path / name, target_tp=2)
        ckpt = load_megatron_checkpoint(tmp_path / name)
        assert ckpt.tp == 2 and ckpt.padded_vocab_size == 512
        jobs.append((str(tmp_path / name), str(tmp_path / f"{name}.pt")))
    run_distributed(megatron_logits_tp, 2, jobs, ids, tmp_path=tmp_path)
    for name in MODELS:
        got = torch.load(tmp_path / f"{name}.pt")
        want = hf_logits(hf_models[name], ids)
        assert (got - want).abs().max() < 1e-4, name


@pytest.mark.parametrize("name,tp,dtype", [("mha", 1, "auto"), ("gqa", 2, "auto"),
                                           ("gqa", 2, "bf16")])
def test_roundtrip_bit_exact_and_padding_trimmed(name, tp, dtype, hf_models, tmp_path):
    src = hf_models[name]
    cc.convert_hf_to_megatron(src, tmp_path / "mg", target_tp=tp, dtype=dtype)
    rep = cc.convert_megatron_to_hf(tmp_path / "mg", tmp_path / "back")
    assert rep.vocab_size == VOCAB
    a, b = load_hf_state_dict(src), load_hf_state_dict(tmp_path / "back")
    assert set(a) == set(b)
    for k in a:
        want = a[k].to(torch.bfloat16) if dtype == "bf16" else a[k]
        assert b[k].dtype == want.dtype and torch.equal(b[k], want), k
    assert b["model.embed_tokens.weight"].shape[0] == VOCAB
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["vocab_size"] == VOCAB and cfg["num_key_value_heads"] == MODELS[name]["kv_heads"]
    if dtype == "auto":  # transformers reads the exported folder and gives the same logits
        ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
        assert torch.equal(hf_logits(src, ids), hf_logits(tmp_path / "back", ids))


def test_reshard_equals_direct_conversion(hf_models, tmp_path):
    src = hf_models["gqa"]
    cc.convert_hf_to_megatron(src, tmp_path / "tp2", target_tp=2)
    cc.convert_hf_to_megatron(src, tmp_path / "tp1", target_tp=1)
    assert cc.main(["megatron-to-megatron", "--load-dir", str(tmp_path / "tp2"), "--save-dir",
                    str(tmp_path / "re1"), "--target-tp", "1"]) == 0
    direct, re1 = (load_megatron_checkpoint(tmp_path / p).model(0) for p in ("tp1", "re1"))
    assert set(direct) == set(re1)
    assert all(torch.equal(direct[k], re1[k]) for k in direct)


def test_checkpoint_records_shape_and_layout(hf_models, tmp_path):
    cc.convert_hf_to_megatron(hf_models["gqa"], tmp_path / "mg", target_tp=2)
    root = tmp_path / "mg"
    assert (root / "latest").read_text().strip() == "iter_0000000"
    meta = json.loads((root / "iter_0000000" / "meta.json").read_text())
    assert meta["tp"] == 2 and meta["padded_vocab_size"] == 512
    assert meta["shape"]["vocab_size"] == VOCAB and meta["hf_config"]["model_type"] == "llama"
    payload = torch.load(root / "iter_0000000" / "mp_rank_01" / "model.pt", weights_only=True)
    assert payload["tp"] == 2 and payload["padded_vocab_size"] == 512
    assert payload["model"]["embedding.word_embeddings.weight"].shape == (256, 64)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp leftovers


def test_bad_inputs_one_line_errors(hf_models, tmp_path, capsys):
    src = str(hf_models["gqa"])
    # TP that does not divide the heads/groups
    assert_one_line_error(cc.main(["hf-to-megatron", "--load-dir", src, "--save-dir",
                                   str(tmp_path / "x"), "--target-tp", "3"]),
                          capsys.readouterr().err, "does not divide", "TP")
    assert not (tmp_path / "x").exists()
    # another architecture
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                   "architectures": ["GPT2LMHeadModel"]}))
    assert_one_line_error(cc.main(["hf-to-megatron", "--load-dir", str(other), "--save-dir",
                                   str(tmp_path / "y")]),
                          capsys.readouterr().err, "gpt2", "LlamaForCausalLM")
    # existing output folder
    (tmp_path / "exists").mkdir()
    assert_one_line_error(cc.main(["hf-to-megatron", "--load-dir", src, "--save-dir",
                                   str(tmp_path / "exists")]),
                          capsys.readouterr().err, "already exists", "--overwrite")
    # not a checkpoint at all
    assert_one_line_error(cc.main(["megatron-to-hf", "--load-dir", str(tmp_path / "exists"),
                                   "--save-dir", str(tmp_path / "z")]),
                          capsys.readouterr().err, "no megatron-sat checkpoint")
    # same through the script: non-zero exit, one line, no traceback
    res = run_tool("convert_checkpoint.py", "hf-to-megatron", "--load-dir", str(other),
                   "--save-dir", str(tmp_path / "w"))
    assert_one_line_error(res.returncode, res.stderr, "not Llama")
