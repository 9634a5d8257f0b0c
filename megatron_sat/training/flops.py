"""Exact FLOP counts for Llama-style decoders, dense and with SAT (SAT_SPEC §6).

Why a separate module: the trainer's throughput log and the benchmarks must count the
same FLOPs, and users distrust TFLOP/s numbers that ignore GQA or count omitted work.
Everything here is plain arithmetic on a :class:`~megatron_sat.model.LlamaShape`.

Conventions (stated once, used everywhere):

* A matmul ``[m, k] @ [k, n]`` is ``2·m·k·n`` FLOPs; norms, RoPE, softmax, SwiGLU's
  elementwise product and the embedding lookup are not counted (they are O(h) per token).
* Per layer and per token, forward:
  ``2·h·(h_q·f_q + 2·h_kv·f_kv)`` (QKV) ``+ 2·h_q·f_q·h`` (output projection)
  ``+ 4·s·h_q·f_q·c`` (QKᵀ and AV, ``2·s·h_q`` each, over the kept query heads)
  ``+ 3·2·h·f·f_m`` (gate, up and down of SwiGLU), with ``h_q = heads·d_head``,
  ``h_kv = groups·d_head``. ``c`` is the causal factor, ``½`` by default because a
  causal kernel computes only the lower triangle; ``4·s·h_q·½`` is SAT_SPEC's
  ``2·s·h_q`` attention term.
* The LM head adds ``2·h·V_padded`` per token (the padded vocabulary is computed too).
  The embedding lookup is a gather and counts 0.
* Backward is twice the forward, so one training token costs ``3×`` forward. These are
  *model* FLOPs (MFU). Activation recomputation runs parts of the forward again:
  :func:`recompute_flops_per_token` counts that extra work, and model + recompute FLOPs
  are the *hardware* FLOPs (HFU), as Megatron-LM distinguishes them. ``full`` with
  ``uniform`` recomputes every layer's forward, ``block`` the first
  ``recompute_num_layers`` layers; ``selective`` recomputes the attention core
  (``QKᵀ``, softmax, ``AV``) of every layer. The LM head is never recomputed.
* SAT scales Q, the output projection and the attention core by ``f_q`` (kept fraction
  of query heads), K and V by ``f_kv`` (kept fraction of K/V heads: equal to ``f_q`` for
  MHA, 1 for GQA where every group keeps its K/V), and the MLP by ``f_m``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_sat.model import LlamaShape

# Dense bf16 tensor-core peaks (TFLOP/s) used for MFU when the device is recognised.
PEAK_BF16_TFLOPS = {"A800": 312.0, "A100": 312.0, "H800": 989.0, "H100": 989.0, "H200": 989.0}


@dataclass(frozen=True)
class KeptFractions:
    """Kept fractions of SAT units, averaged over layers (all 1.0 for a dense step)."""

    attn_q: float = 1.0
    attn_kv: float = 1.0
    mlp: float = 1.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "KeptFractions":
        if not d:
            return cls()
        return cls(float(d.get("attn_q", 1.0)), float(d.get("attn_kv", 1.0)),
                   float(d.get("mlp", 1.0)))


DENSE = KeptFractions()


def layer_forward_flops_per_token(shape: LlamaShape, seq_length: int,
                                  kept: KeptFractions = DENSE,
                                  causal_factor: float = 0.5) -> float:
    """Forward FLOPs of one transformer layer for one token (see module docstring)."""
    h = shape.hidden_size
    h_q = shape.num_attention_heads * shape.head_dim
    h_kv = shape.num_query_groups * shape.head_dim
    qkv = 2.0 * h * (h_q * kept.attn_q + 2.0 * h_kv * kept.attn_kv)
    proj = 2.0 * h_q * kept.attn_q * h
    core = 4.0 * seq_length * h_q * kept.attn_q * causal_factor
    mlp = 3.0 * 2.0 * h * shape.ffn_hidden_size * kept.mlp
    return qkv + proj + core + mlp


def forward_flops_per_token(shape: LlamaShape, seq_length: int, kept: KeptFractions = DENSE,
                            tp: int = 1, causal_factor: float = 0.5) -> float:
    """Whole-model forward FLOPs per token: all layers plus the LM head (``2·h·V_padded``)."""
    head = 2.0 * shape.hidden_size * shape.padded_vocab_size(tp)
    return shape.num_layers * layer_forward_flops_per_token(
        shape, seq_length, kept, causal_factor) + head


def train_flops_per_token(shape: LlamaShape, seq_length: int, kept: KeptFractions = DENSE,
                          tp: int = 1, causal_factor: float = 0.5) -> float:
    """Forward + backward FLOPs per trained token (backward = 2 × forward)."""
    return 3.0 * forward_flops_per_token(shape, seq_length, kept, tp, causal_factor)


def peak_tflops_for_device(device_name: str | None) -> float | None:
    """The dense bf16 peak for a known accelerator name, else None (MFU is then omitted)."""
    if not device_name:
        return None
    upper = device_name.upper()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in upper:
            return value
    return None


@dataclass(frozen=True)
class Recompute:
    """Megatron's activation-recomputation settings (``None`` granularity: none)."""

    granularity: Optional[str] = None  # full | selective
    method: Optional[str] = None  # uniform | block
    num_layers: Optional[int] = None


def recompute_flops_per_token(shape: LlamaShape, seq_length: int, kept: KeptFractions = DENSE,
                              recompute: Recompute = Recompute(),
                              causal_factor: float = 0.5) -> float:
    """Forward FLOPs per token executed again by recomputation (HFU minus MFU work)."""
    if recompute.granularity == "selective":
        h_q = shape.num_attention_heads * shape.head_dim
        return shape.num_layers * 4.0 * seq_length * h_q * kept.attn_q * causal_factor
    if recompute.granularity == "full":
        layers = shape.num_layers if recompute.method == "uniform" \
            else min(recompute.num_layers or 0, shape.num_layers)
        return layers * layer_forward_flops_per_token(shape, seq_length, kept, causal_factor)
    return 0.0
