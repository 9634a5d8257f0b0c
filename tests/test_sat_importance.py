"""Neuron importance (SAT_SPEC §1) and aggregation (§2) against direct float64 formulas."""

import itertools

import pytest
import torch

from megatron_sat.importance import (attention_unit_scores, mlp_channel_scores, neuron_scores,
                                     normalize, qkv_head_scores)


def reference_scores(metric, w, x):
    """Literal, loop-based float64 evaluation of the SAT_SPEC §1 table."""
    w = w.double()
    x = x.reshape(-1, w.shape[1]).double()
    d_out, d_in = w.shape
    out = torch.empty(d_out, dtype=torch.float64)
    for j in range(d_out):
        if metric == "uniform":
            out[j] = 1.0
        elif metric == "magnitude":
            out[j] = sum(w[j, i] ** 2 for i in range(d_in)) ** 0.5
        elif metric == "wanda":
            out[j] = sum(torch.sqrt((x[:, i] ** 2).sum()) * abs(w[j, i]) for i in range(d_in))
        else:
            xbar = x.sum(0) / x.shape[0]
            out[j] = abs(sum(xbar[i] * w[j, i] for i in range(d_in)))
    return out


@pytest.mark.parametrize("metric", ["uniform", "magnitude", "wanda", "maxip"])
@pytest.mark.parametrize("shape", [((7, 5), (3, 5)), ((12, 16), (4, 2, 16)), ((3, 9), (2, 3, 4, 9))])
def test_neuron_scores_match_float64_formula(metric, shape):
    g = torch.Generator().manual_seed(hash((metric, shape)) % 2**31)
    wshape, xshape = shape
    w = torch.randn(wshape, generator=g)
    x = torch.randn(xshape, generator=g) + 0.3
    got = neuron_scores(metric, w, x)
    assert got.dtype == torch.float32 and got.shape == (wshape[0],)
    ref = reference_scores(metric, w, x)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_scores_are_fp32_for_bf16_weights_and_need_no_grad():
    w = torch.randn(8, 4, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(5, 4, dtype=torch.bfloat16)
    s = neuron_scores("wanda", w, x)
    assert s.dtype == torch.float32 and not s.requires_grad


def test_unknown_metric_is_named():
    with pytest.raises(ValueError, match="unknown importance metric 'l1'"):
        neuron_scores("l1", torch.ones(2, 2), torch.ones(1, 2))


def test_attention_aggregation_gqa_literal():
    ng, q, d = 2, 3, 4
    s = torch.rand(ng * (q + 2) * d, dtype=torch.float64)
    blocks = s.view(ng, q + 2, d)
    sq = {(g, j): blocks[g, j].sum() for g in range(ng) for j in range(q)}
    sk = {g: blocks[g, q].sum() for g in range(ng)}
    sv = {g: blocks[g, q + 1].sum() for g in range(ng)}
    tq, tk, tv = sum(sq.values()), sum(sk.values()), sum(sv.values())
    units = attention_unit_scores(qkv_head_scores(s, ng, q, d))
    for g, j in itertools.product(range(ng), range(q)):
        expect = sq[g, j] / tq  # revision 2: a GQA query head's score is Ŝ^Q alone
        assert abs(units[g, j].item() - expect.item()) < 1e-12


def test_attention_aggregation_mha_literal():
    ng, d = 4, 3
    s = torch.rand(ng * 3 * d, dtype=torch.float64)
    blocks = s.view(ng, 3, d).sum(-1)  # [ng, (q, k, v)]
    units = attention_unit_scores(qkv_head_scores(s, ng, 1, d))
    expect = (blocks / blocks.sum(0)).sum(1)  # Ŝ^Q + Ŝ^K + Ŝ^V per head
    torch.testing.assert_close(units[:, 0], expect, rtol=0, atol=1e-15)


def test_zero_sum_normalises_to_uniform():
    z = normalize(torch.zeros(5))
    assert torch.equal(z, torch.full((5,), 0.2))


def test_mlp_channel_scores_literal():
    f = 6
    s = torch.rand(2 * f, dtype=torch.float64)
    got = mlp_channel_scores(s)
    ref = s[:f] / s[:f].sum() + s[f:] / s[f:].sum()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-15)


class _LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any aten op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t._is_view():
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "maxip"])
def test_scores_from_stats_need_no_full_size_copy_and_rank_like_fp32(monkeypatch, metric):
    """Chunked fp32 accumulation from bf16 weights: no temporary as large as the weight,
    and the ranking equals the one from a full fp32 copy (issue 8, SAT_SPEC §1)."""
    from megatron_sat import importance
    from megatron_sat.importance import input_stats, scores_from_stats

    g = torch.Generator().manual_seed(11)
    w = torch.randn(96, 64, generator=g).to(torch.bfloat16)
    x = (torch.randn(4, 5, 64, generator=g) + 0.2).to(torch.bfloat16)
    monkeypatch.setattr(importance, "SCORE_CHUNK_ELEMENTS", 16 * 64)  # 6 chunks of 16 rows
    stats = input_stats(metric, x)
    with _LargestOutput() as mode:
        got = scores_from_stats(metric, w, stats)
    assert mode.largest < w.numel()
    w32, x32 = w.float(), x.float().reshape(-1, 64)
    ref = {"magnitude": lambda: w32.norm(dim=1),
           "wanda": lambda: w32.abs() @ x32.norm(dim=0),
           "maxip": lambda: (w32 @ x32.mean(0)).abs()}[metric]()
    assert torch.equal(torch.argsort(got, stable=True), torch.argsort(ref, stable=True))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_input_stats_reduce_like_the_concatenation():
    """x̄ averages and column sums of squares add over equal-size shards (§3 rev 2)."""
    from megatron_sat.importance import input_stats, scores_from_stats

    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(3, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(10, 16, generator=g, dtype=torch.float64)
    both = torch.cat([a, b], dim=1)
    mean = (input_stats("maxip", a) + input_stats("maxip", b)) / 2
    sq = input_stats("wanda", a) + input_stats("wanda", b)
    torch.testing.assert_close(scores_from_stats("maxip", w, mean),
                               neuron_scores("maxip", w, both), rtol=1e-6, atol=0)
    torch.testing.assert_close(scores_from_stats("wanda", w, sq),
                               neuron_scores("wanda", w, both), rtol=1e-6, atol=0)
    assert input_stats("uniform", a) is None and input_stats("magnitude", a) is None
