"""The attention kernel shared by dense and SAT steps: ``flash``, ``sdpa`` or ``unfused``.

Why one module: megatron-core's local spec uses ``DotProductAttention``, which
materialises the ``[b·heads, s, s]`` scores and probabilities and saves them for backward
(≈ 2.7 GB per Llama-2-7B layer at 4096 tokens).  Dense steps — rate 0, LORS's last
rung, baselines, evaluation — would then run a kernel no Megatron user trains with, and
a "SAT vs dense" ratio would credit SAT with a faster kernel.  Here one backend is chosen
per run (Megatron-LM's ``--attention-backend``) and both paths call it:

* the dense path through :class:`FusedCoreAttention`, swapped in by ``ModuleSpec`` for
  ``core_attention`` (``unfused`` keeps megatron-core's stock ``DotProductAttention``);
* SAT's sparse path (SAT_SPEC §4, attention over the kept heads) through
  :func:`attention_over_heads` with the same backend.

``flash`` is the optional flash-attn package (``pip install megatron-sat[flash]``): CUDA,
bf16/fp16 only.  Importing this module never imports it.
"""

from __future__ import annotations

import copy

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_sat import ops

from megatron_sat.attention_backend import (ATTENTION_BACKENDS,  # noqa: F401 (re-export)
                                            _flash_attn_func, flash_available, flash_problem,
                                            resolve_attention_backend)


def unfused_attention(query, key, value, attention_mask=None, *, causal=True, scale=None,
                      dropout_p=0.0):
    """Explicit ``softmax(QKᵀ·scale) V`` with an fp32 softmax, like ``DotProductAttention``.

    query ``[sq, b, nq, d]``, key/value ``[sk, b, nkv, d]`` → ``[sq, b, nq * d]``.  Used by
    SAT's sparse path under ``unfused`` (the stock module's output view assumes all heads).
    It saves the ``[b, nq, sq, sk]`` probabilities, as the stock module does.
    """
    sq, b, nq, d = query.shape
    sk, nkv = key.shape[0], key.shape[2]
    if nq != nkv:
        key = key.repeat_interleave(nq // nkv, dim=2)
        value = value.repeat_interleave(nq // nkv, dim=2)
    q = query.permute(1, 2, 0, 3)  # [b, nq, sq, d]
    k = key.permute(1, 2, 3, 0)  # [b, nq, d, sk]
    v = value.permute(1, 2, 0, 3)  # [b, nq, sk, d]
    scores = torch.matmul(q, k) * (d ** -0.5 if scale is None else scale)  # [b, nq, sq, sk]
    if attention_mask is not None:
        mask = attention_mask.bool()
    elif causal:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1 + sk - sq)
    else:
        mask = None
    if mask is not None:
        scores = scores.masked_fill(mask, -10000.0)
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()  # softmax in fp32, as attention_softmax_in_fp32 does
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    ctx = torch.matmul(probs, v)  # [b, nq, sq, d]
    return ctx.permute(2, 0, 1, 3).reshape(sq, b, nq * d)


def flash_attention(query, key, value, attention_mask=None, *, causal=True, scale=None,
                    dropout_p=0.0):
    """flash-attn over ``[s, b, heads, d]`` inputs (native GQA) → ``[sq, b, nq * d]``."""
    fn = _flash_attn_func()
    if fn is None:
        raise RuntimeError(flash_problem("cuda", torch.bfloat16))
    if attention_mask is not None:
        raise ValueError("--attention-backend flash supports causal or full attention "
                         "only, not an explicit attention_mask; use --attention-backend sdpa")
    q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, heads, d]
    out = fn(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal)
    sq, b = query.shape[:2]
    return out.transpose(0, 1).reshape(sq, b, -1)  # [sq, b, nq * d]


_KERNELS = {"flash": flash_attention, "sdpa": ops.attention, "unfused": unfused_attention}


def attention_over_heads(backend: str, query, key, value, attention_mask=None, *,
                         causal=True, scale=None, dropout_p=0.0):
    """Run ``backend`` (``flash``, ``sdpa`` or ``unfused``) on any number of heads.

    query ``[sq, b, nq, d]``, key/value ``[sk, b, nkv, d]``, ``nq % nkv == 0`` →
    ``[sq, b, nq * d]``.  Dropout draws from the current RNG; callers fork megatron's
    tracker around it.
    """
    return _KERNELS[backend](query, key, value, attention_mask, causal=causal, scale=scale,
                             dropout_p=dropout_p)


class FusedCoreAttention(MegatronModule):
    """Drop-in for megatron-core's ``DotProductAttention`` running ``flash`` or ``sdpa``.

    Same constructor and forward signature; ``[sq, b, np, hn]`` inputs → ``[sq, b, np·hn]``.
    Neither kernel saves an ``s × s`` tensor for backward.  Shape-agnostic in the head
    count, so SAT's sparse path calls this very module on its kept heads.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, backend: str = "sdpa", **kwargs):
        super().__init__(config=config)
        if backend not in ("flash", "sdpa"):
            raise ValueError(f"FusedCoreAttention backend {backend!r} must be flash or sdpa "
                             "(unfused is megatron-core's DotProductAttention)")
        self.backend = backend
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None \
            else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError(f"--attention-backend {self.backend} supports neither "
                             "attention_bias nor packed sequences")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        scale = self.softmax_scale if self.softmax_scale is not None \
            else query.shape[-1] ** -0.5
        p = self.dropout_p if self.training else 0.0
        if p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return attention_over_heads(self.backend, query, key, value, attention_mask,
                                            causal=causal, scale=scale, dropout_p=p)
        return attention_over_heads(self.backend, query, key, value, attention_mask,
                                    causal=causal, scale=scale)


def backend_of(core_attention: torch.nn.Module) -> str:
    """The backend a built ``core_attention`` submodule runs (stock module → ``unfused``)."""
    if isinstance(core_attention, FusedCoreAttention):
        return core_attention.backend
    return "unfused"


def with_attention_backend(spec, backend: str):
    """A copy of a GPT layer ``ModuleSpec`` whose core attention runs ``backend``.

    ``unfused`` returns the spec unchanged (megatron-core's ``DotProductAttention``).
    ``backend`` must already be resolved (not ``auto``).
    """
    if backend == "unfused":
        return spec
    if backend not in ("flash", "sdpa"):
        raise ValueError(f"attention backend {backend!r} must be resolved to flash, sdpa or "
                         "unfused before building a spec")
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=FusedCoreAttention, params={"backend": backend})
    return spec
