"""The trainer's settings: one small validated dataclass per concern.

Why: library code never reads a global ``args``; each component takes the one config
object it needs, and every problem in a config is reported at construction, in one line
that names the flag and the fix (litgpt style), instead of as a traceback mid-run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_sat.config import SATConfig
from megatron_sat.model import LlamaShape


class ConfigError(ValueError):
    """A user-facing configuration problem; the entry point prints it as one line."""


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class ParallelConfig:
    """Process layout. ``world_size`` comes from the launcher; DP is what TP leaves."""

    tensor_model_parallel_size: int = 1
    world_size: int = 1

    def __post_init__(self):
        p = []
        if self.tensor_model_parallel_size < 1:
            p.append("--tensor-model-parallel-size must be >= 1")
        elif self.world_size % self.tensor_model_parallel_size:
            p.append(f"the launcher started {self.world_size} processes, which is not a multiple "
                     f"of --tensor-model-parallel-size {self.tensor_model_parallel_size}; "
                     f"launch a multiple of TP processes")
        _raise(p)

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.tensor_model_parallel_size


@dataclass(frozen=True)
class BatchConfig:
    """Batch geometry; gradient accumulation = global / (micro × DP)."""

    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    data_parallel_size: int = 1

    def __post_init__(self):
        p = []
        if self.micro_batch_size < 1 or self.global_batch_size < 1 or self.seq_length < 1:
            p.append("--micro-batch-size, --global-batch-size and --seq-length must be >= 1")
        elif self.global_batch_size % (self.micro_batch_size * self.data_parallel_size):
            p.append(f"--global-batch-size {self.global_batch_size} is not divisible by "
                     f"--micro-batch-size {self.micro_batch_size} x data-parallel size "
                     f"{self.data_parallel_size}; choose a global batch that is a multiple of "
                     f"{self.micro_batch_size * self.data_parallel_size}")
        _raise(p)

    @property
    def grad_accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW, driven by megatron-core's ``OptimizerParamScheduler`` (see lr_schedule.py)."""

    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_decay_iters: int = 0  # 0: decay over the whole run
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_init: float = 0.0
    wsd_decay_iters: Optional[int] = None
    wsd_decay_style: str = "exponential"
    start_weight_decay: Optional[float] = None  # None: --weight-decay throughout
    end_weight_decay: Optional[float] = None
    weight_decay_incr_style: str = "constant"

    def __post_init__(self):
        p = []
        styles = ("cosine", "linear", "constant", "WSD", "inverse-square-root")
        if self.lr_decay_style not in styles:
            p.append(f"--lr-decay-style {self.lr_decay_style!r} is not one of "
                     f"{', '.join(styles)}")
        if self.lr_decay_style == "WSD" and not self.wsd_decay_iters:
            p.append("--lr-decay-style WSD needs --lr-wsd-decay-iters N (the annealing phase)")
        if not 0.0 <= self.lr_warmup_init <= self.lr:
            p.append(f"--lr-warmup-init {self.lr_warmup_init} must be in [0, --lr {self.lr}]")
        wd = (self.start_weight_decay, self.end_weight_decay)
        if None not in wd and wd[0] != wd[1] and self.weight_decay_incr_style == "constant":
            p.append("--start-weight-decay differs from --end-weight-decay; give "
                     "--weight-decay-incr-style linear or cosine")
        if None not in wd and wd[1] < wd[0]:
            p.append("--end-weight-decay must be >= --start-weight-decay")
        if not 0.0 <= self.min_lr <= self.lr:
            p.append(f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        if self.lr_warmup_iters < 0 or self.lr_decay_iters < 0:
            p.append("--lr-warmup-iters and --lr-decay-iters must be >= 0")
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0):
            p.append("--adam-beta1 and --adam-beta2 must be in [0, 1)")
        if self.clip_grad < 0 or self.weight_decay < 0:
            p.append("--clip-grad and --weight-decay must be >= 0")
        _raise(p)


@dataclass(frozen=True)
class DataConfig:
    """Megatron ``.bin/.idx`` blend: ``[(weight, prefix), ...]``, a split and a cache dir."""

    blend: tuple  # ((weight or None, prefix), ...)
    split: str = "949,50,1"
    data_cache_path: Optional[str] = None
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: Optional[str] = None
    eod_id: int = 2
    eod_mask_loss: bool = False  # no loss on EOD tokens (Megatron's --eod-mask-loss)
    mock: bool = False  # megatron-core's MockGPTDataset (--mock-data)

    def __post_init__(self):
        p = []
        if self.mock and self.blend:
            p.append("--mock-data and --data-path both given; keep one")
        if not self.blend and not self.mock:
            p.append("--data-path is required: give one or more Megatron .bin/.idx prefixes "
                     "(make them with tools/preprocess_data.py)")
        parts = [x for x in self.split.replace("/", ",").split(",") if x.strip()]
        try:
            vals = [float(x) for x in parts]
            if not vals or len(vals) > 3 or min(vals) < 0 or sum(vals) <= 0:
                raise ValueError
        except ValueError:
            p.append(f"--split {self.split!r} must be up to 3 non-negative weights like 949,50,1")
        _raise(p)


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often to save, what to load, and how much of it."""

    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: int = 0
    finetune: bool = False  # load weights only; start at iteration 0
    no_load_optim: bool = False  # weights + iteration + data position, fresh optimizer
    no_load_rng: bool = False
    ckpt_step: Optional[int] = None  # load this iteration instead of 'latest'
    overwrite_save: bool = False  # a new run may replace the run held in --save
    keep_last_n_checkpoints: int = 0  # 0: keep all

    def __post_init__(self):
        p = []
        if self.save_interval < 0:
            p.append("--save-interval must be >= 0")
        if self.keep_last_n_checkpoints < 0:
            p.append("--keep-last-n-checkpoints must be >= 1 (or 0 to keep all)")
        if self.ckpt_step is not None and (self.ckpt_step < 0 or not self.load):
            p.append("--ckpt-step needs --load DIR and an iteration >= 0")
        if self.save_interval and not self.save:
            p.append("--save-interval needs --save DIR")
        if (self.finetune or self.no_load_optim) and not self.load:
            p.append("--finetune/--no-load-optim need --load DIR (e.g. converted HF weights)")
        _raise(p)

    @property
    def weights_only(self) -> bool:
        """No DeepSpeed state is read: --finetune (fresh start) or --no-load-optim."""
        return self.finetune or self.no_load_optim


@dataclass(frozen=True)
class LoggingConfig:
    """Log cadence, evaluation cadence and sinks."""

    log_interval: int = 10
    eval_interval: int = 0  # 0: only at the end (when eval_iters > 0)
    eval_iters: int = 10
    tensorboard_dir: Optional[str] = None
    metrics_file: Optional[str] = None
    peak_tflops: Optional[float] = None
    wandb_project: Optional[str] = None  # W&B logging when set (needs the wandb package)
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    wandb_entity: Optional[str] = None

    def __post_init__(self):
        p = []
        if self.log_interval < 1:
            p.append("--log-interval must be >= 1")
        if self.eval_interval < 0 or self.eval_iters < 0:
            p.append("--eval-interval and --eval-iters must be >= 0")
        _raise(p)


@dataclass(frozen=True)
class EngineConfig:
    """DeepSpeed: ZeRO stage, precision and an optional user ``ds_config.json``."""

    zero_stage: Optional[int] = None  # None: from the JSON, else 0
    deepspeed_config: Optional[str] = None
    bf16: bool = False

    def __post_init__(self):
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero-stage {self.zero_stage} must be 0, 1, 2 or 3")


@dataclass(frozen=True)
class PerformanceConfig:
    """How the step runs on the hardware: attention kernel, recomputation, sequence
    parallelism and the time split (Megatron-LM's flag names).

    ``attention_backend`` is what the user asked for (``auto`` included);
    :meth:`resolved_backend` is what the run uses.  None of these change the maths
    beyond float summation order, so checkpoints move freely between settings.
    """

    attention_backend: str = "auto"
    recompute_granularity: Optional[str] = None  # full | selective
    recompute_method: Optional[str] = None  # uniform | block (full only)
    recompute_num_layers: Optional[int] = None
    sequence_parallel: bool = False
    timing_log_level: int = 0
    tensor_model_parallel_size: int = 1
    num_layers: Optional[int] = None

    def __post_init__(self):
        from megatron_sat.attention_backend import ATTENTION_BACKENDS

        p = []
        if self.attention_backend not in ATTENTION_BACKENDS:
            p.append(f"--attention-backend {self.attention_backend!r} is not one of "
                     f"{', '.join(ATTENTION_BACKENDS)}")
        g, m, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if g not in (None, "full", "selective"):
            p.append(f"--recompute-granularity {g!r} must be full or selective")
        if m not in (None, "uniform", "block"):
            p.append(f"--recompute-method {m!r} must be uniform or block")
        if g is None and (m is not None or n is not None):
            given = "--recompute-method" if m is not None else "--recompute-num-layers"
            p.append(f"{given} given without --recompute-granularity; add "
                     f"--recompute-granularity full")
        if g == "full" and m is None:
            p.append("--recompute-granularity full needs --recompute-method uniform or block "
                     "(and --recompute-num-layers)")
        if g == "selective" and (m is not None or n is not None):
            p.append("--recompute-granularity selective recomputes core attention only; drop "
                     "--recompute-method/--recompute-num-layers")
        if g == "full" and m is not None:
            top = self.num_layers or n or 1
            if n is None or not 1 <= n <= top:
                p.append(f"--recompute-num-layers must be between 1 and --num-layers {top} "
                         f"with --recompute-granularity full")
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            p.append("--sequence-parallel needs --tensor-model-parallel-size >= 2 (it splits "
                     "the sequence over the TP ranks); drop it or raise the TP size")
        if self.timing_log_level not in (0, 1, 2):
            p.append(f"--timing-log-level {self.timing_log_level} must be 0, 1 or 2")
        _raise(p)

    def resolved_backend(self, device_type: str, bf16: bool) -> str:
        """The attention backend this run uses (``auto`` resolved); one-line error if
        ``flash`` cannot run here."""
        import torch

        from megatron_sat.attention_backend import resolve_attention_backend

        try:
            return resolve_attention_backend(self.attention_backend, device_type,
                                             torch.bfloat16 if bf16 else torch.float32)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def model_settings(self) -> dict:
        """Keyword arguments of :func:`megatron_sat.model.build_gpt_model`."""
        return {"sequence_parallel": self.sequence_parallel,
                "recompute_granularity": self.recompute_granularity,
                "recompute_method": self.recompute_method,
                "recompute_num_layers": self.recompute_num_layers}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs."""

    shape: LlamaShape
    parallel: ParallelConfig
    batch: BatchConfig
    optimizer: OptimizerConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    engine: EngineConfig
    sat: Optional[SATConfig] = None
    train_iters: int = 100
    seed: int = 1234
    init_method_std: float = 0.02
    max_skipped_iters: int = 10
    exit_interval: int = 0  # stop (with a checkpoint) once the iteration is a multiple
    inject_nan_iters: tuple = field(default_factory=tuple)  # fault injection for tests
    notes: tuple = ()  # what compatibility flags mean here, printed at start-up
    perf: PerformanceConfig = field(default_factory=PerformanceConfig)

    def __post_init__(self):
        p = []
        if self.train_iters < 1:
            p.append("--train-iters must be >= 1")
        if self.batch.seq_length > self.shape.max_position_embeddings:
            p.append(f"--seq-length {self.batch.seq_length} exceeds --max-position-embeddings "
                     f"{self.shape.max_position_embeddings}")
        if self.max_skipped_iters < 1:
            p.append("--max-skipped-iters must be >= 1")
        _raise(p)
        try:
            self.shape.check_tp(self.parallel.tensor_model_parallel_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
