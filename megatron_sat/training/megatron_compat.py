"""Megatron-LM / Megatron-DeepSpeed flags that a user's launch script carries.

Why a separate layer: the promise to users is "take the script you already run, add
``--sat``". Their scripts carry flags that only select what this trainer always does
(``--data-impl mmap``, ``--optimizer adam``, ...), aliases (``--use-distributed-optimizer``
is ZeRO-1 here), and a few things we cannot honour (pipeline parallelism, dropout). This
module accepts the first two kinds and says so in the log, and turns the third kind into
one-line errors naming what to use instead, so :mod:`arguments` stays about our own flags.

Flags that another part of the trainer may already define (the activation-recomputation
flags) are only added when absent, so the layers merge without argparse conflicts.
"""

from __future__ import annotations

import argparse

PP_RECIPE = ("megatron-sat has no pipeline parallelism; shard a large model with "
             "--tensor-model-parallel-size (within a node, e.g. 8) and --zero-stage 3 across "
             "nodes instead (examples/llama2/pretrain_llama2_70b_sat.sh), and drop "
             "--pipeline-model-parallel-size or set it to 1")
DATA_IMPLS = ("mmap", "infer", "lazy", "cached")
BACKENDS = ("nccl", "gloo", "ccl", "hccl")


def _has(parser: argparse.ArgumentParser, flag: str) -> bool:
    return flag in parser._option_string_actions


def _add(group, parser, *flags, **kwargs) -> None:
    """Add ``flags`` unless another layer already defines the first of them."""
    if not _has(parser, flags[0]):
        group.add_argument(*flags, **kwargs)


def add_compat_flags(parser: argparse.ArgumentParser) -> None:
    """Add the compatibility flags the trainer does not define itself."""
    g = parser.add_argument_group(
        "Megatron-LM / Megatron-DeepSpeed compatibility",
        "Accepted so existing launch scripts run unchanged; what each one does here is "
        "printed at start-up.")
    _add(g, parser, "--data-impl", choices=DATA_IMPLS, default=None,
         help="accepted; data are always read as memory-mapped .bin/.idx")
    _add(g, parser, "--distributed-backend", choices=BACKENDS, default=None,
         help="accepted; nccl is used on GPUs and gloo on CPU-only hosts")
    _add(g, parser, "--no-pipeline-parallel", action="store_true",
         help="accepted; there is no pipeline parallelism (always the case)")
    _add(g, parser, "--use-distributed-optimizer", action="store_true",
         help="shards optimizer states over data-parallel ranks: ZeRO-1 unless --zero-stage "
              "says otherwise")
    _add(g, parser, "--attention-dropout", type=float, default=0.0,
         help="must be 0 (Llama pre-training uses no dropout; SAT layers have none)")
    _add(g, parser, "--hidden-dropout", type=float, default=0.0,
         help="must be 0 (Llama pre-training uses no dropout; SAT layers have none)")
    # Megatron-DeepSpeed's activation-checkpointing block; --recompute-* themselves are the
    # trainer's own flags (training/feature_arguments.py).
    _add(g, parser, "--deepspeed-activation-checkpointing", action="store_true",
         help="Megatron-DeepSpeed's switch for DeepSpeed's activation checkpointing")
    _add(g, parser, "--checkpoint-activations", action="store_true",
         help="old Megatron name for --recompute-granularity full --recompute-method uniform")
    _add(g, parser, "--wandb-project", default=None,
         help="log to Weights & Biases under this project (needs the wandb package)")
    _add(g, parser, "--wandb-exp-name", default=None, help="W&B run name")
    _add(g, parser, "--wandb-save-dir", default=None, help="W&B local directory")
    _add(g, parser, "--wandb-entity", default=None, help="W&B entity (team)")


def apply_compat(a: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Resolve compatibility flags in ``a`` in place; returns ``(notes for the log, problems)``."""
    notes, problems = [], []
    if getattr(a, "pipeline_model_parallel_size", 1) != 1:
        problems.append(f"--pipeline-model-parallel-size {a.pipeline_model_parallel_size} "
                        f"is not supported: {PP_RECIPE}")
    for flag in ("attention_dropout", "hidden_dropout"):
        v = getattr(a, flag, 0.0)
        if v:
            problems.append(f"--{flag.replace('_', '-')} {v} is not supported (no dropout in "
                            f"the Llama or SAT layers); set it to 0 or drop it")
    if a.data_impl is not None:
        notes.append(f"--data-impl {a.data_impl}: data are read as memory-mapped .bin/.idx")
    if a.distributed_backend is not None:
        notes.append(f"--distributed-backend {a.distributed_backend}: the backend follows the "
                     f"device (nccl on GPUs, gloo on CPU)")
    if a.no_pipeline_parallel:
        notes.append("--no-pipeline-parallel: always the case")
    if a.optimizer == "adam":
        notes.append("--optimizer adam: AdamW (decoupled weight decay), as in Megatron")
    if a.no_query_key_layer_scaling:
        notes.append("--no-query-key-layer-scaling: always the case")
    if a.use_distributed_optimizer:
        if a.zero_stage is None:
            a.zero_stage = 1
            notes.append("--use-distributed-optimizer: ZeRO-1 (optimizer states sharded over "
                         "data-parallel ranks)")
        elif a.zero_stage == 0:
            problems.append("--use-distributed-optimizer contradicts --zero-stage 0; drop one "
                            "(the distributed optimizer is ZeRO-1)")
        else:
            notes.append(f"--use-distributed-optimizer: covered by --zero-stage {a.zero_stage}")
    if a.checkpoint_activations and a.recompute_granularity is None:
        a.recompute_granularity, a.recompute_method = "full", a.recompute_method or "uniform"
    if a.deepspeed_activation_checkpointing:
        notes.append("--deepspeed-activation-checkpointing: recomputation follows "
                     "--recompute-granularity/--recompute-method through megatron-core's "
                     "checkpointing" if a.recompute_granularity else
                     "--deepspeed-activation-checkpointing without --recompute-granularity: "
                     "activations are kept (no recomputation)")
    if a.recompute_granularity == "full" and a.recompute_num_layers is None:
        # Megatron-DeepSpeed's default (its llama2 script gives no --recompute-num-layers):
        # uniform: every layer is its own recomputed chunk; block: the first layer.
        a.recompute_num_layers = 1
        notes.append("--recompute-num-layers 1 (Megatron-DeepSpeed's default)")
    return notes, problems
