"""``SATMLP``: megatron-core SwiGLU MLP computed on a subset of channels.

SAT_SPEC §2 (channel = row ``c`` of gate and up, column ``c`` of ``linear_fc2``),
§3 (selection among the channels local to this TP rank) and §4 (compute).
Why a subclass: parameters and the dense path stay megatron-core's; at ``ρ = 0`` or in
evaluation this is the stock ``MLP``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP, MLPSubmodules

from megatron_sat import ops
from megatron_sat.config import SATConfig, unsupported_settings
from megatron_sat.importance import scores_from_stats
from megatron_sat.sat_state import SATLayerState
from megatron_sat.sequence_parallel import enter_tp_region, exit_tp_region
from megatron_sat.unit_selection import select_channels


class SATMLP(MLP):
    """SwiGLU MLP that, in training at ``ρ > 0``, keeps only selected channels."""

    def __init__(self, config, submodules: MLPSubmodules, is_expert: bool = False,
                 input_size=None, ffn_hidden_size=None, tp_group=None,
                 sat_config: Optional[SATConfig] = None, layer_number: int = 1):
        if sat_config is not None and sat_config.enabled:
            problems = unsupported_settings(config)  # before megatron's own, vaguer checks
            if problems:
                raise ValueError("SAT MLP: " + "; ".join(problems))
        super().__init__(config=config, submodules=submodules, is_expert=is_expert,
                         input_size=input_size, ffn_hidden_size=ffn_hidden_size,
                         tp_group=tp_group)
        self.sat_channels = self.linear_fc2.weight.shape[1]  # f_local
        self.sat_state = SATLayerState(sat_config, "mlp", layer_number, self.tp_group,
                                       self.sat_channels)
        if self.sat_state.config.enabled:
            problems = []
            if not (config.gated_linear_unit and config.activation_func is F.silu):
                problems.append("SAT MLP needs a SwiGLU MLP (gated_linear_unit=True, silu)")
            if is_expert:
                problems.append("MoE experts are not supported with SAT")
            if problems:
                raise ValueError("SAT MLP: " + "; ".join(problems))

    def set_layer_number(self, layer_number: int) -> None:
        """Re-key the selection stream; the spec builder passes the real layer number."""
        self.sat_state.layer_key = 2 * (layer_number - 1) + 1

    def sat_fc1_scores(self, stats: Optional[torch.Tensor]) -> torch.Tensor:
        """``[2f]`` neuron scores of ``linear_fc1`` (gate rows, then up rows; SAT_SPEC §1)."""
        return scores_from_stats(self.sat_state.config.metric, self.linear_fc1.weight, stats)

    @torch.no_grad()
    def sat_select(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Kept local channels ``[k]`` of this iteration (SAT_SPEC §1–§3), cached."""
        return select_channels(self.sat_state, hidden_states, self.sat_fc1_scores,
                               self.sat_channels)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self.sat_state.active(self.training) or per_token_scale is not None:
            if self.training:
                self.sat_state.mark_dense()
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        # hidden_states: [s, b, h] ([s/tp, b, h] with sequence parallelism), the normalised
        # input of linear_fc1; x: [s, b, h], scored on the full sequence.
        sp = self.config.sequence_parallel
        x = enter_tp_region(hidden_states, sp, self.tp_group)
        kept = self.sat_select(x)  # [k]
        rows = self.sat_state.derived_indices(  # gate rows, then up rows
            kept, lambda k: torch.cat([k, k + self.sat_channels]))
        fc1 = ops.linear_rows(x, self.linear_fc1.weight, rows, self.linear_fc1.bias)  # [s, b, 2k]
        gate, up = torch.chunk(fc1, 2, dim=-1)
        inter = F.silu(gate) * up  # [s, b, k]
        out = ops.linear_cols(inter, self.linear_fc2.weight, kept)  # [s, b, h]
        out = exit_tp_region(out, sp, self.tp_group)  # [s(/tp), b, h]
        return out, self.linear_fc2.bias

    def sat_external_parameters(self):
        """Parameters this module reads directly in the SAT path (ZeRO-3 must gather them)."""
        params = [self.linear_fc1.weight, self.linear_fc2.weight]
        params += [p for p in (self.linear_fc1.bias, self.linear_fc2.bias) if p is not None]
        return params
