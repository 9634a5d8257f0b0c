"""bf16 on CPU: the SAT path's dtype handling shows without a GPU.

- selection on bf16 activations and weights equals the selection on their exact fp32
  copies (statistics and scores are accumulated in fp32, SAT_SPEC §1);
- the sliced ops in bf16 match a float64 masked-dense reference to bf16 precision and
  keep omitted gradient slices at exactly zero;
- a tiny GPTModel trains in bf16 with SAT (loss falls) and at rate 0 equals the stock
  model bit for bit.
"""

import torch

from megatron_sat import ops
from megatron_sat.config import SATConfig
from megatron_sat.model import LlamaShape, build_gpt_model


def _sat(rho, **kw):
    return SATConfig(schedule="constant", attn_omission_rate=rho, mlp_omission_rate=rho,
                     total_iters=100, **kw)


def test_selection_bf16_equals_fp32_copy(megatron_single):
    from megatron_sat.control import _sat_modules, set_sat_iteration

    shape = LlamaShape(1, 64, 128, 8, 2, vocab_size=128, max_position_embeddings=16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 64, generator=g).to(torch.bfloat16)  # [s, b, h]
    for metric in ("maxip", "wanda", "magnitude"):
        kept = []
        for dtype in (torch.bfloat16, torch.float32):
            torch.manual_seed(5)
            model = build_gpt_model(shape, _sat(0.5, metric=metric), params_dtype=torch.bfloat16)
            model = model.to(dtype).train()  # fp32: exact copies of the bf16 weights
            set_sat_iteration(model, 2)
            sel = []
            for m in _sat_modules(model):
                out = m.sat_select(x.to(dtype))
                sel += list(out) if isinstance(out, tuple) else [out]
            kept.append(sel)
        for a, b in zip(*kept):
            assert torch.equal(a, b), metric


def test_sliced_ops_bf16_against_float64_masked_reference():
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(5, 3, 32, generator=g, dtype=torch.float64)
    w64 = torch.randn(24, 32, generator=g, dtype=torch.float64) * 0.2
    rows = torch.tensor([1, 4, 5, 10, 17, 23])
    dy64 = torch.randn(5, 3, rows.numel(), generator=g, dtype=torch.float64)
    x = x64.to(torch.bfloat16).requires_grad_(True)
    w = w64.to(torch.bfloat16).requires_grad_(True)
    y = ops.linear_rows(x, w, rows)
    y.backward(dy64.to(torch.bfloat16))
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16
    xr, wr = x64.clone().requires_grad_(True), w64.clone().requires_grad_(True)
    mask = torch.zeros(24, dtype=torch.float64).index_fill_(0, rows, 1.0)
    full = xr @ (wr * mask[:, None]).t()  # masked dense
    full[..., rows].backward(dy64)
    torch.testing.assert_close(y.double(), full[..., rows].detach(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=3e-2, atol=5e-2)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=3e-2, atol=5e-2)
    dropped = torch.ones(24, dtype=torch.bool).index_fill_(0, rows, False)
    assert torch.count_nonzero(w.grad[dropped]) == 0
    # Column slices: same checks for linear_cols.
    cols = torch.tensor([0, 3, 7, 8, 30])
    xc = x64[..., :5].to(torch.bfloat16).requires_grad_(True)
    wc = w64.to(torch.bfloat16).requires_grad_(True)
    yc = ops.linear_cols(xc, wc, cols)
    yc.sum().backward()
    ref = x64[..., :5] @ w64[:, cols].t()
    torch.testing.assert_close(yc.double(), ref, rtol=3e-2, atol=3e-2)
    keep = torch.zeros(32, dtype=torch.bool).index_fill_(0, cols, True)
    assert torch.count_nonzero(wc.grad[:, ~keep]) == 0 and wc.grad.dtype == torch.bfloat16


def _train(model, steps, lr=3e-3):
    from megatron_sat.control import set_sat_iteration

    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 128, (2, 33), generator=g)
    pos = torch.arange(32).expand(2, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for it in range(steps):
        set_sat_iteration(model, it)
        loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _bf16_model(shape, sat):
    # As DeepSpeed's bf16 mode does: the whole module in bf16 (megatron's torch-norm
    # fallback builds its weights in fp32 whatever params_dtype says).
    return build_gpt_model(shape, sat, params_dtype=torch.bfloat16,
                           attention_backend="sdpa").bfloat16().train()


def test_bf16_gpt_model_trains_with_sat_and_rate0_equals_dense(megatron_single):
    shape = LlamaShape(2, 64, 128, 4, 2, vocab_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    sat = _bf16_model(shape, _sat(0.5))
    losses = _train(sat, 15)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0], losses
    torch.manual_seed(0)
    dense = _bf16_model(shape, None)
    rate0 = _bf16_model(shape, _sat(0.0))
    rate0.load_state_dict(dense.state_dict())
    assert _train(dense, 2) == _train(rate0, 2)
