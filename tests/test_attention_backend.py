"""One attention backend for dense and SAT steps (``flash``, ``sdpa``, ``unfused``).

- A dense training step with ``sdpa`` saves no ``[b·heads, s, s]``-sized tensor for
  backward; with ``unfused`` (megatron-core's ``DotProductAttention``) it does.
- SAT at rate 0 is the stock layer, bit for bit, under either backend.
- The backends compute the same attention (float64 against an explicit reference).
- ``flash`` where it cannot run, and other bad combinations, are one-line errors.
"""

import math

import pytest
import torch

from megatron_sat.config import SATConfig
from megatron_sat.core_attention import (attention_over_heads, flash_available,
                                         resolve_attention_backend)
from megatron_sat.model import LlamaShape, build_gpt_model


def _tiny(seq):
    return LlamaShape(1, 32, 64, 2, 2, vocab_size=128, max_position_embeddings=seq)


def _largest_saved_numel(model, seq, b=1):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (b, seq + 1), generator=g)
    pos = torch.arange(seq).expand(b, seq)
    biggest = 0

    def pack(t):
        nonlocal biggest
        biggest = max(biggest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    return biggest


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_saved_tensor_scan_dense_step_seq512(megatron_single, backend):
    seq, b, heads = 512, 1, 2
    model = build_gpt_model(_tiny(seq), None, attention_backend=backend).train()
    biggest = _largest_saved_numel(model, seq, b)
    if backend == "sdpa":
        assert biggest < b * heads * seq * seq, biggest  # no score/probability matrix
    else:
        assert biggest >= b * heads * seq * seq, biggest  # DotProductAttention saves it


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_rate0_bit_identical_to_stock_layer(megatron_single, backend):
    shape = LlamaShape(2, 64, 128, 4, 2, vocab_size=128, max_position_embeddings=32)
    stock = build_gpt_model(shape, None, attention_backend=backend).train()
    sat = build_gpt_model(shape, SATConfig(attn_omission_rate=0.0, mlp_omission_rate=0.0,
                                           schedule="constant", total_iters=10),
                          attention_backend=backend).train()
    sat.load_state_dict(stock.state_dict())
    assert type(sat.decoder.layers[0].self_attention.core_attention) is \
        type(stock.decoder.layers[0].self_attention.core_attention)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 128, (2, 33), generator=g)
    pos = torch.arange(32).expand(2, 32)
    outs = []
    for m in (stock, sat):
        loss = m(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).mean()
        loss.backward()
        outs.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    assert torch.equal(outs[0][0], outs[1][0])
    for n, grad in outs[0][1].items():
        assert torch.equal(grad, outs[1][1][n]), n


def _reference(q, k, v, causal):
    """Plain float64 softmax(QKᵀ/√d)V with GQA by repetition; [s, b, n, d] → [s, b, n·d]."""
    sq, b, nq, d = q.shape
    rep = nq // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("qbnd,kbnd->bnqk", q, k) / math.sqrt(d)
    if causal:
        s = s.masked_fill(torch.ones(sq, sq, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bnqk,kbnd->qbnd", s.softmax(-1), v).reshape(sq, b, nq * d)


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
@pytest.mark.parametrize("causal", [True, False])
def test_backends_compute_attention_over_any_head_count(backend, causal):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(7, 2, 6, 4, generator=g, dtype=torch.float64)  # 6 kept query heads
    k = torch.randn(7, 2, 2, 4, generator=g, dtype=torch.float64)  # 2 K/V groups (GQA)
    v = torch.randn(7, 2, 2, 4, generator=g, dtype=torch.float64)
    out = attention_over_heads(backend, q, k, v, causal=causal, scale=0.5)
    torch.testing.assert_close(out, _reference(q, k, v, causal), rtol=1e-10, atol=1e-10)


def test_sat_sparse_path_calls_the_dense_backend(megatron_single, monkeypatch):
    """SAT's kept-head attention runs the run's backend, not a kernel of its own."""
    from megatron_sat import core_attention
    from megatron_sat.control import set_sat_iteration

    calls = []
    for name in ("sdpa", "unfused"):
        fn = core_attention._KERNELS[name]
        monkeypatch.setitem(core_attention._KERNELS, name,
                            lambda *a, _n=name, _f=fn, **k: calls.append(_n) or _f(*a, **k))
    shape = LlamaShape(1, 32, 64, 4, 4, vocab_size=128, max_position_embeddings=16)
    sat = SATConfig(schedule="constant", total_iters=10)
    for backend in ("sdpa", "unfused"):
        calls.clear()
        model = build_gpt_model(shape, sat, attention_backend=backend).train()
        set_sat_iteration(model, 0)
        tokens = torch.randint(0, 128, (1, 16))
        model(tokens, torch.arange(16).unsqueeze(0), None, labels=tokens).mean().backward()
        assert calls == [backend]


def test_backend_resolution_and_one_line_errors():
    assert resolve_attention_backend("auto", "cpu", torch.float32) == "sdpa"
    assert resolve_attention_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    assert resolve_attention_backend("unfused", "cpu", torch.float32) == "unfused"
    for device, dtype, needle in (("cpu", torch.bfloat16, "needs a CUDA GPU"),
                                  ("cuda", torch.float32, "needs bf16 or fp16")):
        with pytest.raises(ValueError) as e:
            resolve_attention_backend("flash", device, dtype)
        assert needle in str(e.value) and "\n" not in str(e.value)
    if not flash_available():
        with pytest.raises(ValueError, match="not installed"):
            resolve_attention_backend("flash", "cuda", torch.bfloat16)
        assert resolve_attention_backend("auto", "cuda", torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="not one of"):
        resolve_attention_backend("te", "cpu", torch.float32)


@pytest.mark.skipif(not (flash_available() and torch.cuda.is_available()),
                    reason="flash-attn and a CUDA GPU are needed")
def test_flash_matches_sdpa_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(64, 2, n, 64, device="cuda", dtype=torch.bfloat16, generator=g)
               for n in (8, 2, 2))
    a = attention_over_heads("flash", q, k, v, causal=True, scale=0.125)
    b = attention_over_heads("sdpa", q, k, v, causal=True, scale=0.125)
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
