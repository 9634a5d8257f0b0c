"""The optimised sliced ops equal a masked-dense reference in float64 (SAT_SPEC §4).

Masked dense: zero the omitted rows (or columns) of the full weight, run the ordinary
dense linear, keep the kept outputs.  Outputs, input gradients and full-size weight
gradients must match it, and omitted slices must get exactly zero gradient.
"""

import math

import pytest
import torch

from megatron_sat import ops

D64 = torch.float64


def _rows(n, k, seed, sort=True):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:k]
    return torch.sort(idx).values if sort else idx


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("sort", [True, False])
def test_linear_rows_matches_masked_dense(with_bias, sort):
    torch.manual_seed(0)
    d_in, d_out, k = 12, 10, 4
    x = torch.randn(5, 3, d_in, dtype=D64, requires_grad=True)  # [s, b, d_in]
    w = torch.randn(d_out, d_in, dtype=D64, requires_grad=True)
    b = torch.randn(d_out, dtype=D64, requires_grad=True) if with_bias else None
    rows = _rows(d_out, k, 1, sort)
    dy = torch.randn(5, 3, k, dtype=D64)

    y = ops.linear_rows(x, w, rows, b)
    y.backward(dy)

    xr = x.detach().clone().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)
    br = b.detach().clone().requires_grad_(True) if with_bias else None
    mask = torch.zeros(d_out, dtype=D64)
    mask[rows] = 1.0
    full = torch.nn.functional.linear(xr, wr * mask[:, None],
                                      br * mask if with_bias else None)  # masked dense
    y_ref = full[..., rows]
    y_ref.backward(dy)

    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.grad, wr.grad, rtol=0, atol=1e-12)
    omitted = mask == 0
    assert torch.all(w.grad[omitted] == 0)
    if with_bias:
        torch.testing.assert_close(b.grad, br.grad, rtol=0, atol=1e-12)
        assert torch.all(b.grad[omitted] == 0)


@pytest.mark.parametrize("sort", [True, False])
def test_linear_cols_matches_masked_dense(sort):
    torch.manual_seed(1)
    d_in, d_out, k = 14, 9, 6
    cols = _rows(d_in, k, 2, sort)
    x = torch.randn(4, 2, k, dtype=D64, requires_grad=True)  # kept-width input
    w = torch.randn(d_out, d_in, dtype=D64, requires_grad=True)
    dy = torch.randn(4, 2, d_out, dtype=D64)

    y = ops.linear_cols(x, w, cols)
    y.backward(dy)

    xr = x.detach().clone().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)
    mask = torch.zeros(d_in, dtype=D64)
    mask[cols] = 1.0
    x_full = torch.zeros(4, 2, d_in, dtype=D64).index_copy(2, cols, xr)  # omitted inputs = 0
    y_ref = torch.nn.functional.linear(x_full, wr * mask)  # masked dense
    y_ref.backward(dy)

    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.grad, wr.grad, rtol=0, atol=1e-12)
    assert torch.all(w.grad[:, mask == 0] == 0)


def test_gradcheck_float64():
    torch.manual_seed(2)
    x = torch.randn(3, 6, dtype=D64, requires_grad=True)
    w = torch.randn(8, 6, dtype=D64, requires_grad=True)
    b = torch.randn(8, dtype=D64, requires_grad=True)
    rows = torch.tensor([1, 4, 5])
    assert torch.autograd.gradcheck(lambda a, m, c: ops.linear_rows(a, m, rows, c), (x, w, b))
    xc = torch.randn(3, 3, dtype=D64, requires_grad=True)
    wc = torch.randn(5, 7, dtype=D64, requires_grad=True)
    cols = torch.tensor([0, 2, 6])
    assert torch.autograd.gradcheck(lambda a, m: ops.linear_cols(a, m, cols), (xc, wc))


def test_matches_index_select_formulation_and_accumulates():
    """Same as autograd through index_select, also when grads accumulate over 2 steps."""
    torch.manual_seed(3)
    w = torch.randn(16, 8, dtype=D64, requires_grad=True)
    w2 = torch.randn(8, 16, dtype=D64, requires_grad=True)
    wr = w.detach().clone().requires_grad_(True)
    w2r = w2.detach().clone().requires_grad_(True)
    for step in range(2):
        rows = _rows(16, 6, 10 + step)
        x = torch.randn(2, 5, 8, dtype=D64)
        h = ops.linear_rows(x, w, rows)
        ops.linear_cols(torch.tanh(h), w2, rows).pow(2).sum().backward()
        hr = ops.linear_rows_reference(x, wr, rows)
        ops.linear_cols_reference(torch.tanh(hr), w2r, rows).pow(2).sum().backward()
    torch.testing.assert_close(w.grad, wr.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(w2.grad, w2r.grad, rtol=0, atol=1e-12)


def test_noncontiguous_input_and_no_weight_grad():
    torch.manual_seed(4)
    x = torch.randn(6, 4, 2, dtype=D64).permute(1, 0, 2)[..., :1].expand(4, 6, 5)  # strided
    x = x.clone().transpose(0, 1).requires_grad_(True)  # [6, 4, 5], non-contiguous
    w = torch.randn(7, 5, dtype=D64)  # frozen weight: no grad requested
    rows = torch.tensor([0, 3, 6])
    y = ops.linear_rows(x, w, rows)
    y.sum().backward()
    ref = x.detach().requires_grad_(True)
    ops.linear_rows_reference(ref, w, rows).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=1e-12)
    assert w.grad is None


def _naive_attention(q, k, v, mask, causal, scale):
    # q [sq, b, nq, d], k/v [sk, b, nkv, d]; megatron mask True = masked out.
    rep = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    s = torch.einsum("qbhd,kbhd->bhqk", q, k) * scale
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    elif causal:
        sq, sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    ctx = torch.einsum("bhqk,kbhd->qbhd", p, v)
    return ctx.reshape(q.shape[0], q.shape[1], -1)


@pytest.mark.parametrize("nq,nkv", [(4, 4), (6, 2)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_naive(nq, nkv, masked):
    torch.manual_seed(5)
    s, b, d = 7, 2, 8
    q = torch.randn(s, b, nq, d, dtype=D64, requires_grad=True)
    k = torch.randn(s, b, nkv, d, dtype=D64, requires_grad=True)
    v = torch.randn(s, b, nkv, d, dtype=D64, requires_grad=True)
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None] if masked else None
    scale = 1 / math.sqrt(d)
    out = ops.attention(q, k, v, mask, causal=True, scale=scale)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dy)
    ref = _naive_attention(q, k, v, mask, True, scale)
    grads_ref = torch.autograd.grad(ref, (q, k, v), dy)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("padded_gemm", [False, True])
def test_slice_grad_layout_both_code_paths(dim, padded_gemm):
    """The CUDA (GEMM into a padded view) and CPU layouts give the same exact gradient."""
    torch.manual_seed(6)
    n_tok, d_out, d_in = 9, 7, 11
    n = d_out if dim == 0 else d_in
    idx = _rows(n, 4, 7)
    if dim == 0:
        dy2, x2 = torch.randn(n_tok, 4, dtype=D64), torch.randn(n_tok, d_in, dtype=D64)
    else:
        dy2, x2 = torch.randn(n_tok, d_out, dtype=D64), torch.randn(n_tok, 4, dtype=D64)
    got = ops._slice_grad_to_full(dy2, x2, idx, n, dim, padded_gemm=padded_gemm)
    want = torch.zeros(d_out, d_in, dtype=D64).index_copy_(dim, idx, dy2.t() @ x2)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
