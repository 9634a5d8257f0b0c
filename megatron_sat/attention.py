"""``SATSelfAttention``: megatron-core self-attention computed on a subset of heads.

SAT_SPEC §2 (head-aligned selection, GQA), §3 (selection, TP-local) and §4 (compute).
Why a subclass swapped in by ``ModuleSpec``: the parameters, their names and the dense
path stay megatron-core's own, so checkpoints, TP sharding and converters are unchanged;
only the training forward at ``ρ > 0`` differs, and at ``ρ = 0`` this *is* the stock layer.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp

from megatron_sat import ops
from megatron_sat.config import SATConfig, unsupported_settings
from megatron_sat.core_attention import attention_over_heads, backend_of
from megatron_sat.importance import qkv_head_scores, scores_from_stats
from megatron_sat.sat_state import SATLayerState
from megatron_sat.sequence_parallel import enter_tp_region, exit_tp_region
from megatron_sat.unit_selection import select_heads


def _attention_setting_problems(config) -> list:
    """Attention settings the SAT path (SDPA over kept heads, §4) would silently ignore."""
    problems = []
    if config.window_size is not None:
        problems.append(f"window_size={config.window_size} (sliding-window attention) "
                        "is not supported with SAT; unset it")
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        problems.append(f"softmax_type={config.softmax_type!r} is not supported with "
                        "SAT; use 'vanilla'")
    if config.no_rope_freq and any(config.no_rope_freq):
        problems.append("no_rope_freq (layers without RoPE) is not supported with SAT; "
                        "unset it")
    return problems


class SATSelfAttention(SelfAttention):
    """Self-attention that, in training at ``ρ > 0``, keeps only selected heads.

    MHA (one query head per group): whole heads are units; kept heads keep their Q, K,
    V rows and their ``linear_proj`` columns.  GQA: query heads are units, every local
    group keeps the same ``k_q`` of them and all K/V heads stay (SAT_SPEC §2).
    """

    def __init__(self, config, submodules: SelfAttentionSubmodules, layer_number: int,
                 attn_mask_type=AttnMaskType.causal, cp_comm_type=None, pg_collection=None,
                 sat_config: Optional[SATConfig] = None):
        if sat_config is not None and sat_config.enabled:
            # Before megatron builds anything: some of these fail there with a long
            # message about a missing CUDA extension instead of naming the setting.
            problems = unsupported_settings(config) + _attention_setting_problems(config)
            if problems:
                raise ValueError("SAT attention: " + "; ".join(problems))
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection)
        self.sat_groups = self.num_query_groups_per_partition
        self.sat_q_per_group = self.num_attention_heads_per_partition // self.sat_groups
        self.sat_head_dim = self.hidden_size_per_attention_head
        # The sparse path runs the dense path's kernel (flash / sdpa / unfused).
        self.sat_attention_backend = backend_of(self.core_attention)
        units = self.sat_groups if self.sat_q_per_group == 1 else self.num_attention_heads_per_partition
        self.sat_state = SATLayerState(sat_config, "attn", layer_number, self.tp_group, units)
        if self.sat_state.config.enabled:
            problems = []
            if config.num_query_groups % self.world_size:
                problems.append(f"num_query_groups={config.num_query_groups} is not divisible by "
                                f"tensor-parallel size {self.world_size}")
            if config.attention_output_gate:
                problems.append("attention_output_gate is not supported with SAT")
            if self.pg_collection.cp.size() > 1:
                problems.append("context parallelism is not supported with SAT")
            for norm in (self.q_layernorm, self.k_layernorm):
                if norm is not None and not isinstance(norm, IdentityOp):
                    problems.append("q/k layernorm is not supported with SAT")
                    break
            if problems:
                raise ValueError("SAT attention: " + "; ".join(problems))

    # ------------------------------------------------------------------ selection
    def sat_head_sums(self, stats: Optional[torch.Tensor]) -> torch.Tensor:
        """``[ng, q + 2]`` head sums of ``linear_qkv``'s neuron scores (SAT_SPEC §1–§2)."""
        s = scores_from_stats(self.sat_state.config.metric, self.linear_qkv.weight,
                              stats)  # [ng * (q + 2) * d]
        return qkv_head_scores(s, self.sat_groups, self.sat_q_per_group, self.sat_head_dim)

    @torch.no_grad()
    def sat_select(self, hidden_states: torch.Tensor):
        """The kept heads of this iteration (SAT_SPEC §1–§3), chosen once and cached.

        Returns ``(kept_groups [g'], kept_q [g', k_q])``: local group indices and, per
        kept group, the kept query heads' indices within the group.
        """
        return select_heads(self.sat_state, hidden_states, self.sat_head_sums,
                            self.sat_groups, self.sat_q_per_group)

    def sat_indices(self, kept_groups: torch.Tensor, kept_q: torch.Tensor):
        """Rows of fused ``linear_qkv`` and columns of ``linear_proj`` for the kept heads.

        Row order per kept group is ``[kept q heads, k, v]``: the megatron-core fused
        layout with ``k_q`` query heads, so the result splits like a narrower layer.
        """
        q, d = self.sat_q_per_group, self.sat_head_dim
        dev = kept_groups.device
        block = (q + 2) * d
        heads_in_block = torch.cat(  # [g', k_q + 2] head slots within each group block
            [kept_q, torch.full_like(kept_q[:, :1], q), torch.full_like(kept_q[:, :1], q + 1)], 1)
        offs = torch.arange(d, device=dev)
        rows = (kept_groups[:, None, None] * block + heads_in_block[:, :, None] * d
                + offs).reshape(-1)  # [g' * (k_q + 2) * d]
        q_heads = kept_groups[:, None] * q + kept_q  # [g', k_q] local query-head ids
        cols = (q_heads[:, :, None] * d + offs).reshape(-1)  # [g' * k_q * d]
        return rows, cols

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states, attention_mask, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, rotary_pos_cos=None,
                rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                packed_seq_params=None, sequence_len_offset=None, *, inference_params=None):
        sparse = self.sat_state.active(self.training) and inference_context is None \
            and inference_params is None
        if sparse and packed_seq_params is not None:
            raise ValueError("SAT attention: packed_seq_params (packed THD sequences) is not "
                             "supported by the sparse path; train with padded [s, b] batches "
                             "or disable SAT")
        if not sparse:
            if self.training:
                self.sat_state.mark_dense()
            return super().forward(
                hidden_states, attention_mask, key_value_states=key_value_states,
                inference_context=inference_context, rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
                packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
                inference_params=inference_params)
        return self._sat_forward(hidden_states, attention_mask, rotary_pos_emb, attention_bias)

    def _sat_forward(self, hidden_states, attention_mask, rotary_pos_emb, attention_bias):
        # hidden_states: [sq, b, h] ([sq/tp, b, h] with sequence parallelism), the
        # normalised input of linear_qkv; x: [sq, b, h], scored on the full sequence.
        sp = self.config.sequence_parallel
        x = enter_tp_region(hidden_states, sp, self.tp_group)
        selection = self.sat_select(x)
        kept_groups, kept_q = selection
        rows, cols = self.sat_state.derived_indices(selection, lambda s: self.sat_indices(*s))
        g, k_q = kept_q.shape
        d = self.sat_head_dim
        qkv = ops.linear_rows(x, self.linear_qkv.weight, rows, self.linear_qkv.bias)
        sq, b = qkv.shape[:2]
        qkv = qkv.view(sq, b, g, (k_q + 2) * d)  # [sq, b, g', (k_q + 2) * d]
        query, key, value = torch.split(qkv, [k_q * d, d, d], dim=3)
        query = query.reshape(sq, b, g * k_q, d)  # [sq, b, g' * k_q, d]

        if rotary_pos_emb is not None:
            if not isinstance(rotary_pos_emb, tuple):
                rotary_pos_emb = (rotary_pos_emb,) * 2
            q_emb, k_emb = rotary_pos_emb
            query = apply_rotary_pos_emb(query, q_emb, config=self.config,
                                         cp_group=self.pg_collection.cp)
            key = apply_rotary_pos_emb(key, k_emb, config=self.config,
                                       cp_group=self.pg_collection.cp)

        context = self._sat_core_attention(query, key, value, attention_mask, attention_bias)
        # context: [sq, b, g' * k_q * d] -> kept columns of linear_proj, then TP reduce.
        out = ops.linear_cols(context, self.linear_proj.weight, cols)  # [sq, b, h]
        out = exit_tp_region(out, sp, self.tp_group)  # [sq(/tp), b, h]
        bias = self.linear_proj.bias
        if bias is not None and not self.linear_proj.skip_bias_add:
            return out + bias, None
        return out, bias

    def _sat_core_attention(self, query, key, value, attention_mask, attention_bias):
        """The run's attention backend over the kept heads (see ``core_attention``).

        query ``[sq, b, nq, d]``, key/value ``[sk, b, nkv, d]`` → ``[sq, b, nq * d]``.
        Honours megatron's selective recomputation of ``core_attn``
        (``recompute_granularity='selective'``): the kernel runs under
        ``tensor_parallel.checkpoint`` and is recomputed in backward, as the stock
        layer's ``_checkpointed_attention_forward`` does.
        """
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SAT attention")
        if self.checkpoint_core_attention and self.training:
            return tensor_parallel.checkpoint(self._sat_attention_kernel, False,
                                              query, key, value, attention_mask)
        return self._sat_attention_kernel(query, key, value, attention_mask)

    def _sat_attention_kernel(self, query, key, value, attention_mask):
        causal = attention_mask is None and self.attn_mask_type == AttnMaskType.causal
        scale = self.config.softmax_scale
        if scale is None:
            scale = self.sat_head_dim ** -0.5
        p = self.config.attention_dropout if self.training else 0.0
        if p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return attention_over_heads(self.sat_attention_backend, query, key, value,
                                            attention_mask, causal=causal, scale=scale,
                                            dropout_p=p)
        return attention_over_heads(self.sat_attention_backend, query, key, value,
                                    attention_mask, causal=causal, scale=scale)

    def sat_external_parameters(self):
        """Parameters this module reads directly in the SAT path (ZeRO-3 must gather them)."""
        params = [self.linear_qkv.weight, self.linear_proj.weight]
        params += [p for p in (self.linear_qkv.bias, self.linear_proj.bias) if p is not None]
        return params
