"""One selection per iteration (SAT_SPEC §3 rev 2) across gradient accumulation and
recomputation, GQA sampling probabilities (§2 rev 2), saved tensors of the sliced ops,
and one-line refusals of settings the SAT path cannot honour."""

import dataclasses

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import build_module

from megatron_sat import ops
from megatron_sat.config import SATConfig
from megatron_sat.control import set_sat_iteration
from megatron_sat.model import LlamaShape, transformer_config
from megatron_sat.spec import get_sat_layer_spec
from sat_reference import masked_attention, masked_swiglu, masks_from_kept

HEADS, GROUPS, D, FFN = 8, 2, 8, 48  # GQA, 4 query heads per group
H = HEADS * D


def sat_cfg(**kw):
    base = dict(schedule="constant", attn_omission_rate=0.5, mlp_omission_rate=0.5,
                total_iters=100, metric="maxip", selection="sampling")
    base.update(kw)
    return SATConfig(**base)


def build_pair(sat, heads=HEADS, groups=GROUPS, d=D, dtype=torch.float64, config=None,
               seed=0):
    config = config or transformer_config(LlamaShape(1, heads * d, FFN, heads, groups),
                                          params_dtype=dtype)
    spec = get_sat_layer_spec(sat).submodules
    torch.manual_seed(seed)
    attn = build_module(spec.self_attention, config=config, layer_number=2)
    mlp = build_module(spec.mlp, config=config)
    mlp.set_layer_number(2)
    attn.train(), mlp.train()
    return attn, mlp


def data(n, s=6, b=2, h=H, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, b, h, generator=g, dtype=torch.float64) + 0.2 * i for i in range(n)]
    rs = [torch.randn(s, b, h, generator=g, dtype=torch.float64) for _ in range(n)]
    freqs = RotaryEmbedding(D, rotary_percent=1.0, use_cpu_initialization=True)(s)
    return xs, rs, freqs


def recording_ops(monkeypatch):
    """Record the index tensors each sliced op is called with (independent of the cache)."""
    calls = []
    rows, cols = ops.linear_rows, ops.linear_cols
    monkeypatch.setattr(ops, "linear_rows",
                        lambda x, w, idx, b=None: calls.append(("r", idx.clone())) or rows(x, w, idx, b))
    monkeypatch.setattr(ops, "linear_cols",
                        lambda x, w, idx: calls.append(("c", idx.clone())) or cols(x, w, idx))
    return calls


@pytest.mark.parametrize("gas", [2, 4])
@pytest.mark.parametrize("metric", ["maxip", "wanda"])
def test_gradient_accumulation_keeps_one_selection(megatron_single, monkeypatch, gas, metric):
    sat = sat_cfg(metric=metric)
    attn, mlp = build_pair(sat)
    set_sat_iteration(attn, 7), set_sat_iteration(mlp, 7)
    xs, rs, freqs = data(gas)
    calls = recording_ops(monkeypatch)
    for x, r in zip(xs, rs):  # gradient accumulation: .grad sums over micro-batches
        set_sat_iteration(attn, 7), set_sat_iteration(mlp, 7)  # same t again: kept
        a, _ = attn(x, None, rotary_pos_emb=freqs)
        m, _ = mlp(x)
        ((a + m) * r).sum().backward()
    per_mb = [calls[i:i + 4] for i in range(0, len(calls), 4)]  # 4 sliced ops per micro-batch
    assert len(per_mb) == gas
    for mb in per_mb[1:]:
        assert all(torch.equal(u[1], v[1]) for u, v in zip(mb, per_mb[0]))

    # Reference: masks chosen by fresh layers from micro-batch 0 alone, masked dense.
    ref_attn, ref_mlp = build_pair(sat)
    set_sat_iteration(ref_attn, 7), set_sat_iteration(ref_mlp, 7)
    kept_groups, kept_q = ref_attn.sat_select(xs[0])
    kept_ch = ref_mlp.sat_select(xs[0])
    q = HEADS // GROUPS
    row_m, col_m = masks_from_kept(GROUPS, q, D, kept_groups, kept_q)
    ch_m = torch.zeros(FFN, dtype=torch.float64)
    ch_m[kept_ch] = 1
    w = {n: p.detach().clone().requires_grad_(True) for n, p in
         (("qkv", attn.linear_qkv.weight), ("proj", attn.linear_proj.weight),
          ("fc1", mlp.linear_fc1.weight), ("fc2", mlp.linear_fc2.weight))}
    for x, r in zip(xs, rs):
        a = masked_attention(x, w["qkv"], w["proj"], row_m, col_m, GROUPS, q, D, freqs)
        m = masked_swiglu(x, w["fc1"], w["fc2"], ch_m)
        ((a + m) * r).sum().backward()
    got = {"qkv": attn.linear_qkv.weight.grad, "proj": attn.linear_proj.weight.grad,
           "fc1": mlp.linear_fc1.weight.grad, "fc2": mlp.linear_fc2.weight.grad}
    for k in got:
        assert (got[k] - w[k].grad).abs().max().item() < 1e-12, k
    ch2 = torch.cat([ch_m, ch_m])
    assert torch.all(got["qkv"][row_m == 0] == 0) and torch.all(got["proj"][:, col_m == 0] == 0)
    assert torch.all(got["fc1"][ch2 == 0] == 0) and torch.all(got["fc2"][:, ch_m == 0] == 0)
    # A new iteration chooses again; an eval forward in between neither uses nor moves it.
    attn.eval()
    attn(xs[1], None, rotary_pos_emb=freqs)
    attn.train()
    assert attn.sat_state.cached_selection()[1] is not None
    set_sat_iteration(attn, 8)
    assert attn.sat_state.cached_selection() is None


def _step(attn, mlp, x, r, freqs, recompute):
    def block(inp):
        a, _ = attn(inp, None, rotary_pos_emb=freqs)
        m, _ = mlp(inp + a)
        return a + m

    x = x.clone().requires_grad_(True)
    out = tensor_parallel.checkpoint(block, False, x) if recompute else block(x)
    (out * r).sum().backward()
    return [x.grad] + [p.grad.clone() for p in list(attn.parameters()) + list(mlp.parameters())]


@pytest.mark.parametrize("metric", ["wanda", "maxip"])
def test_full_recomputation_reuses_selection_bit_equal(megatron_single, monkeypatch, metric):
    from megatron_sat import unit_selection

    sat = sat_cfg(metric=metric)
    (xs, rs, freqs) = data(1, seed=3)
    stats_calls = []
    real = unit_selection.input_stats
    monkeypatch.setattr(unit_selection, "input_stats",
                        lambda m, x: stats_calls.append(1) or real(m, x))
    grads = []
    for recompute in (False, True):
        attn, mlp = build_pair(sat, seed=5)
        set_sat_iteration(attn, 1), set_sat_iteration(mlp, 1)
        stats_calls.clear()
        grads.append(_step(attn, mlp, xs[0], rs[0], freqs, recompute))
        assert len(stats_calls) == 2  # one selection per layer, none in the recomputation
    assert all(torch.equal(u, v) for u, v in zip(*grads))


def test_selective_core_attention_recompute_is_honoured(megatron_single, monkeypatch):
    base = transformer_config(LlamaShape(1, H, FFN, HEADS, GROUPS), params_dtype=torch.float64)
    selective = dataclasses.replace(base, recompute_granularity="selective",
                                    recompute_modules=["core_attn"])
    (xs, rs, freqs) = data(1, seed=4)
    checkpoints = []
    real = tensor_parallel.checkpoint
    monkeypatch.setattr(tensor_parallel, "checkpoint",
                        lambda fn, *a: checkpoints.append(fn) or real(fn, *a))
    grads = []
    for config in (base, selective):
        attn, _ = build_pair(sat_cfg(), config=config, seed=6)
        set_sat_iteration(attn, 2)
        x = xs[0].clone().requires_grad_(True)
        a, _ = attn(x, None, rotary_pos_emb=freqs)
        (a * rs[0]).sum().backward()
        grads.append([x.grad, attn.linear_qkv.weight.grad, attn.linear_proj.weight.grad])
    assert [f.__name__ for f in checkpoints] == ["_sat_attention_kernel"]
    assert all(torch.equal(u, v) for u, v in zip(*grads))


def _saved_tensors(fn, params):
    """Every non-parameter tensor autograd saves while ``fn`` runs, deduplicated."""
    ptrs = {p.data_ptr() for p in params}
    saved = {}

    def pack(t):
        if t.data_ptr() not in ptrs and t.numel() > 0:
            saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(saved.values())


def _is_weight_copy(t, weights):
    """True if ``t`` is a gathered copy of rows (or columns) of one of ``weights``."""
    if t.dim() != 2 or not t.is_floating_point():
        return False
    for w in weights:
        for full in (w, w.t()):
            for cand in (t, t.t()):  # autograd may save a transposed view
                if cand.shape[1] == full.shape[1] and cand.shape[0] <= full.shape[0]:
                    match = (cand[:, None, :] == full[None, :, :]).all(-1).any(-1)
                    if bool(match.all()):
                        return True
    return False


def test_no_saved_weight_copy_and_saved_bytes_within_dense(megatron_single, monkeypatch):
    (xs, rs, freqs) = data(1, s=16, seed=7)

    def run(rho):
        attn, mlp = build_pair(sat_cfg(attn_omission_rate=rho, mlp_omission_rate=rho), seed=8)
        set_sat_iteration(attn, 0), set_sat_iteration(mlp, 0)
        params = list(attn.parameters()) + list(mlp.parameters())
        weights = [p.detach() for p in params if p.dim() == 2]
        saved = _saved_tensors(lambda: _step(attn, mlp, xs[0], rs[0], freqs, False), params)
        return saved, weights

    sat_saved, weights = run(0.5)
    assert not [t.shape for t in sat_saved if _is_weight_copy(t, weights)]
    dense_saved, _ = run(0.0)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert nbytes(sat_saved) <= nbytes(dense_saved)
    # The scan does find a gathered copy when one is saved (autograd through index_select).
    monkeypatch.setattr(ops, "linear_rows", ops.linear_rows_reference)
    ref_saved, weights = run(0.5)
    assert any(_is_weight_copy(t, weights) for t in ref_saved)


def test_gqa_sampling_frequencies_follow_q_scores(megatron_single):
    """8 query heads per group, k_q = 1: P(head h) = softmax((Ŝ^Q_h / mean_g Ŝ^Q) / T)."""
    heads, groups, d, temp = 16, 2, 4, 0.5
    sat = sat_cfg(metric="magnitude", attn_omission_rate=0.9, temperature=temp)
    attn, _ = build_pair(sat, heads=heads, groups=groups, d=d)
    q = heads // groups
    with torch.no_grad():  # spread the query heads' magnitudes: 0.25x .. 2x
        w = attn.linear_qkv.weight.view(groups, q + 2, d, -1)
        for j in range(q):
            w[:, j] *= 0.25 + 1.75 * ((j * 3) % q) / (q - 1)
    s = attn.linear_qkv.weight.detach().double().norm(dim=1).view(groups, q + 2, d).sum(-1)
    s_q = s[:, :q] / s[:, :q].sum()  # Ŝ^Q over all local query heads
    s_hat = s_q / s_q.mean(dim=1, keepdim=True)
    p = torch.softmax(s_hat / temp, dim=1)  # [groups, q]
    assert p.max() / p.min() > 5  # a spread the K/V constant of revision 1 would flatten
    n = 3000
    counts = torch.zeros(groups, q, dtype=torch.float64)
    x = torch.zeros(2, 1, heads * d, dtype=torch.float64)
    for t in range(n):
        set_sat_iteration(attn, t)
        _, kept_q = attn.sat_select(x)
        assert kept_q.shape == (groups, 1)
        counts[torch.arange(groups), kept_q[:, 0]] += 1
    freq = counts / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() / sigma).max() < 4.5
    # Revision 1's score (Ŝ^Q + Ŝ^K + Ŝ^V) gives visibly flatter probabilities.
    kv = (s[:, q] / s[:, q].sum() + s[:, q + 1] / s[:, q + 1].sum()).unsqueeze(1)
    old = s_q + kv
    p_old = torch.softmax(old / old.mean(dim=1, keepdim=True) / temp, dim=1)
    assert ((freq - p_old).abs() / sigma).max() > 10


@pytest.mark.parametrize("change,name", [
    (dict(window_size=(8, 0)), "window_size"),
    (dict(softmax_type="off-by-one"), "softmax_type"),
    (dict(no_rope_freq=[1]), "no_rope_freq"),
    (dict(gradient_accumulation_fusion=True), "gradient_accumulation_fusion"),
])
def test_unsupported_settings_refused_at_construction(megatron_single, change, name):
    config = dataclasses.replace(
        transformer_config(LlamaShape(1, H, FFN, HEADS, GROUPS)), **change)
    with pytest.raises(ValueError) as err:
        build_pair(sat_cfg(), config=config)
    msg = str(err.value)
    assert name in msg and "\n" not in msg and "SAT" in msg


def test_packed_sequences_refused_at_first_sparse_forward(megatron_single):
    from megatron.core.packed_seq_params import PackedSeqParams

    attn, _ = build_pair(sat_cfg())
    (xs, _, freqs) = data(1)
    packed = PackedSeqParams(qkv_format="thd")
    with pytest.raises(ValueError, match="packed_seq_params") as err:
        attn(xs[0], None, rotary_pos_emb=freqs, packed_seq_params=packed)
    assert "\n" not in str(err.value)
