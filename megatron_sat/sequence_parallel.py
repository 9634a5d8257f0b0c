"""Sequence parallelism for SAT layers: the tensor-parallel region mappings of the
sparse path, and an RMSNorm that works on sequence shards.

Why the mappings: megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` do this
inside their own forward, but SAT's sparse path computes with weight slices directly
(SAT_SPEC §4), so it must apply the same mappings itself:

* without sequence parallelism the input is replicated on the TP ranks (``copy``:
  identity forward, all-reduce of the input gradient) and the row-parallel output is
  all-reduced;
* with it, each TP rank holds ``s / tp`` tokens: the input is all-gathered along the
  sequence (backward: reduce-scatter of its gradient) and the output is reduce-scattered
  back to ``s / tp`` tokens (backward: all-gather).

The gathered input is the full-sequence input of the layer, bit for bit, so SAT scores
it exactly as without sequence parallelism (docs/SAT_SPEC_ADDENDUM.md).

Why the norm: megatron-core's local spec falls back to ``torch.nn.RMSNorm`` (via
``WrappedTorchNorm``) without Apex, and refuses sequence parallelism there, because each
TP rank then sees only its ``s / tp`` tokens and the norm weight's gradient is partial.
:class:`SequenceParallelRMSNorm` is the same RMSNorm whose weight passes through
megatron's ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce of
the gradient over TP in backward), so the gradient is the full-sequence one under any
engine (DeepSpeed or megatron DDP), with no hook on the optimizer side.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)


def enter_tp_region(hidden_states: torch.Tensor, sequence_parallel: bool,
                    group) -> torch.Tensor:
    """``[s/tp or s, b, h]`` → ``[s, b, h]``: the full-sequence input every TP rank uses."""
    if sequence_parallel:
        return gather_from_sequence_parallel_region(hidden_states,
                                                    tensor_parallel_output_grad=True,
                                                    group=group)
    return copy_to_tensor_model_parallel_region(hidden_states, group=group)


def exit_tp_region(partial: torch.Tensor, sequence_parallel: bool, group) -> torch.Tensor:
    """Sum a row-parallel partial output ``[s, b, h]`` over TP (→ ``[s/tp, b, h]`` with SP)."""
    if sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(partial, group=group)
    return reduce_from_tensor_model_parallel_region(partial, group=group)


class SequenceParallelRMSNorm(torch.nn.Module):
    """RMSNorm over the hidden dimension of ``[s/tp, b, h]`` sequence shards.

    Constructor signature of megatron's norm modules (``config, hidden_size, eps``); the
    parameter is ``weight``, like ``torch.nn.RMSNorm``, so checkpoints are unchanged.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError("SequenceParallelRMSNorm implements RMSNorm only")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = copy_to_tensor_model_parallel_region(self.weight)  # grad: all-reduce over TP
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


def sequence_parallel_block_spec(layer_spec, num_layers: int):
    """A ``TransformerBlockSubmodules`` of ``num_layers`` copies of ``layer_spec`` whose
    norms (input, pre-MLP and final) are :class:`SequenceParallelRMSNorm`."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    spec = copy.deepcopy(layer_spec)
    spec.submodules.input_layernorm = SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers,
                                      layer_norm=SequenceParallelRMSNorm)
