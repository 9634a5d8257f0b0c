#!/usr/bin/env bash
# One-command CPU demo (assumes the project's venv is active): fetch real Chinese text and a
# Llama-2-style tokenizer, tokenise, train a tiny Llama dense and with SAT, compare.
# Extra arguments go to demo.py (--iters N, --extend-vocab, --work-dir DIR, --cache-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/../.."
# DeepSpeed would JIT-compile ops into this cache on first use; the trainer avoids the
# CPU ones, and a persistent cache keeps any later build from repeating.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
exec python examples/llama2/demo.py "$@"
