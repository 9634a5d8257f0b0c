#!/usr/bin/env bash
# Create .venv with a pinned CPU/CUDA torch first, then megatron-sat and its extras, all at
# the tested versions of constraints.txt.
# Idempotent: re-runs only when setup.py or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.megatron_sat_stamp"
WANT=$(cat setup.py constraints.txt | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
echo "[bootstrap] creating $VENV (torch pinned by constraints.txt) ..." >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
# On a machine without an NVIDIA GPU take torch's CPU build explicitly from its own index
# (the default index serves a multi-GB CUDA build). TORCH_INDEX_URL overrides the choice.
TORCH_INDEX=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  TORCH_INDEX=(--index-url "$TORCH_INDEX_URL")
elif ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  CPU_INDEX=https://download.pytorch.org/whl/cpu
  # Offline and mirrored sites cannot reach that index: probe it (5 s) and otherwise keep
  # the configured index, which must then serve the CPU build (pip config / find-links).
  if "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" \
      "$CPU_INDEX" >/dev/null 2>&1; then
    TORCH_INDEX=(--index-url "$CPU_INDEX")
  else
    echo "[bootstrap] the CPU torch index is unreachable; using the configured package index" >&2
  fi
fi
"$VENV/bin/python" -m pip install -q "${TORCH_INDEX[@]}" "$(grep '^torch==' constraints.txt)" 2>&1 \
  | grep -v "is ignored" >&2 || true
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | grep -v "is ignored" >&2 || true
"$VENV/bin/python" -c "import torch, megatron.core, deepspeed, sentencepiece" 2>/dev/null \
  || { echo "[bootstrap] error: the install failed; see pip output above" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "[bootstrap] done: $("$VENV/bin/python" -c 'import torch;print("torch", torch.__version__)')" >&2
