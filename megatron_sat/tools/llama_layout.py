"""HF Llama ⇄ megatron-core tensor layout: pure functions on state dicts.

Why pure functions: a converter must not need the training setup (no distributed
init, no model build), and every layout fact lives here once.  The facts, proven by the
logits-equality tests against ``transformers.LlamaForCausalLM``:

- HF ``q_proj``/``k_proj`` rows are already in rotate-half order, which megatron-core's
  RoPE (``rotary_interleaved=False``) uses, so no permutation is needed.
- ``linear_qkv`` interleaves per query group ``g``: ``[q heads of g, k_g, v_g]``
  (``q = heads / groups`` heads of ``head_dim`` rows each); a TP rank holds a contiguous
  block of whole groups.
- ``linear_fc1`` on TP rank ``r`` is ``[gate chunk r; up chunk r]``.
- ``linear_proj`` and ``linear_fc2`` are split on the input dim (dim 1).
- embedding and output rows are padded with zeros to ``shape.padded_vocab_size(tp)``
  and split on dim 0; export trims them back to ``shape.vocab_size``.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import torch

from megatron_sat.model import LlamaShape
from megatron_sat.tools.cli import ToolError

Tensor = torch.Tensor

# megatron-core name -> (HF name, how TP splits it). "{}" is the layer index.
REPLICATED, SPLIT_IN, VOCAB = "replicated", "split_in", "vocab"
DIRECT_MAP = {
    "decoder.layers.{}.input_layernorm.weight": ("model.layers.{}.input_layernorm.weight", REPLICATED),
    "decoder.layers.{}.pre_mlp_layernorm.weight": ("model.layers.{}.post_attention_layernorm.weight", REPLICATED),
    "decoder.layers.{}.self_attention.linear_proj.weight": ("model.layers.{}.self_attn.o_proj.weight", SPLIT_IN),
    "decoder.layers.{}.mlp.linear_fc2.weight": ("model.layers.{}.mlp.down_proj.weight", SPLIT_IN),
    "decoder.final_layernorm.weight": ("model.norm.weight", REPLICATED),
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", VOCAB),
    "output_layer.weight": ("lm_head.weight", VOCAB),
}
QKV = "decoder.layers.{}.self_attention.linear_qkv.weight"
FC1 = "decoder.layers.{}.mlp.linear_fc1.weight"
HF_QKV = tuple(f"model.layers.{{}}.self_attn.{p}_proj.weight" for p in "qkv")
HF_GATE_UP = ("model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.up_proj.weight")
# HF buffers some checkpoints carry that are not weights.
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _layer_names(template: str, shape: LlamaShape) -> List[str]:
    return [template.format(i) for i in range(shape.num_layers)] if "{}" in template else [template]


def expected_hf_shapes(shape: LlamaShape) -> Dict[str, tuple]:
    """Every HF tensor name a Llama of ``shape`` has, with its ``[out, in]`` shape."""
    h, f, d = shape.hidden_size, shape.ffn_hidden_size, shape.head_dim
    v, kv = shape.vocab_size, shape.num_query_groups * d
    per_layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
                 "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
                 "mlp.down_proj.weight": (h, f)}
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(shape.num_layers):
        out.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    return out


def check_hf_state_dict(hf: Mapping[str, Tensor], shape: LlamaShape) -> None:
    """One-line error on a missing, surplus or mis-shaped tensor."""
    expected = expected_hf_shapes(shape)
    missing = [k for k in expected if k not in hf]
    extra = [k for k in hf if k not in expected and not k.endswith(HF_IGNORED_SUFFIXES)]
    bad = [f"{k} {tuple(hf[k].shape)} != {s}" for k, s in expected.items()
           if k in hf and tuple(hf[k].shape) != s]
    if missing or extra or bad:
        raise ToolError(f"HF weights do not match config.json: missing {missing[:3]}, "
                        f"unexpected {extra[:3]}, wrong shape {bad[:3]}; the folder's "
                        f"config.json and weights must come from the same model")


def pad_vocab_rows(w: Tensor, padded: int) -> Tensor:
    """``[v, h]`` → ``[padded, h]`` with zero rows appended."""
    if w.shape[0] > padded:
        raise ToolError(f"{w.shape[0]} vocabulary rows do not fit padded size {padded}")
    return torch.cat([w, w.new_zeros(padded - w.shape[0], *w.shape[1:])]) if padded > w.shape[0] else w


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, shape: LlamaShape) -> Tensor:
    """HF q ``[heads·d, h]``, k/v ``[groups·d, h]`` → megatron ``[(heads+2·groups)·d, h]``."""
    g, d, h = shape.num_query_groups, shape.head_dim, q.shape[1]
    qpg = shape.num_attention_heads // g
    fused = torch.cat([q.reshape(g, qpg * d, h), k.reshape(g, d, h), v.reshape(g, d, h)], dim=1)
    return fused.reshape(-1, h)  # [g·(qpg+2)·d, h]


def unfuse_qkv(fused: Tensor, shape: LlamaShape) -> tuple:
    """Inverse of :func:`fuse_qkv` on the TP-merged tensor."""
    g, d = shape.num_query_groups, shape.head_dim
    qpg = shape.num_attention_heads // g
    per_group = fused.reshape(g, (qpg + 2) * d, -1)  # [g, (qpg+2)·d, h]
    q, k, v = per_group.split([qpg * d, d, d], dim=1)
    h = fused.shape[1]
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def hf_to_megatron(hf: Mapping[str, Tensor], shape: LlamaShape, tp: int = 1,
                   dtype: torch.dtype | None = None) -> List[Dict[str, Tensor]]:
    """HF ``LlamaForCausalLM`` state dict → one megatron-core state dict per TP rank."""
    try:
        shape.check_tp(tp)
    except ValueError as exc:
        raise ToolError(str(exc)) from None
    if "lm_head.weight" not in hf and "model.embed_tokens.weight" in hf:
        hf = {**hf, "lm_head.weight": hf["model.embed_tokens.weight"]}  # tied → untied copy
    check_hf_state_dict(hf, shape)
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    padded = shape.padded_vocab_size(tp)
    ranks: List[Dict[str, Tensor]] = [{} for _ in range(tp)]

    def put(name: str, chunks: Sequence[Tensor]) -> None:
        for r in range(tp):
            ranks[r][name] = cast(chunks[r]).clone().contiguous()

    for mc_template, (hf_template, split) in DIRECT_MAP.items():
        for mc, hfn in zip(_layer_names(mc_template, shape), _layer_names(hf_template, shape)):
            w = hf[hfn]
            if split == REPLICATED:
                put(mc, [w] * tp)
            elif split == SPLIT_IN:
                put(mc, w.chunk(tp, dim=1))
            else:
                put(mc, pad_vocab_rows(w, padded).chunk(tp, dim=0))
    for i in range(shape.num_layers):
        q, k, v = (hf[n.format(i)] for n in HF_QKV)
        put(QKV.format(i), fuse_qkv(q, k, v, shape).chunk(tp, dim=0))
        gate, up = (hf[n.format(i)] for n in HF_GATE_UP)
        put(FC1.format(i), [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))])
    return ranks


def _merge_replicated(name: str, parts: Sequence[Tensor]) -> Tensor:
    for r, p in enumerate(parts[1:], 1):
        if not torch.equal(p, parts[0]):
            raise ToolError(f"'{name}' differs between TP ranks 0 and {r}; the checkpoint is "
                            f"corrupt (replicated weights must be identical)")
    return parts[0]


def megatron_to_hf(ranks: Sequence[Mapping[str, Tensor]], shape: LlamaShape,
                   dtype: torch.dtype | None = None) -> Dict[str, Tensor]:
    """Per-rank megatron-core state dicts → HF state dict, TP merged and padding trimmed."""
    tp = len(ranks)
    need = [n for t in list(DIRECT_MAP) + [QKV, FC1] for n in _layer_names(t, shape)]
    for r, sd in enumerate(ranks):
        missing = [n for n in need if n not in sd]
        extra = [n for n in sd if n not in need and not n.endswith("_extra_state")]
        if missing or extra:
            raise ToolError(f"TP rank {r} does not match the recorded shape: missing "
                            f"{missing[:3]}, unexpected {extra[:3]}; the checkpoint is corrupt")
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    hf: Dict[str, Tensor] = {}
    for mc_template, (hf_template, split) in DIRECT_MAP.items():
        for mc, hfn in zip(_layer_names(mc_template, shape), _layer_names(hf_template, shape)):
            parts = [sd[mc] for sd in ranks]
            if split == REPLICATED:
                w = _merge_replicated(mc, parts)
            elif split == SPLIT_IN:
                w = torch.cat(parts, dim=1)
            else:
                w = torch.cat(parts, dim=0)[: shape.vocab_size]
            hf[hfn] = cast(w).clone().contiguous()
    for i in range(shape.num_layers):
        fused = torch.cat([sd[QKV.format(i)] for sd in ranks], dim=0)
        for n, w in zip(HF_QKV, unfuse_qkv(fused, shape)):
            hf[n.format(i)] = cast(w).clone().contiguous()
        halves = [sd[FC1.format(i)].chunk(2, dim=0) for sd in ranks]  # ([gate_r], [up_r])
        hf[HF_GATE_UP[0].format(i)] = cast(torch.cat([g for g, _ in halves])).contiguous()
        hf[HF_GATE_UP[1].format(i)] = cast(torch.cat([u for _, u in halves])).contiguous()
    return hf


def reshard(ranks: Sequence[Mapping[str, Tensor]], shape: LlamaShape,
            target_tp: int) -> List[Dict[str, Tensor]]:
    """Change the TP degree of a megatron-core checkpoint (via the full HF layout)."""
    return hf_to_megatron(megatron_to_hf(ranks, shape), shape, target_tp)
