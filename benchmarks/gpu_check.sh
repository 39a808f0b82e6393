#!/usr/bin/env bash
# FDSL GPU check, ready for when a CUDA device is lent (≤ 5 minutes on one GPU):
#   CUDA fp32 vs CPU fp32 per-image scores through the real Evaluator (must agree to 1e-4), tiny and ViT-L sets;
#   bf16 / fp16 drift against fp32; per-image time of the global branch and LFE at a few batch sizes and
#   --win_batch values; peak torch.cuda.max_memory_allocated; one epoch of the real Trainer.
# Writes gpu_check.json and gpu_check.md into --out (after every stage, so a cut-short run keeps what it did);
# exits 1 when an agreement check fails.
#
#   bash benchmarks/gpu_check.sh --out gpu_check_out                  # --device auto: cuda:0 when present
#   bash benchmarks/gpu_check.sh --device cpu --quick --out /tmp/gc   # CPU smoke run, tiny set only (~1 min)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's fdsl, even when another one is installed
exec "$PY" -m benchmarks.gpu_check "$@"
