#!/usr/bin/env bash
# Continual pre-training of Llama-2-7B with SAT, on this node or several (with a HOSTFILE):
# DeepSpeed ZeRO-3 + bf16, tensor parallel size 1.
#
#   LOAD=checkpoints/llama2-7b-tp1 SAVE=checkpoints/llama2-7b-sat \
#   TOKENIZER=checkpoints/llama2-7b-hf/tokenizer.model HOSTFILE=examples/llama2/hostfile \
#   bash examples/llama2/pretrain_llama2_7b_sat.sh
#
# LOAD is a checkpoint converted from HF with tools/convert_checkpoint.py at --target-tp 1
# (LOAD= empty: from scratch). No hostfile: one process per local GPU (NUM_GPUS=N to choose).
set -euo pipefail
cd "$(dirname "$0")/../.."
TP=${TP:-1}
LOAD=${LOAD-checkpoints/llama2-7b-tp1}
SAVE=${SAVE:-checkpoints/llama2-7b-sat}
TOKENIZER=${TOKENIZER:-checkpoints/llama2-7b-hf/tokenizer.model}
source examples/llama2/_launch_common.sh

deepspeed "${LAUNCH[@]}" pretrain_llama.py \
  --model llama2-7b "${LLAMA_FLAGS[@]}"  \
  --tensor-model-parallel-size "$TP" \
  "${TRAIN_FLAGS[@]}" "${SAT_FLAGS[@]}" "${START_FLAGS[@]}" "$@"
