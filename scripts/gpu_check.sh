#!/usr/bin/env bash
# One short GPU check (see scripts/gpu_check.py): what the machine has, TensorRT vs ONNX Runtime where TensorRT is
# importable, otherwise the PyTorch CUDA baseline and what was skipped. Results: $OUT/gpu_check.json (or ./build).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found"
command -v trtexec >/dev/null && trtexec --help 2>&1 | head -1 || echo "trtexec: not on PATH"
"${PYTHON:-python3}" scripts/gpu_check.py "${OUT:-build}"
