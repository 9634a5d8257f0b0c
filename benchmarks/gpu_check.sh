#!/usr/bin/env bash
# Every GPU measurement of issues 5 and 9 in one go: at most ~8.5 minutes on one H200
# (each part has its own timeout; the budgets add up to 500 s plus the wheel install).
#
#   bash benchmarks/gpu_check.sh        (device runner: carry=[".whl"])
#
# 1. bf16 smoke (benchmarks/gpu_smoke.py): a tiny SAT model trains 50 steps and its loss
#    falls; rate 0 equals dense bit for bit; full recomputation keeps the gradients.
# 2. End-to-end trainer (pretrain_llama.py, DeepSpeed, bf16): Llama-2-7B width, 4 layers,
#    the real 32000-token LM head, sequence 4096, micro-batch 1; dense vs SAT at ρ = 0.5
#    with the same attention backend: tokens/s, CUDA peak memory, the time split
#    (--timing-log-level 1) and the end-to-end realised fraction.
# 3. Layer tables (benchmarks/throughput.py, bf16, micro-batch 2 × 4096, 4 layers) for
#    TinyLlama-1.1B, Llama-2-7B and Llama-2-13B shapes: dense with the fused backend, SAT
#    at rate 0 / 0.25 / 0.5 / 0.75, the physically narrower ideal.
#
# The attention backend is "auto": flash-attn when installed there (it is not part of the
# H200 image and needs a CUDA build, so it usually is not), else PyTorch SDPA, whose
# flash kernel then runs.  The tables name the backend used.
#
# The GPU image has torch but neither megatron-core nor DeepSpeed, and no network.  Build
# their wheels into the git-ignored .whl/ on a machine with network, from the repository
# root (README "GPU check" lists the same commands):
#
#   P="--only-binary=:all: --python-version 3.12 --implementation cp --platform
#      manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   pip download --no-deps $P -d .whl megatron-core==0.16.1 pydantic==2.14.4 \
#       pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
#   DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
#
# (DeepSpeed ships only a source archive; DS_BUILD_OPS=0 makes a pure-Python wheel whose
# ops are never needed here: the trainer's optimizer is torch's fused AdamW.)
# Results: $OUT (the device runner's output folder) or benchmarks/out/gpu: JSON, .md, and
# summary.md with everything.
#
# GPU_CHECK_DRY=1 runs the same steps on CPU with tiny shapes (about 2 minutes): a check
# of the script itself, before spending device time.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-benchmarks/out/gpu}
mkdir -p "$DEST"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if ! $PY -c "import megatron.core, deepspeed" 2>/dev/null; then
  shopt -s nullglob
  wheels=(.whl/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "megatron-core/deepspeed are not installed and .whl/ is empty (see the header)" >&2
    exit 2
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/sat_deps "${wheels[@]}" || exit 2
  export PYTHONPATH=$PYTHONPATH:/tmp/sat_deps
fi
DEV=cuda DT=bf16 E2E="--e2e-model llama2-7b-4l --seq-length 4096 --micro-batch 1 --iters 20"
LAYERS="--micro-batch 2 --seq-length 4096 --layers 4 --iters 12" PRESETS="tinyllama-1.1b llama2-7b llama2-13b"
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  DEV=cpu E2E="--e2e-model tiny --seq-length 64 --micro-batch 1 --iters 2"
  LAYERS="--micro-batch 1 --seq-length 64 --layers 1 --iters 2" PRESETS="tiny"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  $PY -c "import torch, megatron.core, deepspeed; print('torch', torch.__version__,
'| megatron-core', megatron.core.__version__, '| deepspeed', deepspeed.__version__)"
  $PY -c "from megatron_sat.core_attention import flash_available as f; print('flash-attn', f())"
} 2>&1 | tee "$DEST/gpu.txt"

status=0
run() {  # run NAME TIMEOUT CMD...: one part, its log in $DEST/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)" >&2
  local t0=$SECONDS
  timeout "$limit" "$@" > >(tee "$DEST/$name.log") 2>&1 || { echo "FAILED: $name" >&2; status=1; }
  echo "=== $name took $((SECONDS - t0)) s" >&2
}

run smoke 60 $PY benchmarks/gpu_smoke.py --device $DEV --output-dir "$DEST"
# shellcheck disable=SC2086
run e2e 200 $PY benchmarks/throughput.py --end-to-end $E2E --device $DEV --dtype $DT \
    --attention auto --rates 0.5 --warmup 5 --e2e-rounds 1 --output-dir "$DEST"
for preset in $PRESETS; do
  # shellcheck disable=SC2086
  run "layers-$preset" 80 $PY benchmarks/throughput.py --preset "$preset" --device $DEV \
      --dtype $DT --attention auto $LAYERS --warmup 3 --output-dir "$DEST"
done
cat "$DEST"/gpu.txt "$DEST"/*.md > "$DEST/summary.md" 2>/dev/null
cat "$DEST/summary.md"
exit $status
