"""Llama-2-family model shapes and the megatron-core ``GPTModel`` built from them.

Why one place: the trainer, the checkpoint converter, the perplexity tool and the
benchmarks must build *the same* model from the same shape, or checkpoints stop
surviving the trip.  A shape is a validated dataclass; presets name the public models.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_sat.config import SATConfig


@dataclass(frozen=True)
class LlamaShape:
    """The architecture of a Llama-2-family decoder (RMSNorm, SwiGLU, RoPE, no bias)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self):
        problems = []
        for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "vocab_size", "max_position_embeddings",
                  "make_vocab_size_divisible_by"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                problems.append(f"{f}={v!r} must be a positive integer")
        if not problems:
            if self.hidden_size % self.num_attention_heads:
                problems.append(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}")
            if self.num_attention_heads % self.num_query_groups:
                problems.append(
                    f"num_attention_heads={self.num_attention_heads} is not divisible by "
                    f"num_query_groups={self.num_query_groups}")
        if problems:
            raise ValueError("invalid model shape: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check_tp(self, tp: int) -> None:
        """One-line error when TP cannot split the heads, groups or channels evenly."""
        bad = [f"{n}={v}" for n, v in (("num_attention_heads", self.num_attention_heads),
                                         ("num_query_groups", self.num_query_groups),
                                         ("ffn_hidden_size", self.ffn_hidden_size))
               if v % tp]
        if bad:
            raise ValueError(
                f"--tensor-model-parallel-size {tp} does not divide {', '.join(bad)}; "
                f"choose a TP size that divides the head, group and channel counts")

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocabulary padded to a multiple of ``make_vocab_size_divisible_by × TP`` (§3)."""
        m = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / m) * m)

    def replace(self, **changes) -> "LlamaShape":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaShape":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


PRESETS = {
    "llama2-7b": LlamaShape(32, 4096, 11008, 32, 32),
    "llama2-13b": LlamaShape(40, 5120, 13824, 40, 40),
    "llama2-70b": LlamaShape(80, 8192, 28672, 64, 8),
    "tinyllama-1.1b": LlamaShape(22, 2048, 5632, 32, 4, max_position_embeddings=2048),
    "tiny": LlamaShape(2, 128, 352, 4, 4, max_position_embeddings=512),
}


def transformer_config(shape: LlamaShape, tp: int = 1, params_dtype: torch.dtype = torch.float32,
                       use_cpu_initialization: Optional[bool] = None,
                       init_method_std: float = 0.02, sequence_parallel: bool = False,
                       recompute_granularity: Optional[str] = None,
                       recompute_method: Optional[str] = None,
                       recompute_num_layers: Optional[int] = None):
    """megatron-core ``TransformerConfig`` for a Llama shape, with CPU-safe fusions off.

    ``sequence_parallel`` and the ``recompute_*`` settings are megatron-core's own (the
    trainer's ``--sequence-parallel`` / ``--recompute-*`` flags); SAT layers honour them.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    shape.check_tp(tp)
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=on_cpu if use_cpu_initialization is None else use_cpu_initialization,
        init_method_std=init_method_std,
        bias_activation_fusion=not on_cpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        sequence_parallel=sequence_parallel,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
    )


def build_gpt_model(shape: LlamaShape, sat: Optional[SATConfig] = None, tp: int = 1,
                    params_dtype: torch.dtype = torch.float32, seq_length: Optional[int] = None,
                    init_method_std: float = 0.02, attention_backend: str = "unfused",
                    **parallel_settings):
    """A megatron-core ``GPTModel`` with Llama architecture, SAT layers when ``sat`` is on.

    Requires :func:`megatron_sat.parallel.initialize_parallel` to have run. The state-dict
    layout is megatron-core's own whatever ``sat``, the attention backend, recomputation
    or sequence parallelism, so checkpoints move freely between runs.
    ``attention_backend`` is a resolved backend (``flash``, ``sdpa``, ``unfused``; see
    :mod:`megatron_sat.core_attention`); ``parallel_settings`` are
    :func:`transformer_config`'s ``sequence_parallel`` and ``recompute_*`` keywords.
    """
    from megatron.core.models.gpt import GPTModel

    from megatron_sat.sequence_parallel import sequence_parallel_block_spec
    from megatron_sat.spec import get_sat_layer_spec

    config = transformer_config(shape, tp=tp, params_dtype=params_dtype,
                                init_method_std=init_method_std, **parallel_settings)
    spec = get_sat_layer_spec(sat, attention_backend)
    if config.sequence_parallel:
        spec = sequence_parallel_block_spec(spec, shape.num_layers)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=shape.padded_vocab_size(tp),
        max_sequence_length=seq_length or shape.max_position_embeddings,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(shape.rotary_base),
    )
    if not torch.cuda.is_available():
        return model
    return model.cuda()
