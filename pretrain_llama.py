"""Pre-train / continue pre-training a Llama model with SAT on DeepSpeed + megatron-core.

    deepspeed --num_gpus 8 pretrain_llama.py --model llama2-7b --sat ... (see examples/llama2)
    torchrun --nproc_per_node 2 pretrain_llama.py ...
    python pretrain_llama.py ...

All logic lives in :mod:`megatron_sat.training`.
"""

import sys

from megatron_sat.training.main import main

if __name__ == "__main__":
    sys.exit(main())
