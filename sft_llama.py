"""Supervised fine-tuning of an HF Llama model with SAT on transformers' Trainer.

    deepspeed --num_gpus 8 sft_llama.py --model_name_or_path llama-2-7b-hf \
        --train_file sft.jsonl --output_dir out --deepspeed examples/sft/ds_zero3.json \
        --bf16 --max_steps 1000 --sat ...          (see examples/sft and docs/SFT.md)
    torchrun --nproc_per_node 2 sft_llama.py ...
    python sft_llama.py ...

All logic lives in :mod:`megatron_sat.hf.sft_main`.
"""

import sys

from megatron_sat.hf.sft_main import main

if __name__ == "__main__":
    sys.exit(main())
