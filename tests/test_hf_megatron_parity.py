"""One method, two integrations: the HF layers keep the same heads and channels as the
megatron-core SAT layers for the same weights, tokens and (seed, iteration, layer)."""

import pytest
import torch

from megatron_sat.config import SATConfig
from megatron_sat.control import set_sat_iteration
from megatron_sat.hf import apply_sat
from megatron_sat.model import LlamaShape, build_gpt_model
from megatron_sat.tools.ckpt_format import load_state_dict_into
from megatron_sat.tools.llama_layout import hf_to_megatron
from test_hf_layers import tiny_llama

SHAPES = {"mha": (4, 4), "gqa2": (4, 2), "gqa4": (8, 2)}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("metric,selection", [("maxip", "sampling"), ("wanda", "topk"),
                                              ("magnitude", "sampling")])
def test_same_kept_units_as_megatron(megatron_single, name, metric, selection):
    heads, kv = SHAPES[name]
    hf = tiny_llama(heads, kv, layers=3, seed=2)
    c = hf.config
    shape = LlamaShape(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                       ffn_hidden_size=c.intermediate_size, num_attention_heads=heads,
                       num_query_groups=kv, vocab_size=c.vocab_size,
                       max_position_embeddings=c.max_position_embeddings,
                       norm_epsilon=c.rms_norm_eps)
    sat = SATConfig(metric=metric, selection=selection, attn_omission_rate=0.5,
                    mlp_omission_rate=0.5, schedule="ladder", total_iters=12, seed=11)
    mg = build_gpt_model(shape, sat=sat)
    load_state_dict_into(mg, hf_to_megatron(hf.state_dict(), shape, tp=1)[0])
    apply_sat(hf, sat)
    hf.train()
    mg.train()
    ids = torch.randint(0, c.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(12).unsqueeze(0).expand_as(ids)
    compared = 0
    for t in (0, 1, 5):  # two rungs of the ladder (ρ = 0.5, then 0.375)
        set_sat_iteration(hf, t)
        set_sat_iteration(mg, t)
        hf(ids)
        mg(ids, pos, None)
        for hl, ml in zip(hf.model.layers, mg.decoder.layers):
            for a, b in ((hl.self_attn, ml.self_attention), (hl.mlp, ml.mlp)):
                sel_hf, sel_mg = a.sat_state.cached_selection(), b.sat_state.cached_selection()
                assert sel_hf is not None and sel_mg is not None
                sel_hf = sel_hf if isinstance(sel_hf, tuple) else (sel_hf,)
                sel_mg = sel_mg if isinstance(sel_mg, tuple) else (sel_mg,)
                for x, y in zip(sel_hf, sel_mg):
                    assert torch.equal(x, y), (t, type(a).__name__)
                compared += 1
                assert a.sat_state.rate == b.sat_state.rate > 0
    assert compared == 3 * 3 * 2
