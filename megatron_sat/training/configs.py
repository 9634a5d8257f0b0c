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

    def __post_init__(self):
        p = []
        if self.save_interval < 0:
            p.append("--save-interval must be >= 0")
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
