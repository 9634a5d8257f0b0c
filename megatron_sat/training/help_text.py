"""``pretrain_llama.py --help``: description, worked examples and documented defaults.

Why its own file: the help is user documentation (two complete commands, and every
default that differs from Megatron-LM said out loud), kept out of the flag plumbing.
"""

import argparse

DESCRIPTION = """\
Continual pre-training of Llama-2-family models with Sparsity-Accelerated Training (SAT)
on DeepSpeed + megatron-core. Takes Megatron-LM / Megatron-DeepSpeed flags: an existing
pretrain_gpt.py launch script runs with pretrain_llama.py (or megatron-sat-train) in its
place, plus --sat. Launch with deepspeed (pdsh, --launcher openmpi|slurm|mpich), torchrun,
mpirun, srun or plain python (one process).

Defaults that differ from Megatron-LM (give the flag to get Megatron's value):
  --lr-decay-style cosine (Megatron: linear), --weight-decay 0.1 (Megatron: 0.01),
  --adam-beta2 0.95 (Megatron: 0.999), --seq-length 2048, --train-iters 100,
  --log-interval 10 (Megatron: 100). Warm-up follows Megatron: the first step of a
  warm-up runs at --lr-warmup-init (0 by default).
"""

EPILOG = """\
examples:
  # 1. continue pre-training Llama-2-7B from converted HF weights with SAT, 8 GPUs, one node
  python tools/convert_checkpoint.py hf-to-megatron --load-dir llama-2-7b-hf \\
      --save-dir ckpt/llama2-7b-tp1 --target-tp 1
  deepspeed --num_gpus 8 pretrain_llama.py --load ckpt/llama2-7b-tp1 --finetune \\
      --save ckpt/sat --data-path data/zh_news_text_document \\
      --tokenizer-type Llama2Tokenizer --tokenizer-model llama-2-7b-hf/tokenizer.model \\
      --seq-length 4096 --micro-batch-size 1 --global-batch-size 256 --train-iters 10000 \\
      --lr 3e-5 --min-lr 3e-6 --lr-warmup-iters 100 --bf16 --zero-stage 3 \\
      --sat --sat-schedule ladder --sat-decay-start 5000
  (the shape comes from the checkpoint; no shape flags needed)

  # 2. a tiny model from scratch on a CPU, 2 processes, TP=2, WSD schedule
  torchrun --nproc_per_node 2 pretrain_llama.py --model tiny --tensor-model-parallel-size 2 \\
      --data-path data/demo_text_document --tokenizer-model tokenizer.model \\
      --seq-length 128 --micro-batch-size 2 --global-batch-size 4 --train-iters 50 \\
      --lr 1e-3 --lr-decay-style WSD --lr-wsd-decay-iters 10 --lr-warmup-iters 5 \\
      --sat --save ckpt/tiny --tensorboard-dir tb/tiny
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag's help; description and examples kept as written."""
