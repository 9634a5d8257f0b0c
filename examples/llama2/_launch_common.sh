# Shared by the llama2 launch scripts (sourced, not run). Every value can be overridden
# from the environment; see examples/llama2/README.md for what each flag does.
HOSTFILE=${HOSTFILE:-examples/llama2/hostfile}
DS_CONFIG=${DS_CONFIG:-examples/llama2/ds_config_zero3_bf16.json}
DATA_PATH=${DATA_PATH:-"0.7 data/zh_news_text_document 0.3 data/en_text_document"}
DATA_CACHE=${DATA_CACHE:-/shared/megatron_sat/data_cache}  # on a filesystem all nodes see
TRAIN_ITERS=${TRAIN_ITERS:-10000}
SEQ_LENGTH=${SEQ_LENGTH:-4096}
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
LR=${LR:-3e-5}
MIN_LR=${MIN_LR:-3e-6}
TENSORBOARD=${TENSORBOARD:-$SAVE/tensorboard}

# Several nodes: a DeepSpeed hostfile (pdsh). Without one: this node only, one process per
# GPU (NUM_GPUS overrides the count; no ssh needed). Under srun (the .sbatch script) the
# processes come from Slurm instead.
LAUNCH=()
if [ "${LAUNCHER:-deepspeed}" = deepspeed ]; then
  if [ -f "$HOSTFILE" ]; then
    LAUNCH=(--hostfile "$HOSTFILE")
  else
    NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
    [ "$NUM_GPUS" -ge 1 ] 2>/dev/null || NUM_GPUS=1
    echo "no hostfile at $HOSTFILE: launching $NUM_GPUS processes on this node" >&2
    LAUNCH=(--num_gpus "$NUM_GPUS")
  fi
fi

# First run from converted HF weights: weights only. Later runs resume from $SAVE.
# LOAD= (empty) trains from scratch.
if [ -f "$SAVE/latest" ]; then
  START_FLAGS=(--load "$SAVE")
elif [ -n "$LOAD" ]; then
  if [ ! -e "$LOAD" ]; then
    echo "LOAD=$LOAD does not exist: convert the HF weights there first (examples/llama2/README.md step 1), or set LOAD= to train from scratch" >&2
    exit 2
  fi
  START_FLAGS=(--load "$LOAD" --finetune)
else
  START_FLAGS=()
fi

LLAMA_FLAGS=(--swiglu --normalization rmsnorm --use-rotary-position-embeddings
  --untie-embeddings-and-output-weights --disable-bias-linear --no-query-key-layer-scaling)

TRAIN_FLAGS=(
  --seq-length "$SEQ_LENGTH" --max-position-embeddings 4096
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
  --train-iters "$TRAIN_ITERS"
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters 100
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16
  --data-path $DATA_PATH --split 990,10,0 --data-cache-path "$DATA_CACHE"
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER"
  --save "$SAVE" --save-interval 500
  --log-interval 10 --eval-interval 500 --eval-iters 20 --tensorboard-dir "$TENSORBOARD"
  --deepspeed --deepspeed_config "$DS_CONFIG" --zero-stage 3
  --attention-backend "${ATTENTION_BACKEND:-auto}"
)
# Sequence parallelism splits norms and residuals over the TP ranks (SAT scores the
# gathered full sequence, so the kept units do not change).
if [ "${TP:-1}" -gt 1 ]; then TRAIN_FLAGS+=(--sequence-parallel); fi

# Where the LORS ladder starts (docs/QUALITY.md). 0, the default, spreads the rungs over the
# whole run. In the recorded small-scale sweep it cost +2.5% validation ppl at equal steps,
# for 1.05x speed-up. Half the run (SAT_DECAY_START=TRAIN_ITERS/2, the paper-style and
# faster setting) cost +7.3%, for 1.16x. Both were measured on CPU; re-measure on your run.
SAT_DECAY_START=${SAT_DECAY_START:-0}
SAT_FLAGS=(--sat --sat-metric maxip --sat-selection sampling --sat-temperature 0.5
  --sat-attn-omission-rate 0.5 --sat-mlp-omission-rate 0.5
  --sat-schedule ladder --sat-decay-start "$SAT_DECAY_START" --sat-ladder-rungs 4
  --sat-ladder-spacing lengthening)

