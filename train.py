"""Train FDSL's scorers and NAM on one dataset's test split (cross-dataset protocol).

Example (a model for testing VisA, trained on MVTec AD):
    python train.py --dataset mvtec --train_data_path data/mvtec --save_path checkpoints/trained_on_mvtec
"""
import sys

from fdsl.cli import main
from fdsl.config import TrainConfig

if __name__ == "__main__":
    sys.exit(main(TrainConfig, "fdsl.training:train"))
