"""Megatron-style command-line flags -> :class:`TrainConfig`.

Why: users arrive with Megatron-LM / Megatron-DeepSpeed launch scripts. We accept their
Llama flags (including the redundant architecture switches), refuse the ones that
contradict the Llama architecture, and turn everything into validated dataclasses so no
library code ever reads ``args``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from megatron_sat.model import PRESETS, LlamaShape
from megatron_sat.tools.text_tokenizer import TOKENIZER_TYPES, tokenizer_kind
from megatron_sat.training.configs import (BatchConfig, CheckpointConfig, ConfigError,
                                           DataConfig, EngineConfig, LoggingConfig,
                                           OptimizerConfig, ParallelConfig,
                                           TrainConfig)
from megatron_sat.training.help_text import DESCRIPTION, EPILOG, HelpFormatter
from megatron_sat.training.megatron_compat import add_compat_flags, apply_compat
from megatron_sat.training.feature_arguments import (  # noqa: F401 - re-exported
    _add_performance_args, _performance_from_args, add_sat_arguments, sat_config_from_args)

SHAPE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "vocab_size", "max_position_embeddings", "make_vocab_size_divisible_by")
LR_DECAY_STYLES = ("cosine", "linear", "constant", "WSD", "inverse-square-root")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`ConfigError` (one line) instead of exiting."""

    def error(self, message):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    p = _Parser(prog=prog if prog.startswith("megatron-sat") else "pretrain_llama.py",
                allow_abbrev=False, description=DESCRIPTION,
                epilog=EPILOG, formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=sorted(PRESETS),
                   help="shape preset; explicit flags override it. Without a preset or shape "
                        "flags the shape comes from the checkpoint in --load")
    for name in SHAPE_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), type=int,
                       help="default: from --model, else from the checkpoint in --load"
                       + (" (else the tokenizer's size)" if name == "vocab_size" else ""))
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model shape from the checkpoint in --load (it wins over "
                        "shape flags), as in Megatron")
    g.add_argument("--num-query-groups", type=int, help="GQA groups (Megatron-LM name)")
    g.add_argument("--num-key-value-heads", type=int, help="GQA groups (Megatron-DeepSpeed name)")
    g.add_argument("--group-query-attention", action="store_true", help="accepted; implied")
    g.add_argument("--rotary-base", type=float)
    g.add_argument("--norm-epsilon", "--layernorm-epsilon", dest="norm_epsilon", type=float)
    g.add_argument("--init-method-std", type=float, default=0.02)
    # Llama architecture switches from Megatron-DeepSpeed scripts: accepted, checked.
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--normalization", default="rmsnorm")
    g.add_argument("--use-rotary-position-embeddings", action="store_true")
    g.add_argument("--position-embedding-type", default="rope")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--add-bias-linear", action="store_true")
    g.add_argument("--no-query-key-layer-scaling", action="store_true")
    g.add_argument("--apply-query-key-layer-scaling", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, help="default: micro-batch x DP")
    g.add_argument("--seq-length", type=int, default=2048)
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--exit-interval", type=int, default=0,
                   help="stop with a checkpoint when the iteration is a multiple of this")
    g.add_argument("--max-skipped-iters", type=int, default=10,
                   help="abort (with a checkpoint) after this many NaN/inf steps in a row")
    g.add_argument("--inject-nan-iters", type=str, default="",
                   help="testing: comma-separated iterations whose loss is made NaN")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adam", choices=["adam", "adamw"],
                   help="both are AdamW (decoupled weight decay), as Megatron's adam")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine", choices=LR_DECAY_STYLES,
                   help="megatron-core OptimizerParamScheduler style (Megatron default: linear)")
    g.add_argument("--lr-warmup-iters", type=int, default=0,
                   help="linear warm-up from --lr-warmup-init; step 1 runs at the init value")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm-up as a fraction of --lr-decay-iters (instead of --lr-warmup-iters)")
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-decay-iters", type=int, default=0, help="0: --train-iters")
    g.add_argument("--lr-wsd-decay-style", default="exponential", choices=WSD_DECAY_STYLES,
                   help="annealing shape of the WSD schedule's last phase")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="length of WSD's annealing phase (required with WSD)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="(Megatron default: 0.01)")
    g.add_argument("--start-weight-decay", type=float, default=None,
                   help="with --end-weight-decay: weight decay schedule (default: constant)")
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument("--weight-decay-incr-style", default="constant",
                   choices=("constant", "linear", "cosine"))
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95, help="(Megatron default: 0.999)")
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)

    g = p.add_argument_group("parallelism and DeepSpeed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="must be 1: use TP within a node and --zero-stage 3 across nodes")
    g.add_argument("--deepspeed", action="store_true",
                   help="accepted; the engine is always DeepSpeed")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config")
    g.add_argument("--zero-stage", type=int)
    g.add_argument("--local_rank", "--local-rank", type=int, help="set by the deepspeed launcher")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=[],
                   help="[w1] prefix1 [w2] prefix2 ...: Megatron .bin/.idx data")
    g.add_argument("--mock-data", action="store_true",
                   help="megatron-core's synthetic MockGPTDataset instead of --data-path")
    g.add_argument("--split", default="949,50,1")
    g.add_argument("--data-cache-path")
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="no loss on end-of-document tokens, as in Megatron")
    g.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=TOKENIZER_TYPES,
                   help="SentencePiece kinds read --tokenizer-model as a tokenizer.model; the "
                        "HF kinds as a tokenizer folder")
    g.add_argument("--tokenizer-model")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--finetune", action="store_true",
                   help="load weights only; iteration, data position, optimizer and RNG start "
                        "fresh")
    g.add_argument("--no-load-optim", action="store_true",
                   help="load weights, iteration and data position, not the optimizer state")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore RNG states")
    g.add_argument("--ckpt-step", type=int,
                   help="load iter_N of --load instead of the one \x27latest\x27 names")
    g.add_argument("--overwrite-save", action="store_true",
                   help="let a new run replace the run already held in --save")
    g.add_argument("--keep-last-n-checkpoints", type=int, default=0,
                   help="remove older checkpoints once a new one is complete (default: keep all)")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=0)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir")
    g.add_argument("--metrics-file", help="JSONL of every logged value "
                   "(default: <tensorboard-dir or save>/metrics.jsonl)")
    g.add_argument("--peak-tflops", type=float, help="device peak for MFU when not recognised")

    add_sat_arguments(p)
    _add_performance_args(p)
    add_compat_flags(p)  # after the performance flags, which it defers to
    return p


def _architecture_problems(a) -> list[str]:
    """Megatron-DeepSpeed Llama switches that contradict the Llama architecture."""
    p = []
    if a.normalization.lower() != "rmsnorm":
        p.append(f"--normalization {a.normalization} contradicts Llama (RMSNorm); use rmsnorm")
    if a.position_embedding_type.lower() != "rope":
        p.append(f"--position-embedding-type {a.position_embedding_type} contradicts Llama "
                 f"(rotary); use rope")
    if a.add_bias_linear:
        p.append("--add-bias-linear contradicts Llama (no biases); drop it")
    if a.apply_query_key_layer_scaling:
        p.append("--apply-query-key-layer-scaling is not supported; drop it")
    if a.fp16:
        p.append("--fp16 is not supported; use --bf16 (or fp32, the default)")
    return p


def _tokenizer_facts(kind: str, path: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """(vocab size, eos id) of the tokenizer, or (None, None) without one.

    The same type names as ``tools/preprocess_data.py`` (one table, text_tokenizer.py).
    """
    if not path or kind == "null":
        return None, None
    if kind == "hf":
        if not os.path.isdir(path):
            raise ConfigError(f"--tokenizer-model {path} is not a folder; HuggingFaceTokenizer "
                              f"needs an HF tokenizer folder")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        return len(tok), tok.eos_token_id
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.model")):
        path = os.path.join(path, "tokenizer.model")
    from megatron_sat.tools.cli import ToolError
    from megatron_sat.tools.file_checks import check_sentencepiece

    try:
        pieces, _, eos = check_sentencepiece(path, "--tokenizer-model")
    except ToolError as e:
        raise ConfigError(str(e)) from None
    return pieces, eos


def _checkpoint_shape(a) -> Optional[dict]:
    """The ``--load`` checkpoint's architecture (from its meta.json), or None.

    The one place the shape is read from a checkpoint: the same folder resolution
    (``latest``, ``--ckpt-step``, the ``--load == --save`` restart idiom) as the load itself.
    """
    from megatron_sat.training.resume import checkpoint_meta, resolve_load

    it_dir = resolve_load(a.load, a.save, a.ckpt_step, a.finetune)
    if it_dir is None:
        if a.use_checkpoint_args:
            raise ConfigError(f"--use-checkpoint-args: no megatron-sat checkpoint in --load "
                              f"{a.load}; convert HF weights there first or give the shape flags")
        return None
    return dict(checkpoint_meta(it_dir)["shape"])


CORE_SHAPE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups")


def _shape_from_args(a, tokenizer_vocab: Optional[int], ckpt_shape: Optional[dict] = None,
                     notes: Optional[list] = None) -> LlamaShape:
    """The model shape: flags over ``--model`` over the ``--load`` checkpoint's shape, except
    with ``--use-checkpoint-args``, where the checkpoint wins over every flag (Megatron)."""
    notes = [] if notes is None else notes
    shape_flags = [n for n in SHAPE_FLAGS + ("num_query_groups", "num_key_value_heads",
                                             "rotary_base", "norm_epsilon")
                   if getattr(a, n) is not None]
    if ckpt_shape and a.use_checkpoint_args:
        notes.append(f"model shape from the checkpoint in --load {a.load}"
                     + (f" (over the flags {', '.join(shape_flags)})" if shape_flags else ""))
        try:
            return LlamaShape.from_dict(ckpt_shape)
        except ValueError as e:
            raise ConfigError(f"--load {a.load}: bad shape in meta.json ({e})") from None
    if ckpt_shape and not a.model and not shape_flags:
        notes.append(f"model shape from the checkpoint in --load {a.load}")
    base = PRESETS[a.model].to_dict() if a.model else {}
    # A checkpoint's architecture is the default: every field not set by a flag (and the
    # core shape unless --model names one, which must then match) comes from it.
    for k, v in (ckpt_shape or {}).items():
        if k not in CORE_SHAPE or k not in base:
            base[k] = v
    if ckpt_shape and tokenizer_vocab is not None and a.vocab_size is None \
            and tokenizer_vocab != ckpt_shape["vocab_size"]:
        raise ConfigError(f"--tokenizer-model has {tokenizer_vocab} pieces but the --load "
                          f"checkpoint's vocabulary has {ckpt_shape['vocab_size']}; give the "
                          f"tokenizer the checkpoint was made for (or resize the checkpoint "
                          f"with tools/extend_vocab.py)")
    groups = {v for v in (a.num_query_groups, a.num_key_value_heads) if v is not None}
    if len(groups) > 1:
        raise ConfigError(f"--num-query-groups {a.num_query_groups} and --num-key-value-heads "
                          f"{a.num_key_value_heads} disagree; give one of them")
    for name in SHAPE_FLAGS:
        if getattr(a, name) is not None:
            base[name] = getattr(a, name)
    if a.vocab_size is None and tokenizer_vocab is not None and not ckpt_shape:
        base["vocab_size"] = tokenizer_vocab
    if groups:
        base["num_query_groups"] = groups.pop()
    elif a.num_attention_heads is not None:
        preset = PRESETS.get(a.model)
        if preset is None or preset.num_query_groups == preset.num_attention_heads:
            base["num_query_groups"] = a.num_attention_heads  # MHA stays MHA
    if a.rotary_base is not None:
        base["rotary_base"] = a.rotary_base
    if a.norm_epsilon is not None:
        base["norm_epsilon"] = a.norm_epsilon
    missing = [n for n in ("num_layers", "hidden_size", "ffn_hidden_size",
                           "num_attention_heads") if n not in base]
    if missing:
        raise ConfigError("model shape incomplete: give --model PRESET, --load a checkpoint, or "
                          + ", ".join("--" + m.replace("_", "-") for m in missing))
    base.setdefault("max_position_embeddings", max(a.seq_length, 4096))
    try:
        return LlamaShape.from_dict(base)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _blend(tokens: Sequence[str]) -> tuple:
    """``[w1] p1 [w2] p2`` -> ((w1, p1), ...); weights are optional but all-or-none."""
    tokens = list(tokens)
    if not tokens:
        return ()

    def is_number(s):
        try:
            float(s)
            return True
        except ValueError:
            return False

    if is_number(tokens[0]):
        if len(tokens) % 2 or not all(is_number(w) for w in tokens[0::2]):
            raise ConfigError("--data-path must be 'w1 p1 w2 p2 ...' or 'p1 p2 ...'")
        return tuple((float(w), pth) for w, pth in zip(tokens[0::2], tokens[1::2]))
    return tuple((None, pth) for pth in tokens)


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None
               ) -> TrainConfig:
    """Parse flags into a validated :class:`TrainConfig`; raises :class:`ConfigError`."""
    parser = build_parser()
    a = parser.parse_args(argv)
    notes, compat_problems = apply_compat(a)
    problems = compat_problems + _architecture_problems(a)
    if problems:
        raise ConfigError("; ".join(problems))
    if world_size is None:
        from megatron_sat.training.launch_env import discover_world

        world_size = discover_world().world_size
    tok_vocab, eos = _tokenizer_facts(tokenizer_kind(a.tokenizer_type), a.tokenizer_model)
    shape = _shape_from_args(a, tok_vocab, _checkpoint_shape(a), notes)
    parallel = ParallelConfig(a.tensor_model_parallel_size, world_size)
    perf = _performance_from_args(a, a.tensor_model_parallel_size, shape.num_layers)
    import torch

    perf.resolved_backend("cuda" if torch.cuda.is_available() else "cpu", a.bf16)
    dp = parallel.data_parallel_size
    batch = BatchConfig(a.micro_batch_size, a.global_batch_size or a.micro_batch_size * dp,
                        a.seq_length, dp)
    sat = sat_config_from_args(a, a.train_iters, a.seed)
    metrics = a.metrics_file
    if metrics is None and (a.tensorboard_dir or a.save):
        metrics = os.path.join(a.tensorboard_dir or a.save, "metrics.jsonl")
    try:
        nan_iters = tuple(int(x) for x in a.inject_nan_iters.split(",") if x.strip())
    except ValueError:
        raise ConfigError("--inject-nan-iters must be comma-separated integers") from None
    return TrainConfig(
        shape=shape, parallel=parallel, batch=batch,
        optimizer=_optimizer_config(a),
        data=DataConfig(_blend(a.data_path), a.split, a.data_cache_path, a.tokenizer_type,
                        a.tokenizer_model, 2 if eos is None or eos < 0 else eos,
                        eod_mask_loss=a.eod_mask_loss, mock=a.mock_data),
        checkpoint=CheckpointConfig(a.save, a.load, a.save_interval, a.finetune,
                                    a.no_load_optim, a.no_load_rng, a.ckpt_step,
                                    a.overwrite_save, a.keep_last_n_checkpoints),
        logging=LoggingConfig(a.log_interval, a.eval_interval, a.eval_iters,
                              a.tensorboard_dir, metrics, a.peak_tflops,
                              wandb_project=a.wandb_project, wandb_exp_name=a.wandb_exp_name,
                              wandb_save_dir=a.wandb_save_dir, wandb_entity=a.wandb_entity),
        engine=EngineConfig(a.zero_stage, a.deepspeed_config, a.bf16),
        sat=sat, train_iters=a.train_iters, seed=a.seed, init_method_std=a.init_method_std,
        max_skipped_iters=a.max_skipped_iters, inject_nan_iters=nan_iters,
        exit_interval=a.exit_interval, notes=tuple(notes), perf=perf,
    )


def _optimizer_config(a) -> OptimizerConfig:
    """Megatron's warm-up resolution: ``--lr-warmup-fraction`` of the decay span."""
    decay_iters = a.lr_decay_iters or a.train_iters
    warmup = a.lr_warmup_iters
    if a.lr_warmup_fraction is not None:
        if a.lr_warmup_iters:
            raise ConfigError("--lr-warmup-fraction and --lr-warmup-iters both given; keep one")
        if not 0.0 <= a.lr_warmup_fraction < 1.0:
            raise ConfigError(f"--lr-warmup-fraction {a.lr_warmup_fraction} must be in [0, 1)")
        warmup = int(a.lr_warmup_fraction * decay_iters)
    wd = (a.weight_decay, a.weight_decay)
    if a.start_weight_decay is not None or a.end_weight_decay is not None:
        if a.start_weight_decay is None or a.end_weight_decay is None:
            raise ConfigError("--start-weight-decay and --end-weight-decay go together")
        wd = (a.start_weight_decay, a.end_weight_decay)
    return OptimizerConfig(a.lr, a.min_lr, a.lr_decay_style, warmup, a.lr_decay_iters,
                           a.weight_decay, a.adam_beta1, a.adam_beta2, a.adam_eps, a.clip_grad,
                           lr_warmup_init=a.lr_warmup_init, wsd_decay_iters=a.lr_wsd_decay_iters,
                           wsd_decay_style=a.lr_wsd_decay_style, start_weight_decay=wd[0],
                           end_weight_decay=wd[1], weight_decay_incr_style=(
                               "constant" if wd[0] == wd[1] else a.weight_decay_incr_style))
