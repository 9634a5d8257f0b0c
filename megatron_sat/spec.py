"""The GPT layer ``ModuleSpec`` with SAT attention and MLP swapped in.

Why a spec: megatron-core builds layers from specs, so SAT is a swap of two module
classes in the stock local (non-TransformerEngine) Llama spec, never an edit of
upstream code.  Parameter names and shapes are unchanged.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_sat.attention import SATSelfAttention
from megatron_sat.config import SATConfig
from megatron_sat.core_attention import with_attention_backend
from megatron_sat.mlp import SATMLP


class _KnownSATMLPFilter(logging.Filter):
    """Drop megatron-core's "Unknown MLP type" warning, logged once per layer.

    ``TransformerLayer`` recognises only the exact ``MLP`` class when deciding whether to
    pass ``tp_group``; :class:`SATMLP` then takes the default TP group, which is the same
    group, so the warning is noise.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


_MLP_FILTER = _KnownSATMLPFilter()
logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_MLP_FILTER)


def get_sat_layer_spec(sat_config: Optional[SATConfig] = None,
                       attention_backend: str = "unfused") -> ModuleSpec:
    """A Llama (RMSNorm, SwiGLU) GPT layer spec; SAT layers when ``sat_config`` is given.

    With ``sat_config=None`` it is megatron-core's stock local spec.  With a config
    (enabled or not) attention and MLP are :class:`SATSelfAttention` / :class:`SATMLP`;
    they behave as the stock layers whenever the current rate is 0 (SAT_SPEC §4).
    ``attention_backend`` (``flash``, ``sdpa`` or ``unfused``, already resolved; see
    :mod:`megatron_sat.core_attention`) picks the core attention of dense steps, and SAT's
    sparse path runs the same kernel.

    Example::

        spec = get_sat_layer_spec(SATConfig(total_iters=10_000))
        model = GPTModel(config, spec, vocab_size, max_sequence_length=4096,
                         position_embedding_type="rope")
    """
    spec = with_attention_backend(get_gpt_layer_local_spec(normalization="RMSNorm"),
                                  attention_backend)
    if sat_config is None:
        return spec
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention
    attn.module = SATSelfAttention
    attn.params = {**attn.params, "sat_config": sat_config}
    mlp = spec.submodules.mlp
    mlp.module = SATMLP
    mlp.params = {**(mlp.params or {}), "sat_config": sat_config}
    return spec
