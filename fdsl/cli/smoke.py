"""``FDSL_SMOKE=1``: the offline smoke mode of ``trainAndTest.sh`` and ``test_few_shot.sh``.

    FDSL_SMOKE=1 bash trainAndTest.sh fdsl cpu 1 mul 13 2 0.5 14 1

The same nine arguments run the same steps (train on MVTec-layout data, train on VisA-layout data, test each
k-shot on the other) on a tiny random-weight CLIP (FDSL-Tiny-ViT, 112 px, blocks 1-4) and small synthetic
datasets written here (an MVTec-AD layout and a VisA layout, with masks): no download, no dataset, a couple of
minutes on a CPU. What the tiny model cannot take is scaled and said: the 8x8 patch grid holds LFE windows of
at most `MAX_WINDOW` patches; training draws 2 shots per class and runs 2 epochs; the tests use epoch 2.
The numbers only show that the scripts run end to end.

``python -m fdsl.cli.smoke --out DIR --win_size S --win_stride T`` writes the data (once) and prints the
shell assignments the scripts evaluate (``fdsl_args.sh``); a line on stderr says what smoke mode changes.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

MODEL = "FDSL-Tiny-ViT"
IMAGE_SIZE = 112
LAYERS = (1, 2, 3, 4)
MAX_WINDOW = 4  # patches: half of the tiny model's 8x8 grid at 112 px
EPOCHS = 2
TRAIN_SHOTS = 2
DATA = {"n_train": 4, "n_test_good": 3, "n_test_bad": 6, "image_size": 128}


def smoke_window(win_size: int, win_stride: int) -> tuple[int, int]:
    """The LFE window and stride the tiny model can take in place of the given ones (in patches)."""
    size = max(1, min(int(win_size), MAX_WINDOW))
    return size, max(1, min(int(win_stride), size))


def smoke_assignments(out: Path, win_size: int, win_stride: int) -> dict[str, str]:
    """The shell variables `fdsl_args.sh` takes from smoke mode (dataset roots, model, schedule, window)."""
    size, stride = smoke_window(win_size, win_stride)
    return {
        "MVTEC_ROOT": str(out / "data" / "mvtec"), "VISA_ROOT": str(out / "data" / "visa"),
        "SMOKE_MODEL_ARGS": " ".join(["--model", MODEL, "--pretrained", "none", "--image_size", str(IMAGE_SIZE),
                                      "--features_list", *map(str, LAYERS), "--few_shot_features",
                                      *map(str, LAYERS)]),
        "SMOKE_EPOCHS": str(EPOCHS), "SMOKE_TRAIN_SHOTS": str(TRAIN_SHOTS),
        "SMOKE_WIN_SIZE": str(size), "SMOKE_WIN_STRIDE": str(stride),
    }


def write_data(out: Path) -> tuple[Path, Path]:
    """The two small synthetic datasets (MVTec-AD and VisA layouts), written once under ``out/data``."""
    from fdsl.data.synthetic import make_synthetic_dataset, make_synthetic_visa

    mvtec, visa = out / "data" / "mvtec", out / "data" / "visa"
    if not (mvtec / "meta.json").is_file():
        make_synthetic_dataset(mvtec, classes=("carpet_syn", "wood_syn"), seed=0, **DATA)
    if not (visa / "meta.json").is_file():
        make_synthetic_visa(visa, classes=("candle_syn", "pcb_syn"), seed=1, **DATA)
    return mvtec, visa


def main(argv: Sequence[str] | None = None) -> int:
    """Write the smoke data and print the shell assignments; exit 2 with one line on bad input."""
    parser = argparse.ArgumentParser(prog="python -m fdsl.cli.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the smoke data (and, by the scripts, runs)")
    parser.add_argument("--win_size", type=int, required=True, help="the scripts' win-size argument")
    parser.add_argument("--win_stride", type=int, required=True, help="the scripts' win-stride argument")
    args = parser.parse_args(argv)
    if args.win_size < 1 or args.win_stride < 1:
        print(f"error: win-size and win-stride must be positive, got {args.win_size} {args.win_stride}",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    write_data(out)
    values = smoke_assignments(out, args.win_size, args.win_stride)
    size, stride = int(values["SMOKE_WIN_SIZE"]), int(values["SMOKE_WIN_STRIDE"])
    window = (f"LFE window {args.win_size}/{args.win_stride} -> {size}/{stride} patches (the 8x8 grid)"
              if (size, stride) != (args.win_size, args.win_stride) else f"LFE window {size}/{stride}")
    print(f"FDSL_SMOKE=1: smoke mode, NOT the paper's setting: {MODEL} with RANDOM weights at {IMAGE_SIZE} px, "
          f"blocks {' '.join(map(str, LAYERS))}, synthetic data in {out / 'data'}, {EPOCHS} epochs with "
          f"{TRAIN_SHOTS} training shots, {window}; the numbers only show that the scripts run", file=sys.stderr)
    for key, value in values.items():
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
