#!/usr/bin/env bash
# Continual pre-training of Llama-2-70B with SAT, on this node or several (with a HOSTFILE):
# DeepSpeed ZeRO-3 + bf16, tensor parallel size 8, GQA (8 K/V groups).
#
#   LOAD=checkpoints/llama2-70b-tp8 SAVE=checkpoints/llama2-70b-sat \
#   TOKENIZER=checkpoints/llama2-70b-hf/tokenizer.model HOSTFILE=examples/llama2/hostfile \
#   bash examples/llama2/pretrain_llama2_70b_sat.sh
#
# LOAD is a checkpoint converted from HF with tools/convert_checkpoint.py at --target-tp 8
# (LOAD= empty: from scratch). No hostfile: one process per local GPU (NUM_GPUS=N to choose).
set -euo pipefail
cd "$(dirname "$0")/../.."
TP=${TP:-8}
LOAD=${LOAD-checkpoints/llama2-70b-tp8}
SAVE=${SAVE:-checkpoints/llama2-70b-sat}
TOKENIZER=${TOKENIZER:-checkpoints/llama2-70b-hf/tokenizer.model}
source examples/llama2/_launch_common.sh

deepspeed "${LAUNCH[@]}" pretrain_llama.py \
  --model llama2-70b "${LLAMA_FLAGS[@]}" --num-query-groups 8 \
  --tensor-model-parallel-size "$TP" \
  "${TRAIN_FLAGS[@]}" "${SAT_FLAGS[@]}" "${START_FLAGS[@]}" "$@"
