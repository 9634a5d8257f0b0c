"""A megatron-core core-attention module that runs PyTorch SDPA (flash kernels on GPU).

Why the benchmark needs it: megatron-core's local spec uses ``DotProductAttention``
(explicit ``baddbmm`` + softmax over the full, masked score matrix), while SAT's sparse
path calls ``scaled_dot_product_attention``.  Timing one against the other would credit
SAT with a faster attention kernel.  With ``--attention sdpa`` (the default) the dense,
rate-0 and ideal variants swap this module in through the spec, so every variant runs
the very same kernel and the comparison isolates what SAT itself costs and saves.
"""

from __future__ import annotations

import copy

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_sat import ops


class SDPACoreAttention(MegatronModule):
    """Drop-in for ``DotProductAttention``: ``[sq, b, np, hn]`` inputs → ``[sq, b, np*hn]``."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, **kwargs):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention supports neither attention_bias "
                             "nor packed sequences")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        p = self.dropout if self.training else 0.0
        return ops.attention(query, key, value, attention_mask, causal=causal, scale=self.scale,
                             dropout_p=p)


def with_sdpa_core_attention(spec):
    """A copy of a layer ``ModuleSpec`` whose core attention is :class:`SDPACoreAttention`."""
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


__all__ = ["SDPACoreAttention", "with_sdpa_core_attention"]
