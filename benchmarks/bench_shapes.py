"""Shapes and layer stacks for ``throughput.py``: presets, the ideal narrow shape, FLOPs.

Why separate: what is measured (shapes, how the dense / SAT / ideal stacks are built)
is kept apart from how it is timed and reported.  Shapes here are TP-local layer
slices (e.g. one TP=8 rank of 70B, where ``heads · head_dim != hidden``), which a
``LlamaShape`` cannot express; hence the local FLOPs formula, checked against
``megatron_sat.training.flops`` by ``tests/test_bench_throughput.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron_sat.selection import num_kept


# ----------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class BenchShape:
    """TP-local layer shape plus the default run size of a preset."""

    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    layers: int
    micro_batch: int
    seq_length: int
    note: str = ""


BENCH_PRESETS = {
    # Sized so matmuls dominate on a 2-core CPU while a full run stays ~2 minutes.
    "tiny": BenchShape(512, 1408, 8, 8, 64, 2, 2, 512, "CPU preset (MHA)"),
    "tinyllama-1.1b": BenchShape(2048, 5632, 32, 4, 64, 4, 2, 4096, "GQA 32q/4kv"),
    "llama2-7b": BenchShape(4096, 11008, 32, 32, 128, 4, 2, 4096, "MHA"),
    "llama2-13b": BenchShape(5120, 13824, 40, 40, 128, 4, 2, 4096, "MHA"),
    # One TP=8 rank of Llama-2-70B: 64/8 = 8 query heads in 8/8 = 1 KV group, 28672/8
    # channels; the row-parallel all-reduce is not part of the slice.
    "llama2-70b-tp8": BenchShape(8192, 3584, 8, 1, 128, 2, 1, 4096, "GQA, TP=8-local slice"),
}


def narrowed(shape: BenchShape, rho_attn: float, rho_mlp: float) -> BenchShape:
    """The physically narrower dense shape that SAT at ``(ρ_attn, ρ_mlp)`` emulates (§2-3)."""
    q = shape.heads // shape.groups
    if q == 1:  # MHA: whole heads go
        heads = groups = num_kept(shape.heads, rho_attn)
    else:  # GQA: keep every group, k_q query heads in each
        groups = shape.groups
        heads = groups * num_kept(q, rho_attn)
    return dataclasses.replace(shape, heads=heads, groups=groups,
                               ffn=num_kept(shape.ffn, rho_mlp))


def layer_flops_per_token(shape: BenchShape, seq: int, kept_q: float = 1.0,
                          kept_kv: float = 1.0, kept_mlp: float = 1.0) -> float:
    """Forward + backward FLOPs of one layer per token (SAT_SPEC §6, causal factor ½)."""
    h, d = shape.hidden, shape.head_dim
    hq = shape.heads * d * kept_q
    hkv = shape.groups * d * kept_kv
    f = shape.ffn * kept_mlp
    fwd = 2 * h * (hq + 2 * hkv) + 2 * hq * h + 2 * seq * hq * 0.5 * 2 + 3 * 2 * h * f
    return 3.0 * fwd


# ----------------------------------------------------------------------------- building
def make_config(shape: BenchShape, dtype: torch.dtype):
    from megatron_sat.model import LlamaShape, transformer_config

    base = LlamaShape(shape.layers, shape.heads * shape.head_dim, shape.ffn, shape.heads,
                      shape.groups, max_position_embeddings=max(shape.seq_length, 4096))
    cfg = transformer_config(base, tp=1, params_dtype=dtype)
    # bias_activation_fusion off: the stock MLP would otherwise torch.compile a fused SwiGLU
    # on GPU (minutes of compile per width) that SAT's path does not use; with it off
    # every variant runs the same eager silu(gate) * up.
    return dataclasses.replace(cfg, hidden_size=shape.hidden, kv_channels=shape.head_dim,
                               bias_activation_fusion=False)


def build_block(shape: BenchShape, dtype: torch.dtype, device: torch.device,
                sat_config=None, attention: str = "sdpa"):
    """A ``TransformerBlock`` of ``shape.layers`` Llama layers (no final norm).

    ``attention`` is the run's backend (``auto``, ``flash``, ``sdpa``, ``unfused``;
    ``stock`` = ``unfused``): dense, SAT and ideal variants all run that one kernel.
    """
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_sat.core_attention import resolve_attention_backend
    from megatron_sat.spec import get_sat_layer_spec

    backend = resolve_attention_backend("unfused" if attention == "stock" else attention,
                                        device.type, dtype)
    spec = get_sat_layer_spec(sat_config, backend)
    block = TransformerBlock(make_config(shape, dtype), spec, post_layer_norm=False,
                             pre_process=True, post_process=False)
    return block.to(device=device, dtype=dtype).train()


def sat_config(rho: float):
    from megatron_sat.config import SATConfig

    return SATConfig(metric="maxip", selection="sampling", attn_omission_rate=rho,
                     mlp_omission_rate=rho, schedule="constant", total_iters=10**9)
