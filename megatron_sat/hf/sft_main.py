"""Entry point behind ``sft_llama.py``: supervised fine-tuning with SAT on ``transformers.Trainer``.

Flags: every ``TrainingArguments`` flag (``--output_dir``, ``--max_steps``,
``--per_device_train_batch_size``, ``--gradient_accumulation_steps``, ``--deepspeed
ds.json``, ``--bf16``, ``--gradient_checkpointing``, ``--resume_from_checkpoint``,
``--report_to``, ...; dashes or underscores), the model/data flags below, and the same
``--sat*`` flags as ``pretrain_llama.py``.  ``--sat`` applies SAT with LORS ending at the
run's last optimizer step.

Why a wrapper: mistakes (a bad flag, a missing file, a model SAT cannot run on) end as
one line naming the problem and the fix, on every launcher (deepspeed, torchrun, python).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megatron_sat.training.configs import ConfigError

DTYPES = ("float32", "bfloat16", "auto")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "HF model folder (config.json + weights)"})
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "default: the model folder"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa | eager"})
    model_dtype: str = field(default="float32", metadata={
        "help": "weights dtype at load: float32 (mixed precision via --bf16) | bfloat16 | auto"})


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "jsonl: Alpaca or chat 'messages' records"})
    eval_file: Optional[str] = field(default=None, metadata={"help": "held-out jsonl"})
    max_seq_length: int = field(default=2048)
    prompt_template: str = field(default="plain", metadata={"help": "plain | alpaca"})
    packing: bool = field(default=False, metadata={
        "help": "pack examples into max_seq_length rows (per-example positions and masks)"})


def build_parser():
    from transformers import HfArgumentParser, TrainingArguments

    from megatron_sat.training.feature_arguments import add_sat_arguments

    class _Parser(HfArgumentParser):
        def error(self, message):
            raise ConfigError(message)

    p = _Parser((ModelArguments, DataArguments, TrainingArguments), prog="sft_llama.py",
                allow_abbrev=False)
    add_sat_arguments(p)
    p.add_argument("--exit-interval", type=int, default=0,
                   help="stop with a checkpoint when the step is a multiple of this "
                        "(as pretrain_llama.py); continue with --resume_from_checkpoint")
    p.add_argument("--sat-selections-file", help="append each step's kept heads/channels "
                   "as JSON lines ({rank} is replaced by the process rank)")
    return p


def parse(argv: Optional[Sequence[str]] = None):
    """``(model_args, data_args, training_args, extra)``; ``extra`` holds the ``--sat*``,
    ``--exit-interval`` and ``--sat-selections-file`` values.  Raises ConfigError."""
    from megatron_sat.hf.sft_data import SFTDataConfig
    from megatron_sat.training.feature_arguments import sat_config_from_args

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv) \
            and _cpu_deepspeed_state() and not any(a.startswith("--accelerator") for a in argv):
        argv += ["--accelerator_config", '{"use_configured_state": true}']
    try:
        model_args, data_args, training_args, sat_ns = build_parser().parse_args_into_dataclasses(
            args=argv)
        SFTDataConfig(data_args.max_seq_length, data_args.prompt_template, data_args.packing)
    except ValueError as e:  # TrainingArguments / SFTDataConfig validation
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    if training_args.include_num_input_tokens_seen == "all":
        # SFT batches are padded: count real tokens (HfArgumentParser cannot pass
        # "non_padding" to this str|bool field, so "yes" means it here)
        training_args.include_num_input_tokens_seen = "non_padding"
    if model_args.model_dtype not in DTYPES:
        raise ConfigError(f"--model_dtype {model_args.model_dtype} is not one of {', '.join(DTYPES)}")
    for path, flag in ((data_args.train_file, "--train_file"), (data_args.eval_file, "--eval_file")):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{flag} {path} does not exist; give a .jsonl file")
    if not os.path.isfile(os.path.join(model_args.model_name_or_path, "config.json")):
        raise ConfigError(f"--model_name_or_path {model_args.model_name_or_path} is not an HF model "
                          f"folder (no config.json); convert a megatron checkpoint with "
                          f"tools/convert_checkpoint.py megatron-to-hf")
    sat_config_from_args(sat_ns, max(1, sat_ns.sat_decay_start), training_args.seed)  # errors now
    return model_args, data_args, training_args, sat_ns


def _cpu_deepspeed_state() -> bool:
    """Start accelerate's process state for DeepSpeed on a machine without GPUs.

    Why: ``TrainingArguments`` starts DeepSpeed through accelerate without a backend;
    on a GPU-less machine accelerate then joins DeepSpeed's process group but records a
    single process, so every rank reads the same batches and acts as rank 0.  Starting
    the (shared) state first with the ``gloo`` backend, and telling ``TrainingArguments``
    to use it (``use_configured_state``), gives it the real world size.  Returns whether
    it did so.
    """
    import torch

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return True


def optimizer_steps(n_rows: int, args, world_size: int) -> int:
    """The Trainer's ``max_steps`` for an epoch-based run (what ``Trainer`` computes)."""
    if args.max_steps > 0:
        return args.max_steps
    per_rank = math.ceil(n_rows / world_size)
    batches = (per_rank // args.per_device_train_batch_size if args.dataloader_drop_last
               else math.ceil(per_rank / args.per_device_train_batch_size))
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def _exit_interval_callback():
    from transformers import TrainerCallback

    class ExitInterval(TrainerCallback):
        """Stop with a checkpoint every ``n`` steps (Megatron's ``--exit-interval``), so
        a job with a wall-time limit continues exactly with ``--resume_from_checkpoint``."""

        def __init__(self, n: int):
            self.n = n

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % self.n == 0 and state.global_step < state.max_steps:
                control.should_save = True
                control.should_training_stop = True

    return ExitInterval


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:  # Llama has none: pad with unk (or eos); labels mask it
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def run(model_args, data_args, training_args, sat_ns) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer

    from megatron_sat.hf.sft_data import SFTCollator, SFTDataConfig, load_sft_jsonl, pack_examples
    from megatron_sat.training.feature_arguments import sat_config_from_args

    rank0 = training_args.process_index == 0
    log = print if rank0 else None
    tok = load_tokenizer(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
    data_cfg = SFTDataConfig(data_args.max_seq_length, data_args.prompt_template,
                             data_args.packing)
    train, _ = load_sft_jsonl(data_args.train_file, tok, data_cfg, log=log)
    evals = load_sft_jsonl(data_args.eval_file, tok, data_cfg, log=log)[0] \
        if data_args.eval_file else None
    if not train:
        raise ConfigError(f"{data_args.train_file} holds no usable record (see the counts above)")
    if data_cfg.packing:
        train = pack_examples(train, data_cfg.max_seq_length)
        evals = pack_examples(evals, data_cfg.max_seq_length) if evals else evals
    training_args.max_steps = optimizer_steps(len(train), training_args,
                                              training_args.world_size)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=dtype[model_args.model_dtype],
        attn_implementation=model_args.attn_implementation)
    model.config.use_cache = False  # training: no KV cache (and packed masks need none)
    sat = sat_config_from_args(sat_ns, training_args.max_steps, training_args.seed)
    if sat is not None:
        from megatron_sat.hf import apply_sat

        apply_sat(model, sat)
    trainer = Trainer(model=model, args=training_args, train_dataset=train,
                      eval_dataset=evals or None,
                      data_collator=SFTCollator(tok.pad_token_id), processing_class=tok)
    if sat is not None:
        from megatron_sat.hf import SATCallback, add_sat_callback

        add_sat_callback(trainer, SATCallback(selections_file=sat_ns.sat_selections_file))
    if sat_ns.exit_interval > 0:
        trainer.add_callback(_exit_interval_callback()(sat_ns.exit_interval))
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(result.metrics)
    metrics["global_step"] = trainer.state.global_step
    if evals:
        metrics.update(trainer.evaluate())
    if trainer.state.global_step >= training_args.max_steps:
        trainer.save_model()  # a plain HF checkpoint: SAT changes no parameter name
        if rank0:
            tok.save_pretrained(training_args.output_dir)
    if rank0:
        trainer.log_metrics("all", metrics)
        trainer.save_metrics("all", metrics, combined=False)
    return metrics


def _error(msg: str, code: int) -> int:
    if os.environ.get("RANK", "0") == "0":
        print(f"sft_llama.py: error: {msg}", file=sys.stderr, flush=True)
    return code


def _quiet() -> None:
    """Third-party deprecation noise that would bury the training log (one per parameter)."""
    import warnings

    for pattern in (".*torch.distributed.*is deprecated.*", ".*pin_memory.*",
                    ".*Transformer Engine.*", ".*Apex.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _shutdown() -> None:
    """Leave the process group in order: a rank exiting while its peer still tears down
    gloo can abort the peer (SIGABRT) after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_sat.hf.apply import SATError

    import torch.distributed as dist

    _quiet()
    ours = not dist.is_initialized()  # a caller's process group is the caller's to end
    try:
        args = parse(argv)
        run(*args)
    except (ConfigError, SATError, FileNotFoundError) as e:
        return _error(str(e), 2)
    if ours:
        _shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
