"""SAT on HF Llama layers: rate-0 bit identity with the stock layers, float64 masked-dense
gradients at ρ = 0.5 (SAT_SPEC §4), and the same kept units as the megatron-core layers."""

import copy

import pytest
import torch
from torch.func import functional_call

from megatron_sat.config import SATConfig
from megatron_sat.control import set_sat_iteration
from megatron_sat.hf import SATError, apply_sat, remove_sat

SHAPES = {"mha": (4, 4), "gqa2": (4, 2)}  # heads, kv heads; head_dim 8
VOCAB, S, B = 64, 10, 2


def tiny_llama(heads, kv_heads, dtype=torch.float32, attn="sdpa", layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=heads * 8, intermediate_size=24,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation=attn, use_cache=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def batch(padding):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    mask = None
    if padding == "left":
        mask = torch.ones(B, S, dtype=torch.long)
        mask[0, :3] = 0
    elif padding == "right":
        mask = torch.ones(B, S, dtype=torch.long)
        mask[1, -4:] = 0
    return ids, mask


def loss_of(model, ids, mask, params=None):
    kwargs = dict(input_ids=ids, attention_mask=mask)
    logits = (functional_call(model, params, (), kwargs) if params is not None
              else model(**kwargs)).logits  # [b, s, V]
    w = torch.linspace(-1, 1, VOCAB, dtype=logits.dtype)
    keep = torch.ones(B, S, dtype=logits.dtype) if mask is None else mask.to(logits.dtype)
    return ((logits * w).sum(-1) * keep).sum(), logits


def sat_cfg(rho, **kw):
    return SATConfig(**{**dict(schedule="constant", attn_omission_rate=rho,
                               mlp_omission_rate=rho, total_iters=100, metric="maxip",
                               selection="sampling", seed=7), **kw})


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("padding", [None, "left"])
def test_rate0_bit_identical_to_stock(name, padding):
    stock = tiny_llama(*SHAPES[name]).train()
    sat = apply_sat(copy.deepcopy(stock), sat_cfg(0.5, schedule="ladder", total_iters=8)).train()
    assert type(sat.model.layers[0].self_attn).__name__ == "SATLlamaAttention"
    set_sat_iteration(sat, 8)  # past t_end: the LORS dense rung, ρ = 0
    ids, mask = batch(padding)
    for m in (stock, sat):
        loss, logits = loss_of(m, ids, mask)
        loss.backward()
        m.logits = logits.detach()
    assert torch.equal(stock.logits, sat.logits)
    for (n, p), (n2, q) in zip(stock.named_parameters(), sat.named_parameters()):
        assert n == n2 and torch.equal(p.grad, q.grad), n
    # ρ > 0 in eval mode is the stock layer too
    set_sat_iteration(sat, 0)
    with torch.no_grad():
        assert torch.equal(stock.eval()(ids, attention_mask=mask).logits,
                           sat.eval()(ids, attention_mask=mask).logits)


def masks_for(model):
    """Per SAT parameter, the 0/1 mask of the slices its layer kept this iteration."""
    masks = {}
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        kept_groups, kept_q = attn.sat_state.cached_selection()
        ng, q, d = attn.sat_groups, attn.sat_q_per_group, attn.head_dim
        head = torch.zeros(ng, q, dtype=torch.float64)
        head[kept_groups[:, None], kept_q] = 1
        rows = head.repeat_interleave(d, dim=1).reshape(-1)  # [heads * d]
        kv = head[:, 0].repeat_interleave(d) if q == 1 else torch.ones(ng * d, dtype=torch.float64)
        p = f"model.layers.{i}."
        masks[p + "self_attn.q_proj.weight"] = rows[:, None]
        masks[p + "self_attn.k_proj.weight"] = kv[:, None]
        masks[p + "self_attn.v_proj.weight"] = kv[:, None]
        masks[p + "self_attn.o_proj.weight"] = rows[None, :]
        ch = torch.zeros(mlp.sat_channels, dtype=torch.float64)
        ch[mlp.sat_state.cached_selection()] = 1
        masks[p + "mlp.gate_proj.weight"] = ch[:, None]
        masks[p + "mlp.up_proj.weight"] = ch[:, None]
        masks[p + "mlp.down_proj.weight"] = ch[None, :]
    return masks


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rho_half_equals_masked_dense_float64(name, padding, attn):
    if attn == "eager" and padding == "right":
        pytest.skip("one eager case per padding side is enough")
    stock = tiny_llama(*SHAPES[name], dtype=torch.float64, attn=attn).train()
    sat = apply_sat(copy.deepcopy(stock), sat_cfg(0.5)).train()
    set_sat_iteration(sat, 3)
    ids, mask = batch(padding)
    loss, logits = loss_of(sat, ids, mask)
    loss.backward()
    masks = masks_for(sat)
    if attn == "eager":  # HF's eager softmax runs in fp32; the float64 reference uses SDPA
        stock.set_attn_implementation("sdpa")
    # reference: the stock model whose omitted rows / columns are multiplied by 0
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in stock.named_parameters()}
    params = {n: (w * masks[n] if n in masks else w) for n, w in leaves.items()}
    ref_loss, ref_logits = loss_of(stock, ids, mask, params)
    ref_loss.backward()
    keep = torch.ones(B, S, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(logits[keep], ref_logits[keep], rtol=0, atol=1e-10)
    for n, p in sat.named_parameters():
        ref = leaves[n].grad
        if n in masks:
            omitted = (masks[n].expand_as(p) == 0)  # none for GQA K/V: they always stay
            assert omitted.any() or "k_proj" in n or "v_proj" in n, n
            assert torch.all(p.grad[omitted] == 0), n
            assert torch.all(ref[omitted] == 0), n
        torch.testing.assert_close(p.grad, ref, rtol=0, atol=1e-10, msg=n)


def test_selection_once_per_iteration_across_micro_batches():
    sat = apply_sat(tiny_llama(4, 2), sat_cfg(0.5)).train()
    set_sat_iteration(sat, 2)
    ids, _ = batch(None)
    sat(ids)
    first = [l.mlp.sat_state.cached_selection().clone() for l in sat.model.layers]
    sat(torch.flip(ids, [0]))  # second micro-batch of the same iteration: reused
    assert all(torch.equal(a, l.mlp.sat_state.cached_selection())
               for a, l in zip(first, sat.model.layers))
    set_sat_iteration(sat, 3)
    sat(ids)
    assert any(not torch.equal(a, l.mlp.sat_state.cached_selection())
               for a, l in zip(first, sat.model.layers))


def test_state_dict_unchanged_and_remove_sat():
    stock = tiny_llama(4, 2)
    keys = list(stock.state_dict())
    sat = apply_sat(stock, sat_cfg(0.5))
    assert list(sat.state_dict()) == keys
    with pytest.raises(SATError, match="already applied"):
        apply_sat(sat, sat_cfg(0.5))
    remove_sat(sat)
    assert type(sat.model.layers[1].mlp).__name__ == "LlamaMLP"
    assert not hasattr(sat.model.layers[1].mlp, "sat_state")
    with pytest.raises(SATError, match="no SAT layers"):
        remove_sat(sat)
    with pytest.raises(SATError, match="attn_implementation='sdpa'"):
        apply_sat(tiny_llama(4, 2, attn="flex_attention"), sat_cfg(0.5))

    class Adapter(torch.nn.Module):  # e.g. a LoRA wrapper around a projection
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

    wrapped = tiny_llama(4, 2)
    wrapped.model.layers[1].mlp.up_proj = Adapter(wrapped.model.layers[1].mlp.up_proj)
    with pytest.raises(SATError, match="plain nn.Linear.*up_proj"):
        apply_sat(wrapped, sat_cfg(0.5))
    assert type(wrapped.model.layers[0].mlp).__name__ == "LlamaMLP"  # all or nothing


def test_save_pretrained_plain_checkpoint(tmp_path):
    """apply_sat -> train step -> save_pretrained -> fresh process without megatron_sat."""
    import subprocess
    import sys

    model = apply_sat(tiny_llama(4, 2), sat_cfg(0.5)).train()
    set_sat_iteration(model, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, mask = batch("left")
    loss_of(model, ids, mask)[0].backward()
    opt.step()
    model.eval().save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.save(model(ids, attention_mask=mask).logits, tmp_path / "sat_logits.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}).eval()\n"
        f"ids, mask = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad(): out = m(ids, attention_mask=mask).logits\n"
        f"assert torch.equal(out, torch.load({str(tmp_path / 'sat_logits.pt')!r}))\n"
        "assert not any(k.startswith('megatron_sat') for k in sys.modules)\n"
        "print('OK')\n")
    torch.save((ids, mask), tmp_path / "ids.pt")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                              "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]
