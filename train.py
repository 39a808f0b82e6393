"""Train FDSL's scorers and NAM on one dataset's test split (cross-dataset protocol).

Example (a model for testing VisA, trained on MVTec AD):
    python train.py --dataset mvtec --train_data_path data/mvtec --save_path checkpoints/trained_on_mvtec
"""
import sys

from fdsl.cli.jobs import train_main

if __name__ == "__main__":
    sys.exit(train_main())
