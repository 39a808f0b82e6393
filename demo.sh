#!/usr/bin/env bash
# FDSL end-to-end demo: synthetic data -> train -> 1-shot test -> per-class table and heat maps,
# then `fit` / `calibrate` / `predict` (calibrated on other images than it predicts); it prints where the outputs
# and the index.html gallery are.
#
#   bash demo.sh --real_features 1                    # REAL features offline: EfficientNet-Lite0 ImageNet weights, training-free
#   FDSL_PRETRAINED=none bash demo.sh                  # random-weight smoke run of the whole pipeline, tiny model
#   bash demo.sh                                       # ViT-L-14-336, OpenAI weights (downloaded once)
#   FDSL_PRETRAINED=/path/to/weights.pt bash demo.sh   # a local open_clip / OpenAI CLIP weights file (offline)
#   bash demo.sh --device cpu --out demo_runs          # options go to `python -m fdsl.cli.demo` (see --help)
#
# The interpreter: PYTHON, else this folder's .venv/bin/python (README step 1 creates it; this script never creates
# a virtualenv or installs PyTorch). Before each run it asks `fdsl doctor --missing demo` what the demo extra still
# lacks and installs only that, saying what and how big; a second run installs nothing.
# The full-size model is CPU-heavy; with a CUDA GPU it takes minutes. Reruns reuse finished work.
set -euo pipefail
cd "$(dirname "$0")"
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  echo "demo.sh: no .venv/bin/python here and PYTHON is not set. Install first (README step 1, a few minutes):" >&2
  echo "  python3 -m venv .venv" >&2
  echo "  .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu" \
       "  # CPU-only, ~0.2 GB; skip on a GPU machine" >&2
  echo "  .venv/bin/pip install -e \".[engineer]\"" >&2
  echo "or point PYTHON at an interpreter that has fdsl: PYTHON=/path/to/python bash demo.sh" >&2
  exit 2
fi
if ! "$PY" -c "import fdsl" 2>/dev/null; then
  echo "demo.sh: $PY cannot import fdsl; install it: $PY -m pip install -e \".[engineer]\" (README step 1)" >&2
  exit 2
fi
missing=$("$PY" -m fdsl.cli.doctor --missing demo)
if [ -n "$missing" ]; then
  echo "demo.sh: installing what the demo needs and $PY lacks:"
  echo "$missing" | sed 's/^/  /'
  # shellcheck disable=SC2046
  "$PY" -m pip install --quiet $(echo "$missing" | cut -d' ' -f1)
fi
exec "$PY" -m fdsl.cli.demo "$@"
