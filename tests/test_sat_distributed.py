"""SAT layers with real processes on gloo: TP=2 against a masked-dense reference, and
DP=2 with ``dp_consistent`` choosing identical sub-networks (SAT_SPEC §3, §4)."""

import os

import pytest
import torch

from dist_utils import run_distributed
from sat_reference import masked_attention, masked_swiglu, masks_from_kept

HEADS, D, FFN = 8, 8, 48
H = HEADS * D


def full_weights(groups):
    g = torch.Generator().manual_seed(42)
    q = HEADS // groups
    return {
        "qkv": torch.randn(groups * (q + 2) * D, H, generator=g, dtype=torch.float64) * 0.2,
        "proj": torch.randn(H, HEADS * D, generator=g, dtype=torch.float64) * 0.2,
        "fc1": torch.randn(2 * FFN, H, generator=g, dtype=torch.float64) * 0.2,
        "fc2": torch.randn(H, FFN, generator=g, dtype=torch.float64) * 0.2,
        "x": torch.randn(6, 2, H, generator=g, dtype=torch.float64),
        "r": torch.randn(6, 2, H, generator=g, dtype=torch.float64),
    }


def build_layers(groups, tp, rho):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_sat.config import SATConfig
    from megatron_sat.model import LlamaShape, transformer_config
    from megatron_sat.spec import get_sat_layer_spec

    config = transformer_config(LlamaShape(1, H, FFN, HEADS, groups), tp=tp,
                                params_dtype=torch.float64)
    sat = SATConfig(schedule="constant", attn_omission_rate=rho, mlp_omission_rate=rho,
                    total_iters=10)
    spec = get_sat_layer_spec(sat)
    attn = build_module(spec.submodules.self_attention, config=config, layer_number=2)
    mlp = build_module(spec.submodules.mlp, config=config)
    mlp.set_layer_number(2)
    return config, attn, mlp


def tp_worker(rank, world, tmpdir, groups, rho):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_sat.control import set_sat_iteration
    from megatron_sat.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=2)
    w = full_weights(groups)
    config, attn, mlp = build_layers(groups, 2, rho)
    q = HEADS // groups
    rows_per_rank = w["qkv"].shape[0] // 2  # whole groups per rank, contiguous
    f = FFN // 2
    with torch.no_grad():
        attn.linear_qkv.weight.copy_(w["qkv"][rank * rows_per_rank:(rank + 1) * rows_per_rank])
        attn.linear_proj.weight.copy_(w["proj"][:, rank * H // 2:(rank + 1) * H // 2])
        mlp.linear_fc1.weight.copy_(torch.cat([w["fc1"][rank * f:(rank + 1) * f],
                                               w["fc1"][FFN + rank * f:FFN + (rank + 1) * f]]))
        mlp.linear_fc2.weight.copy_(w["fc2"][:, rank * f:(rank + 1) * f])
    attn.train(), mlp.train()
    set_sat_iteration(attn, 3), set_sat_iteration(mlp, 3)
    freqs = RotaryEmbedding(D, rotary_percent=1.0, use_cpu_initialization=True)(6)
    x = w["x"].clone().requires_grad_(True)
    a, _ = attn(x, None, rotary_pos_emb=freqs)
    m, _ = mlp(x)
    ((a + m) * w["r"]).sum().backward()
    kept_groups, kept_q = attn.sat_select(x.detach())
    kept_channels = mlp.sat_select(x.detach())
    torch.save({
        "attn": a.detach(), "mlp": m.detach(), "xgrad": x.grad,
        "qkv_grad": attn.linear_qkv.weight.grad, "proj_grad": attn.linear_proj.weight.grad,
        "fc1_grad": mlp.linear_fc1.weight.grad, "fc2_grad": mlp.linear_fc2.weight.grad,
        "kept_groups": kept_groups + rank * (groups // 2), "kept_q": kept_q,
        "kept_channels": kept_channels + rank * f,
        "counts": (attn.sat_state.last_kept, mlp.sat_state.last_kept),
    }, os.path.join(tmpdir, f"rank{rank}.pt"))


@pytest.mark.parametrize("groups", [8, 4])  # MHA, and GQA with 2 query heads per group
def test_tp2_equals_single_process_masked_dense(tmp_path, groups):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_sat import cpu_shim

    cpu_shim.install()
    rho = 0.5
    run_distributed(tp_worker, 2, str(tmp_path), groups, rho, tmp_path=tmp_path)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert res[0]["counts"] == res[1]["counts"]  # every rank keeps the same count
    w = full_weights(groups)
    q = HEADS // groups
    kept_groups = torch.cat([r["kept_groups"] for r in res])
    kept_q = torch.cat([r["kept_q"] for r in res])
    row_m, col_m = masks_from_kept(groups, q, D, kept_groups, kept_q)
    ch = torch.zeros(FFN, dtype=torch.float64)
    ch[torch.cat([r["kept_channels"] for r in res])] = 1
    freqs = RotaryEmbedding(D, rotary_percent=1.0, use_cpu_initialization=True)(6)
    params = {k: w[k].clone().requires_grad_(True) for k in ("qkv", "proj", "fc1", "fc2", "x")}
    a = masked_attention(params["x"], params["qkv"], params["proj"], row_m, col_m, groups, q, D,
                         freqs)
    m = masked_swiglu(params["x"], params["fc1"], params["fc2"], ch)
    ((a + m) * w["r"]).sum().backward()
    f = FFN // 2
    for r in res:
        assert (r["attn"] - a).abs().max() < 1e-10 and (r["mlp"] - m).abs().max() < 1e-10
        assert (r["xgrad"] - params["x"].grad).abs().max() < 1e-10
    gathered = {
        "qkv": torch.cat([r["qkv_grad"] for r in res]),
        "proj": torch.cat([r["proj_grad"] for r in res], dim=1),
        "fc1": torch.cat([res[0]["fc1_grad"][:f], res[1]["fc1_grad"][:f],
                          res[0]["fc1_grad"][f:], res[1]["fc1_grad"][f:]]),
        "fc2": torch.cat([r["fc2_grad"] for r in res], dim=1),
    }
    for k, g in gathered.items():
        assert (g - params[k].grad).abs().max() < 1e-10, k


DP_COMBOS = [(m, s, gas) for m in ("maxip", "wanda") for s in ("topk", "sampling")
             for gas in (1, 2)] + [("magnitude", "sampling", 2), ("uniform", "sampling", 1)]


def dp_data(rank, mb):
    g = torch.Generator().manual_seed(100 + 10 * rank + mb)  # different data per DP rank
    return torch.randn(6, 2, H, generator=g, dtype=torch.float64) * (1 + rank) + 0.3 * mb


def dp_layers(metric, selection, groups=2):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_sat.config import SATConfig
    from megatron_sat.model import LlamaShape, transformer_config
    from megatron_sat.spec import get_sat_layer_spec

    config = transformer_config(LlamaShape(1, H, FFN, HEADS, groups), params_dtype=torch.float64)
    sat = SATConfig(schedule="constant", attn_omission_rate=0.5, mlp_omission_rate=0.5,
                    total_iters=10, metric=metric, selection=selection)
    spec = get_sat_layer_spec(sat)
    torch.manual_seed(0)  # identical weights on both replicas
    attn = build_module(spec.submodules.self_attention, config=config, layer_number=2)
    mlp = build_module(spec.submodules.mlp, config=config)
    mlp.set_layer_number(2)
    attn.train(), mlp.train()
    return attn, mlp


def dp_worker(rank, world, tmpdir):
    import torch.distributed as dist
    from megatron.core import tensor_parallel
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_sat.control import set_sat_iteration
    from megatron_sat.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=1)
    calls = []
    real_all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(1) or real_all_reduce(*a, **k)
    freqs = RotaryEmbedding(D, rotary_percent=1.0, use_cpu_initialization=True)(6)
    out = {}
    for metric, selection, gas in DP_COMBOS:
        attn, mlp = dp_layers(metric, selection)
        set_sat_iteration(attn, 7), set_sat_iteration(mlp, 7)
        kept, counts = [], []
        for mb in range(gas):
            n0 = len(calls)
            x = dp_data(rank, mb).requires_grad_(True)
            a, _ = attn(x, None, rotary_pos_emb=freqs)
            m, _ = mlp(x)
            (a + m).square().sum().backward()
            counts.append(len(calls) - n0)
            kept.append((attn.sat_select(x)[1], mlp.sat_select(x)))  # cached: no collective
        out[(metric, selection, gas)] = {"kept": kept, "calls": counts,
                                         "weights": (attn.state_dict(), mlp.state_dict())}
    # Full recomputation (megatron's checkpoint): bit-equal gradients, no extra collective.
    grads, recompute_calls = [], []
    for recompute in (False, True):
        attn, mlp = dp_layers("maxip", "sampling")
        set_sat_iteration(attn, 3), set_sat_iteration(mlp, 3)

        def block(inp):
            return attn(inp, None, rotary_pos_emb=freqs)[0] + mlp(inp)[0]

        n0 = len(calls)
        x = dp_data(rank, 0).requires_grad_(True)
        y = tensor_parallel.checkpoint(block, False, x) if recompute else block(x)
        y.square().sum().backward()
        recompute_calls.append(len(calls) - n0)
        grads.append([x.grad] + [p.grad for p in list(attn.parameters()) + list(mlp.parameters())])
    out["recompute"] = {"calls": recompute_calls,
                        "bit_equal": all(torch.equal(u, v) for u, v in zip(*grads))}
    # The sequence-parallel seam: statistics reduced over a given group of sequence shards.
    from megatron_sat.config import SATConfig
    from megatron_sat.sat_state import SATLayerState

    for metric in ("maxip", "wanda"):
        st = SATLayerState(SATConfig(metric=metric, dp_consistent=False), "mlp", 1, None, 4)
        v = torch.full((3,), float(rank + 1), dtype=torch.float64)
        out[("seq", metric)] = st.reduce_stats(v, sequence_group=dist.group.WORLD)
    torch.save(out, os.path.join(tmpdir, f"dp{rank}.pt"))


def test_dp2_selection_equals_one_process_on_the_concatenation(tmp_path, megatron_single):
    """§3 rev 2: statistics (not scores) are reduced, so DP = 2 keeps exactly what one
    process keeps on both ranks' first micro-batches; later micro-batches and the
    recomputed forward reuse the selection without any collective."""
    from megatron_sat.control import set_sat_iteration

    run_distributed(dp_worker, 2, str(tmp_path), tmp_path=tmp_path)
    res = [torch.load(tmp_path / f"dp{r}.pt") for r in range(2)]
    x_cat = torch.cat([dp_data(0, 0), dp_data(1, 0)], dim=1)  # [s, 2b, h]
    for combo in DP_COMBOS:
        metric, selection, gas = combo
        attn, mlp = dp_layers(metric, selection)
        attn.load_state_dict(res[0][combo]["weights"][0])
        mlp.load_state_dict(res[0][combo]["weights"][1])
        set_sat_iteration(attn, 7), set_sat_iteration(mlp, 7)
        ref_q, ref_c = attn.sat_select(x_cat)[1], mlp.sat_select(x_cat)
        for r in res:
            first = 2 if metric in ("maxip", "wanda") else 0  # attn + mlp, once; none for
            assert r[combo]["calls"] == [first] + [0] * (gas - 1), combo  # input-free metrics
            for kept_q, kept_c in r[combo]["kept"]:
                assert torch.equal(kept_q, ref_q) and torch.equal(kept_c, ref_c), combo
    for r in res:
        assert r["recompute"]["calls"] == [2, 2] and r["recompute"]["bit_equal"]
        assert torch.equal(r[("seq", "maxip")], torch.full((3,), 1.5, dtype=torch.float64))
        assert torch.equal(r[("seq", "wanda")], torch.full((3,), 3.0, dtype=torch.float64))
