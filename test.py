"""Evaluate a trained FDSL checkpoint k-shot, per class (image/pixel AUROC, AP, F1-max, AUPRO).

Example (1-shot VisA with a model trained on MVTec AD):
    python test.py --dataset visa --data_path data/visa --checkpoint_path checkpoints/trained_on_mvtec/epoch_5.pth \
        --save_path results/visa_1shot --k_shot 1 --seed 14
"""
import sys

from fdsl.cli.jobs import test_main

if __name__ == "__main__":
    sys.exit(test_main())
