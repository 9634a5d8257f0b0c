"""A megatron-core GPTModel built with the SAT spec trains on CPU at rate 0.5."""

import torch

from megatron_sat.config import SATConfig
from megatron_sat.control import (sat_external_parameters, sat_kept_fractions,
                                  set_sat_iteration)
from megatron_sat.model import LlamaShape, build_gpt_model


def test_gpt_model_with_sat_spec_trains(megatron_single):
    torch.manual_seed(0)
    shape = LlamaShape(2, 64, 176, 4, 2, vocab_size=256, max_position_embeddings=64)
    sat = SATConfig(schedule="constant", total_iters=20, attn_omission_rate=0.5,
                    mlp_omission_rate=0.5)
    model = build_gpt_model(shape, sat)
    model.train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 33), generator=g)
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(32).expand(2, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for it in range(20):
        assert set_sat_iteration(model, it) == (0.5, 0.5)
        loss = model(ids, pos, None, labels=labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert sat_kept_fractions(model) == {"attn_q": 0.5, "attn_kv": 1.0, "mlp": 0.5}
    # Parameters stay full size and SAT layers expose what ZeRO-3 must gather.
    assert model.decoder.layers[0].mlp.linear_fc1.weight.shape == (2 * 176, 64)
    assert len(sat_external_parameters(model)) == 2 * 4


def test_sat_and_dense_models_share_the_state_dict_layout(megatron_single):
    shape = LlamaShape(1, 32, 64, 4, 4, vocab_size=100, max_position_embeddings=16)
    dense = build_gpt_model(shape, None)
    sat = build_gpt_model(shape, SATConfig(total_iters=5))
    sat.load_state_dict(dense.state_dict())
    assert list(dense.state_dict()) == list(sat.state_dict())
    dense.eval(), sat.eval()
    ids = torch.randint(0, 100, (1, 8))
    pos = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(dense(ids, pos, None), sat(ids, pos, None))
