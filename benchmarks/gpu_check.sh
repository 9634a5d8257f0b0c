#!/usr/bin/env bash
# All GPU measurements of issue #5 in one go (about 5–8 minutes on one H200).
# Run it: bash benchmarks/gpu_check.sh   (device runner: carry=[".whl"])
#
# bf16, micro-batch 2 × 4096 tokens, 4 layers per preset: stock dense, SAT at rate 0
# (ratio to stock), SAT at 0.25/0.5/0.75 (optimised ops and the naive index_select
# ops), the physically narrower ideal, selection cost and CUDA peak memory.
#
# The GPU image has torch but no megatron-core.  Put the wheel in .whl/ first, on a
# machine with network (it is git-ignored; pass it to the device with carry=[".whl"]):
#
#   pip download megatron-core==0.16.1 --no-deps --python-version 3.12 \
#       --only-binary=:all: -d .whl
#
# Results: $OUT (the device runner's output folder) or benchmarks/out/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-benchmarks/out/gpu}
mkdir -p "$DEST"

if ! python -c "import megatron.core" 2>/dev/null; then
  shopt -s nullglob
  wheels=(.whl/megatron_core-*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "megatron-core is not installed and no wheel is in .whl/ (see the header)" >&2
    exit 2
  fi
  pip install -q --no-index --no-deps --target /tmp/sat_deps "${wheels[@]}" || exit 2
  export PYTHONPATH=/tmp/sat_deps${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$DEST/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$DEST/gpu.txt"

status=0
for preset in tinyllama-1.1b llama2-7b llama2-13b llama2-70b-tp8; do
  echo "=== $preset" >&2
  timeout 150 python benchmarks/throughput.py --preset "$preset" --device cuda --dtype bf16 \
      --micro-batch 2 --seq-length 4096 --layers 4 --iters 20 --warmup 3 --naive \
      --output-dir "$DEST" || { echo "FAILED: $preset" >&2; status=1; }
done
echo "=== ops micro-benchmark (llama2-7b MLP shapes)" >&2
timeout 60 python benchmarks/ops_micro.py --preset llama2-7b --device cuda --dtype bf16 \
    | tee "$DEST/ops_micro-llama2-7b.txt" || status=1
cat "$DEST"/*.md
exit $status
