"""SAT attention / MLP vs float64 masked-dense references, and rate-0 bit identity (§4)."""

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import build_module

from megatron_sat.config import SATConfig
from megatron_sat.control import set_sat_iteration
from megatron_sat.model import LlamaShape, transformer_config
from megatron_sat.spec import get_sat_layer_spec
from sat_reference import masked_attention, masked_swiglu, masks_from_kept

SHAPES = {  # name: (heads, groups, head_dim)
    "mha": (4, 4, 8),
    "gqa2": (8, 4, 8),
    "gqa4": (8, 2, 8),
}


def make_config(heads, groups, d, dtype=torch.float64):
    shape = LlamaShape(1, heads * d, 48, heads, groups)
    return transformer_config(shape, params_dtype=dtype)


def build_attention(config, sat):
    spec = get_sat_layer_spec(sat).submodules.self_attention
    return build_module(spec, config=config, layer_number=3)


def build_mlp(config, sat):
    spec = get_sat_layer_spec(sat).submodules.mlp
    mlp = build_module(spec, config=config)
    if hasattr(mlp, "set_layer_number"):
        mlp.set_layer_number(3)
    return mlp


def sat_cfg(rho, **kw):
    base = dict(schedule="constant", attn_omission_rate=rho, mlp_omission_rate=rho,
                total_iters=100, metric="maxip", selection="sampling")
    base.update(kw)
    return SATConfig(**base)


def inputs(config, s=8, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, b, config.hidden_size, generator=g, dtype=torch.float64)
    r = torch.randn(s, b, config.hidden_size, generator=g, dtype=torch.float64)
    freqs = RotaryEmbedding(config.kv_channels, rotary_percent=1.0,
                            use_cpu_initialization=True)(s)
    return x, r, freqs


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("rho", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("metric", ["maxip", "wanda"])
def test_attention_equals_masked_dense(megatron_single, name, rho, metric):
    heads, groups, d = SHAPES[name]
    config = make_config(heads, groups, d)
    attn = build_attention(config, sat_cfg(rho, metric=metric))
    attn.train()
    set_sat_iteration(attn, 5)
    x, r, freqs = inputs(config)
    x.requires_grad_(True)
    out, bias = attn(x, None, rotary_pos_emb=freqs)
    assert bias is None
    (out * r).sum().backward()

    kept_groups, kept_q = attn.sat_select(x.detach())  # same (seed, t, l, r): same draw
    q = heads // groups
    if q == 1:
        assert kept_groups.numel() == max(1, int((1 - rho) * groups + 0.5))
    else:
        assert kept_groups.numel() == groups
        assert kept_q.shape[1] == max(1, int((1 - rho) * q + 0.5))
    row_m, col_m = masks_from_kept(groups, q, d, kept_groups, kept_q)
    w_qkv = attn.linear_qkv.weight.detach().clone().requires_grad_(True)
    w_proj = attn.linear_proj.weight.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = masked_attention(x_ref, w_qkv, w_proj, row_m, col_m, groups, q, d, freqs)
    (ref * r).sum().backward()

    assert (out - ref).abs().max().item() < 1e-10
    assert (attn.linear_qkv.weight.grad - w_qkv.grad).abs().max().item() < 1e-10
    assert (attn.linear_proj.weight.grad - w_proj.grad).abs().max().item() < 1e-10
    assert (x.grad - x_ref.grad).abs().max().item() < 1e-10
    # Omitted slices get exactly zero.
    assert torch.all(attn.linear_qkv.weight.grad[row_m == 0] == 0)
    assert torch.all(attn.linear_proj.weight.grad[:, col_m == 0] == 0)
    assert attn.linear_qkv.weight.grad.shape == attn.linear_qkv.weight.shape


@pytest.mark.parametrize("rho", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("metric", ["maxip", "magnitude", "uniform"])
@pytest.mark.parametrize("selection", ["sampling", "topk"])
def test_mlp_equals_masked_dense(megatron_single, rho, metric, selection):
    config = make_config(4, 4, 8)
    mlp = build_mlp(config, sat_cfg(rho, metric=metric, selection=selection))
    mlp.train()
    set_sat_iteration(mlp, 2)
    x, r, _ = inputs(config, seed=1)
    x.requires_grad_(True)
    out, bias = mlp(x)
    assert bias is None
    (out * r).sum().backward()
    kept = mlp.sat_select(x.detach())
    f = config.ffn_hidden_size
    assert kept.numel() == max(1, int((1 - rho) * f + 0.5))
    mask = torch.zeros(f, dtype=torch.float64)
    mask[kept] = 1
    w1 = mlp.linear_fc1.weight.detach().clone().requires_grad_(True)
    w2 = mlp.linear_fc2.weight.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = masked_swiglu(x_ref, w1, w2, mask)
    (ref * r).sum().backward()
    assert (out - ref).abs().max().item() < 1e-10
    assert (mlp.linear_fc1.weight.grad - w1.grad).abs().max().item() < 1e-10
    assert (mlp.linear_fc2.weight.grad - w2.grad).abs().max().item() < 1e-10
    assert (x.grad - x_ref.grad).abs().max().item() < 1e-10
    m2 = torch.cat([mask, mask])
    assert torch.all(mlp.linear_fc1.weight.grad[m2 == 0] == 0)
    assert torch.all(mlp.linear_fc2.weight.grad[:, mask == 0] == 0)


def test_topk_attention_keeps_highest_scoring_heads(megatron_single):
    config = make_config(8, 2, 8)
    attn = build_attention(config, sat_cfg(0.5, selection="topk", metric="magnitude"))
    with torch.no_grad():  # make heads 1 and 6 clearly the most important in their groups
        w = attn.linear_qkv.weight.view(2, 6, 8, -1)
        w[0, 1] *= 10
        w[1, 2] *= 10  # local head 2 of group 1 = global head 6
    x, _, _ = inputs(config)
    _, kept_q = attn.sat_select(x)
    assert kept_q.shape == (2, 2)
    assert 1 in kept_q[0].tolist() and 2 in kept_q[1].tolist()


@pytest.mark.parametrize("name", list(SHAPES))
def test_rate_zero_is_bit_identical_to_stock(megatron_single, name):
    heads, groups, d = SHAPES[name]
    config = make_config(heads, groups, d)
    stock_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    for sat in (sat_cfg(0.0), sat_cfg(0.5, enabled=False)):
        stock_attn = build_module(stock_spec.submodules.self_attention, config=config,
                                  layer_number=3)
        sat_attn = build_attention(config, sat)
        sat_attn.load_state_dict(stock_attn.state_dict())
        stock_mlp = build_module(stock_spec.submodules.mlp, config=config)
        sat_mlp = build_mlp(config, sat)
        sat_mlp.load_state_dict(stock_mlp.state_dict())
        x, r, freqs = inputs(config, seed=3)
        outs = []
        for attn, mlp in ((stock_attn, stock_mlp), (sat_attn, sat_mlp)):
            attn.train(), mlp.train()
            xi = x.clone().requires_grad_(True)
            a, _ = attn(xi, None, rotary_pos_emb=freqs)
            m, _ = mlp(a)
            (m * r).sum().backward()
            grads = [p.grad.clone() for p in list(attn.parameters()) + list(mlp.parameters())]
            outs.append((a, m, xi.grad, grads))
        (a0, m0, g0, p0), (a1, m1, g1, p1) = outs
        assert torch.equal(a0, a1) and torch.equal(m0, m1) and torch.equal(g0, g1)
        assert all(torch.equal(u, v) for u, v in zip(p0, p1))


def test_eval_mode_is_dense(megatron_single):
    config = make_config(4, 4, 8)
    attn = build_attention(config, sat_cfg(0.5))
    dense = build_attention(config, sat_cfg(0.5, enabled=False))
    dense.load_state_dict(attn.state_dict())
    attn.eval(), dense.eval()
    x, _, freqs = inputs(config)
    with torch.no_grad():
        assert torch.equal(attn(x, None, rotary_pos_emb=freqs)[0],
                           dense(x, None, rotary_pos_emb=freqs)[0])
    assert attn.sat_state.last_kept == attn.sat_state.last_total


def test_selection_frequency_is_recorded(megatron_single):
    from megatron_sat.control import set_track_frequency

    config = make_config(8, 2, 8)
    attn = build_attention(config, sat_cfg(0.5))
    set_track_frequency(attn)
    attn.train()
    x, _, freqs = inputs(config)
    for t in range(4):
        set_sat_iteration(attn, t)
        attn(x, None, rotary_pos_emb=freqs)
    assert attn.sat_state.frequency.sum().item() == 4 * 4  # 2 groups x 2 kept, 4 steps
    assert attn.sat_state.last_kept == 4 and attn.sat_state.last_total == 8
